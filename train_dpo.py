"""Direct Preference Optimization (Rafailov et al., 2023): learn from pairs of a preferred and a rejected reply.

The policy starts from out/full_sft_{dim}[_moe].pth (run train_full_sft.py first) unless --from_weight says
otherwise; a frozen copy of those starting weights is the reference model. For each pair the loss is

    loss = -logsigmoid(beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)))

where every term is the log-probability of a conversation's assistant tokens (the SFT loss mask) under the
policy (pi) or the reference (ref), summed over the tokens (--length_normalize 1: averaged). The implicit reward
of a reply is beta * (pi - ref); the log shows how often the chosen reply out-scores the rejected one
(reward_acc) and by how much (reward_margin). In multi-turn pairs the earlier replies are shared, so their
log-probs cancel in the sum (with --length_normalize they still count in each mean). The reference runs without
dropout: keep --dropout 0 (the default) so that policy and reference agree exactly at the start. Writes
out/rlhf_{dim}[_moe].pth and its _resume.pth, _metrics.jsonl and _loss.png.

The default learning rate 1e-8 is the original MiniMind's, meant to nudge a well-trained model without
forgetting; fine-tuning small models usually needs ~1e-6 to 5e-6 to move at all.

Run (from the repository root, data in ./dataset/dpo.jsonl):
    python train_dpo.py                                             # one GPU, or CPU/MPS when there is none
    python train_dpo.py --learning_rate 2e-6 --beta 0.1             # a learning rate that visibly changes a small model
    torchrun --nproc_per_node 2 train_dpo.py                        # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_dpo.py --deepspeed ds_config.json
    python train_dpo.py --resume 1                                  # continue where the last checkpoint left off
    WANDB_MODE=offline python train_dpo.py --use_wandb 1            # wandb without network (sync later)
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import weights_path
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, str2bool,
    train_settings, training_parser,
)
from model.loading import model_from_args
from model.dataset import DPOCollator, DPODataset
from model.trainer import LossFn, Trainer, sequence_log_probs, with_moe_aux_loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards, from (B,) sequence log-probs.

    Returns (loss (B,), chosen_rewards (B,), rejected_rewards (B,)) with reward = beta * (policy - reference);
    the rewards are detached (they are for logging)."""
    preference = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)  # (B,)
    losses = -F.logsigmoid(beta * preference)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def make_dpo_loss(reference: nn.Module, beta: float, length_normalize: bool = False) -> LossFn:
    """The Trainer's loss function: DPO on a DPOCollator batch against the frozen `reference` model.

    The reference's log-probs are computed on the fly under no_grad: one extra forward per micro-batch (no
    backward), and nothing to recompute or store when a run resumes or the world size changes."""

    def dpo_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        inputs, labels, loss_mask = batch  # (2B, T) each: the B chosen rows, then the B rejected rows
        pairs = inputs.shape[0] // 2
        with torch.no_grad():
            reference_log_probs = sequence_log_probs(reference(inputs).logits, labels, loss_mask, length_normalize)  # (2B,)
        out = model(inputs)
        policy_log_probs = sequence_log_probs(out.logits, labels, loss_mask, length_normalize)  # (2B,)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_log_probs[:pairs], policy_log_probs[pairs:],
            reference_log_probs[:pairs], reference_log_probs[pairs:], beta,
        )
        metrics = {
            "reward_acc": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        }
        return with_moe_aux_loss(losses.mean(), out, metrics)

    return dpo_step


def main(argv: list[str] | None = None) -> Trainer:
    """Run the stage with these command-line arguments (default: sys.argv); returns the finished Trainer."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/dpo.jsonl",
        learning_rate=1e-8,
        wandb_project="MiniMind-RLHF",
        from_weight="full_sft",
        epochs=2,
        batch_size=4,
        accumulation_steps=1,
        max_seq_len=1024,
        packing=False,  # a pair's chosen and rejected replies are compared row against row
    )
    group = parser.add_argument_group("dpo")
    group.add_argument("--beta", type=float, default=0.1,
                       help="DPO temperature: how strongly the policy may move away from the reference")
    group.add_argument("--length_normalize", type=str2bool, default=False,
                       help="average the log-probs over each reply's tokens instead of summing them (1/0)")
    args = parse_training_args(parser, argv)
    if args.beta <= 0:
        parser.error(f"--beta must be > 0, got {args.beta}")

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: {"chosen": [...], "rejected": [...]} conversations, masked like SFT
    require_data(args, "dpo.jsonl")
    tokenizer = load_tokenizer(args)
    dataset = DPODataset(args.data_path, tokenizer, max_length=args.max_seq_len)

    # Model: the policy from the SFT weights, every weight trained; the reference is a frozen copy of the same
    # starting weights (moved to the device by the Trainer, never wrapped, optimized or saved).
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config
    reference = copy.deepcopy(model)
    if ctx.is_main:
        print(f"MiniMind DPO: {model.num_parameters() / 1e6:.3f}M parameters from {origin} (also the frozen "
              f"reference), {len(dataset):,} preference pairs, beta {args.beta}, {ctx.world_size} process(es) "
              f"on {ctx.device}", flush=True)

    # Loop and save
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, DPOCollator(tokenizer.pad_token_id),
        make_dpo_loss(reference, args.beta, args.length_normalize),
        weights_file=weights_path(args.out_dir, "rlhf", config),
        frozen_models=[reference],
    )
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
