"""Reasoning distillation: fine-tune a chat model on replies written by a reasoning model, shaped as
`<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, so it learns to think before it answers.

The loss is the SFT loss (assistant replies only) with one change: the positions whose label is one of the four
tag tokens weigh --tag_weight (default 10) times more, and the sum is divided by the total weight. The tags are a
handful of tokens in a long reply; without the extra weight a small model learns the reasoning text long before
it reliably opens and closes the think and answer blocks. Tags inside the prompt are never counted.

Starts from out/rlhf_{dim}[_moe].pth (run train_dpo.py first) unless --from_weight says otherwise, and writes
out/reason_{dim}[_moe].pth, out/reason_{dim}[_moe]_resume.pth, ..._metrics.jsonl and ..._loss.png.

Run (from the repository root, data in ./dataset/r1_mix_1024.jsonl):
    python train_distill_reason.py                                   # one GPU, or CPU/MPS when there is none
    python train_distill_reason.py --from_weight full_sft            # skip DPO: start from the SFT weights
    python train_distill_reason.py --tag_weight 1                    # plain SFT loss, for comparison
    torchrun --nproc_per_node 2 train_distill_reason.py              # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_distill_reason.py --deepspeed ds_config.json
    python train_distill_reason.py --resume 1                        # continue where the last checkpoint left off
    python train_distill_reason.py --packed 1                        # whole conversations side by side, no padding
Then chat with the think block shown apart: python eval_model.py --model_mode 3
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from model.checkpoint import weights_path
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, train_settings,
    training_data, training_parser,
)
from model.loading import model_from_args
from model.common import ConfigError
from model.dataset import Batch
from model.trainer import Trainer, masked_cross_entropy, with_moe_aux_loss

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_token_ids(tokenizer: PreTrainedTokenizerBase, tokenizer_path: str) -> list[int]:
    """The id of each reasoning tag; each must be a single token of the vocabulary, or the weighting is undefined."""
    ids = []
    for tag in REASONING_TAGS:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"{tokenizer_path}: the reasoning tag {tag!r} is not a single token (it encodes to "
                             f"{encoded}); use a tokenizer that has {', '.join(REASONING_TAGS)} as tokens")
        ids.extend(encoded)
    return ids


def tag_weighted_mask(labels: torch.Tensor, loss_mask: torch.Tensor, tag_ids: torch.Tensor, tag_weight: float) -> torch.Tensor:
    """Per-position loss weights (B, T): loss_mask (1 on reply tokens, 0 elsewhere) times tag_weight where the label
    is a tag token. Multiplying, not overwriting, keeps tags outside the replies (prompt, padding) at weight 0."""
    is_tag = torch.isin(labels, tag_ids)  # (B, T) bool
    return loss_mask * torch.where(is_tag, tag_weight, 1.0).to(loss_mask.dtype)  # (B, T)


def tag_weighted_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, tag_ids: torch.Tensor,
                      tag_weight: float) -> torch.Tensor:
    """sum(weight * cross-entropy) / sum(weight) over the reply positions, tag positions weighted by tag_weight.
    logits (B, T, V), labels and loss_mask (B, T)."""
    weights = tag_weighted_mask(labels, loss_mask, tag_ids, tag_weight)  # (B, T)
    return masked_cross_entropy(logits, labels, weights)  # divides by weights.sum(): the weighted mean


def main(argv: list[str] | None = None) -> Trainer:
    """Train the reasoning model; returns the finished Trainer."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/r1_mix_1024.jsonl",
        learning_rate=1e-6,
        wandb_project="MiniMind-Reasoning",
        from_weight="rlhf",
        epochs=1,
        batch_size=8,
        accumulation_steps=1,
        max_seq_len=1024,
    )
    group = parser.add_argument_group("reasoning distillation")
    group.add_argument("--tag_weight", type=float, default=10.0,
                       help=f"loss weight of the tag tokens {' '.join(REASONING_TAGS)} relative to other reply tokens")
    args = parse_training_args(parser, argv)
    if args.tag_weight <= 0:
        parser.error(f"--tag_weight must be > 0, got {args.tag_weight}")

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: conversations whose replies hold the think and answer blocks
    require_data(args, "r1_mix_1024.jsonl")
    tokenizer = load_tokenizer(args)
    dataset, collate = training_data(args, tokenizer, ctx, chat=True)
    tag_ids = torch.tensor(tag_token_ids(tokenizer, args.tokenizer_path), device=ctx.device)

    # Model: every weight trained, starting from the DPO weights by default
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config
    if ctx.is_main:
        print(f"MiniMind reasoning distillation: {model.num_parameters() / 1e6:.3f}M parameters from {origin}, "
              f"{len(dataset):,} samples, tag weight {args.tag_weight:g}, {ctx.world_size} process(es) on "
              f"{ctx.device}", flush=True)

    def reasoning_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tag-weighted reply loss plus the MoE balancing loss (0 for dense models)."""
        inputs, labels, loss_mask = batch  # (B, T) each
        out = model(inputs, document_ids=batch.document_ids)
        return with_moe_aux_loss(tag_weighted_loss(out.logits, labels, loss_mask, tag_ids, args.tag_weight), out)

    # Loop and save
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, collate, reasoning_loss,
        weights_file=weights_path(args.out_dir, "reason", config),
    )
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
