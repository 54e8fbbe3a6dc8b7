"""GRPO (Group Relative Policy Optimization, DeepSeekMath): learn from rewards, comparing completions of a prompt.

For each prompt the policy samples G completions (--num_generations); rewards score them (--rewards: rule-based
format, exact match of the final answer against the line's "answer", tool-call validity, a length penalty, or a
reward model); each completion's advantage is its reward relative to its group's (mean, and std unless --loss_type
dr_grpo). The policy then takes --updates_per_batch optimizer steps on the clipped policy-ratio objective with a KL
penalty (--beta) to a frozen copy of its starting weights, reusing the rollouts' stored log-probs (model/rl.py
writes every formula out; --loss_type grpo, dr_grpo or cispo). Writes out/grpo_{dim}[_moe].pth and the usual
_resume.pth, _metrics.jsonl (loss, reward mean/std and each reward's mean, KL, completion length, ratio, clip
fraction) and _loss.png.

Data: jsonl lines {"conversations": [{"role": "user", "content": "12+30=?"}], "answer": "42"} (model/rollouts.py).

Run (from the repository root):
    python train_grpo.py --data_path dataset/rl_math.jsonl --rewards exact:1,format:0.2   # from out/full_sft_512.pth
    python train_grpo.py --loss_type dr_grpo --num_generations 8 --updates_per_batch 2
    torchrun --nproc_per_node 2 train_grpo.py                       # DDP (gloo on CPU)
    python train_grpo.py --resume 1                                 # continue exactly where the last checkpoint was
"""
from __future__ import annotations

import copy

from torch import nn

from model.checkpoint import weights_path
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, train_settings, training_parser,
)
from model.loading import model_from_args
from model.rl import LOSS_TYPES, group_advantages, policy_loss
from model.rollouts import (
    PromptBatch, PromptCollator, PromptDataset, Rollout, RolloutStage, add_rl_args, build_rewards, check_rl_args,
    completion_log_probs,
)
from model.trainer import Trainer, with_moe_aux_loss


class GRPO(RolloutStage):
    """The Trainer's loss function (and, for resuming, its state): rollouts with group-relative advantages,
    then the clipped objective on them."""

    def complete(self, rollout: Rollout, out) -> None:
        rollout.extra["advantages"] = group_advantages(rollout.rewards, self.args.num_generations,
                                                       scale_by_std=self.args.loss_type != "dr_grpo")

    def __call__(self, model: nn.Module, batch: PromptBatch):
        rollout, metrics = self.rollout_for(model, batch)
        logp, out = completion_log_probs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
        loss, policy_metrics = policy_loss(
            logp, rollout.old_logp, rollout.extra["advantages"], rollout.completion_mask,
            loss_type=self.args.loss_type, epsilon=self.args.epsilon, epsilon_high=self.args.epsilon_high,
            ref_logp=rollout.ref_logp, beta=self.args.beta, max_new_tokens=self.args.max_gen_len)
        return with_moe_aux_loss(loss, out, {**metrics, **policy_metrics})


def main(argv: list[str] | None = None) -> Trainer:
    """Run the stage with these command-line arguments (default: sys.argv); returns the finished Trainer."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/rl_math.jsonl",
        learning_rate=1e-6,
        wandb_project="MiniMind-GRPO",
        from_weight="full_sft",
        batch_size=4,
        accumulation_steps=1,
        max_seq_len=256,
        save_interval=10,
        log_interval=1,
        packing=False,
    )
    add_rl_args(parser)
    group = parser.add_argument_group("grpo")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="grpo",
                       help="grpo; dr_grpo (no std scaling, no length normalisation); cispo (clipped, "
                            "gradient-stopped importance weight on every token)")
    args = parse_training_args(parser, argv)
    check_rl_args(parser, args)

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: prompts (--max_seq_len tokens at most) with their reference answers
    require_data(args, "rl_math.jsonl")
    tokenizer = load_tokenizer(args)
    dataset = PromptDataset(args.data_path, tokenizer, max_length=args.max_seq_len)

    # Model: the policy from the SFT weights, every weight trained; the reference is a frozen copy of them
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    reference = copy.deepcopy(model)
    grpo = GRPO(args, ctx.rank, tokenizer, dataset, reference, build_rewards(args, ctx.device))
    if ctx.is_main:
        print(f"MiniMind GRPO ({args.loss_type}): {model.num_parameters() / 1e6:.3f}M parameters from {origin} (also the "
              f"frozen reference), {len(dataset):,} prompts x {args.num_generations} completions, rewards "
              f"{args.rewards}, beta {args.beta}, {ctx.world_size} process(es) on {ctx.device}", flush=True)

    trainer = Trainer(train_settings(args), ctx, model, dataset, PromptCollator(tokenizer.pad_token_id or 0), grpo,
                      weights_file=weights_path(args.out_dir, "grpo", model.config), frozen_models=[reference],
                      stage_state=grpo)
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
