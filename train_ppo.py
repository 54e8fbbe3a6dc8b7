"""PPO (Proximal Policy Optimization) with a critic: learn from rewards, one completion's tokens at a time.

The policy samples --num_generations completions per prompt, rewards score them as in train_grpo.py (same data,
--rewards and sampling flags). Unlike GRPO, the credit for a reward is assigned per token by a critic (a value
head on the policy's last hidden state, or with --separate_critic 1 a copy of the starting model with its own
head): each token is rewarded -beta * KL(policy || reference) and the last one also the completion's reward;
generalised advantage estimation (--gamma, --lam) turns rewards and values into advantages (whitened), and the
policy takes --updates_per_batch steps on PPO's clipped objective plus --vf_coef times the clipped value loss
(model/rl.py). Writes out/ppo_{dim}[_moe].pth (the policy; the critic lives in the resume file) and logs reward,
KL, completion length, clip fraction, value loss and the critic's explained variance.

Run (from the repository root):
    python train_ppo.py --data_path dataset/rl_math.jsonl --rewards exact:1       # from out/full_sft_512.pth
    python train_ppo.py --separate_critic 1 --gamma 1 --lam 0.95 --updates_per_batch 2
    torchrun --nproc_per_node 2 train_ppo.py
    python train_ppo.py --resume 1
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from model.checkpoint import weights_path
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, str2bool, train_settings, training_parser,
)
from model.loading import model_from_args
from model.model import MiniMindLM
from model.rl import explained_variance, gae, kl_k3, per_token_rewards, policy_loss, value_loss, whiten
from model.rollouts import (
    PromptBatch, PromptCollator, PromptDataset, Rollout, RolloutStage, add_rl_args, build_rewards, check_rl_args,
    completion_log_probs,
)
from model.trainer import Trainer, with_moe_aux_loss


@dataclass
class ActorCriticOutput:
    logits: torch.Tensor  # (B, T, V) the policy's
    aux_loss: torch.Tensor  # the policy's (and a separate critic's) MoE balancing loss
    values: torch.Tensor  # (B, T) float32: the critic's estimate of the return after each position


class ActorCritic(nn.Module):
    """The policy and its critic, trained together: values from a linear head on the final (normed) hidden state
    of the policy itself, or of a separate critic trunk."""

    def __init__(self, policy: MiniMindLM, critic: MiniMindLM | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.value_head = nn.Linear(policy.config.dim if critic is None else critic.config.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        """The policy's config (what the training loop's FLOP count reads)."""
        return self.policy.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ActorCriticOutput:
        hidden: list[torch.Tensor] = []
        trunk = self.critic if self.critic is not None else self.policy
        handle = trunk.norm.register_forward_hook(lambda module, inputs, output: hidden.append(output))
        try:
            out = self.policy(input_ids, attention_mask=attention_mask)
            aux_loss = out.aux_loss
            if self.critic is not None:
                aux_loss = aux_loss + self.critic(input_ids, attention_mask=attention_mask, logits_to_keep=1).aux_loss
        finally:
            handle.remove()
        return ActorCriticOutput(out.logits, aux_loss, self.value_head(hidden[0]).squeeze(-1).float())


class PPO(RolloutStage):
    """The Trainer's loss function: rollouts with per-token rewards, values, GAE advantages and returns, then
    the clipped policy loss plus the clipped value loss."""

    def complete(self, rollout: Rollout, out: ActorCriticOutput) -> None:
        args, mask = self.args, rollout.completion_mask
        values = out.values[:, rollout.prompt_len - 1:-1] * mask  # (N, C): before each completion token
        rewards = per_token_rewards(rollout.rewards, mask, kl_k3(rollout.old_logp, rollout.ref_logp), args.beta)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        rollout.extra.update(values=values, returns=returns, advantages=whiten(advantages, mask),
                             explained_variance=explained_variance(values, returns, mask))

    def __call__(self, model: nn.Module, batch: PromptBatch):
        rollout, metrics = self.rollout_for(model, batch)
        args, extra, mask = self.args, rollout.extra, rollout.completion_mask
        logp, out = completion_log_probs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
        loss, policy_metrics = policy_loss(logp, rollout.old_logp, extra["advantages"], mask, epsilon=args.epsilon,
                                           epsilon_high=args.epsilon_high, ref_logp=rollout.ref_logp)
        values = out.values[:, rollout.prompt_len - 1:-1]
        critic_loss = value_loss(values, extra["values"], extra["returns"], mask, args.value_clip)
        metrics.update(policy_metrics, value_loss=critic_loss.detach(), explained_variance=extra["explained_variance"])
        return with_moe_aux_loss(loss + args.vf_coef * critic_loss, out, metrics)


def main(argv: list[str] | None = None) -> Trainer:
    """Run the stage with these command-line arguments (default: sys.argv); returns the finished Trainer."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/rl_math.jsonl",
        learning_rate=1e-6,
        wandb_project="MiniMind-PPO",
        from_weight="full_sft",
        batch_size=4,
        accumulation_steps=1,
        max_seq_len=256,
        save_interval=10,
        log_interval=1,
        packing=False,
    )
    add_rl_args(parser)
    group = parser.add_argument_group("ppo")
    group.add_argument("--gamma", type=float, default=1.0, help="discount per token")
    group.add_argument("--lam", type=float, default=0.95, help="GAE lambda: bias (0) vs variance (1) of the advantages")
    group.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss")
    group.add_argument("--value_clip", type=float, default=0.2, help="clip range of the value update")
    group.add_argument("--separate_critic", type=str2bool, default=False,
                       help="a critic of its own (a copy of the starting model with a value head) instead of a value "
                            "head on the policy (1/0)")
    args = parse_training_args(parser, argv)
    check_rl_args(parser, args)

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: prompts with their reference answers
    require_data(args, "rl_math.jsonl")
    tokenizer = load_tokenizer(args)
    dataset = PromptDataset(args.data_path, tokenizer, max_length=args.max_seq_len)

    # Models: the policy from the SFT weights with its critic (both trained), the reference a frozen copy
    policy, origin = model_from_args(args, vocab_size=len(tokenizer))
    reference = copy.deepcopy(policy)
    model = ActorCritic(policy, copy.deepcopy(policy) if args.separate_critic else None)
    ppo = PPO(args, ctx.rank, tokenizer, dataset, reference, build_rewards(args, ctx.device))
    if ctx.is_main:
        critic = "a separate critic" if args.separate_critic else "a value head on the policy"
        print(f"MiniMind PPO: {policy.num_parameters() / 1e6:.3f}M parameters from {origin} (also the frozen reference), "
              f"{critic}, {len(dataset):,} prompts x {args.num_generations} completions, rewards {args.rewards}, "
              f"beta {args.beta}, {ctx.world_size} process(es) on {ctx.device}", flush=True)

    trainer = Trainer(train_settings(args), ctx, model, dataset, PromptCollator(tokenizer.pad_token_id or 0), ppo,
                      weights_file=weights_path(args.out_dir, "ppo", policy.config),
                      export_state_dict=lambda m: m.policy.state_dict(), frozen_models=[reference], stage_state=ppo)
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
