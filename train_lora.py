"""LoRA fine-tuning: teach a chat model something new (an identity, a domain) by training small low-rank adapters
while every base weight stays frozen; only the adapters are saved.

Starts from out/full_sft_{dim}[_moe].pth (run train_full_sft.py first) unless --from_weight says otherwise,
attaches an adapter y = W x + (alpha / rank) * B(A(x)) to each --lora_targets linear of the decoder blocks,
trains the adapters with the SFT loss (assistant replies only) and writes out/lora/{lora_name}_{dim}.pth (adapter
weights only, a few hundred KB) with its _resume.pth, _metrics.jsonl and _loss.png beside it.

Run (from the repository root, data in ./dataset/lora_identity.jsonl):
    python train_lora.py                                             # adapter "lora_identity" on full_sft weights
    python train_lora.py --lora_name lora_medical --data_path ./dataset/lora_medical.jsonl
    python train_lora.py --lora_rank 16 --lora_alpha 32 --lora_targets all   # every linear of the blocks
    torchrun --nproc_per_node 2 train_lora.py                        # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_lora.py --deepspeed ds_config.json
    python train_lora.py --resume 1                                  # continue where the last checkpoint left off
    python train_lora.py --packed 1                                  # whole conversations side by side, no padding

Chat with base + adapter (rank and targets are read from the adapter file, which stores the update with its
scale alpha/rank folded in, so nothing else needs repeating):
    python eval_model.py --model_mode 1 --lora_name lora_identity

Merge the adapter into a standalone weights file, a plain state dict any MiniMind tool loads without LoRA code
(W + (alpha / rank) * B A per adapted linear; the model's outputs stay the same):
    python scripts/convert_model.py merge_lora --weight out/full_sft_512.pth --lora out/lora/lora_identity_512.pth \
        --out out/full_sft_identity_512.pth
    python eval_model.py --weight out/full_sft_identity_512.pth
"""
from __future__ import annotations

from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, train_settings,
    training_data, training_parser,
)
from model.loading import model_from_args
from model.model_lora import DEFAULT_TARGETS, apply_lora, lora_path, lora_state_dict, parse_targets
from model.trainer import Trainer, causal_lm_loss


def main(argv: list[str] | None = None) -> Trainer:
    """Train one adapter; returns the finished Trainer (its `.model` is the base model with adapters attached)."""
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/lora_identity.jsonl",
        learning_rate=1e-4,
        wandb_project="MiniMind-LoRA",
        from_weight="full_sft",
        epochs=10,
        batch_size=32,
        accumulation_steps=1,
        max_seq_len=340,
        log_interval=10,
    )
    group = parser.add_argument_group("lora")
    group.add_argument("--lora_name", default="lora_identity",
                       help="adapter name: the file is OUT_DIR/lora/{lora_name}_{dim}.pth")
    group.add_argument("--lora_rank", type=int, default=16, help="rank r of the low-rank update B A")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="scale numerator: the update is (alpha / rank) * B A; None means alpha = rank (scale 1)")
    group.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                       help="comma-separated linear names inside the blocks (wq,wk,wv,wo,w1,w2,w3) or 'all'")
    args = parse_training_args(parser, argv)
    if args.lora_rank < 1:
        parser.error(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        parser.error(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not args.lora_name or "/" in args.lora_name or "\\" in args.lora_name:
        parser.error(f"--lora_name must be a plain file-name part, got {args.lora_name!r}")

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: conversations, loss on the assistant replies (as in SFT)
    require_data(args, "lora_identity.jsonl (or lora_medical.jsonl)")
    tokenizer = load_tokenizer(args)
    dataset, collate = training_data(args, tokenizer, ctx, chat=True)

    # Model: the chat weights, loaded before the adapters exist (strict keys), then every base weight frozen;
    # only the adapters (A random, B zero: the adapted model starts equal to the base) have requires_grad.
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config
    targets = parse_targets(args.lora_targets)
    adapted = apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=targets, freeze_base=True)
    if ctx.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"MiniMind LoRA '{args.lora_name}': rank {args.lora_rank} on {len(adapted)} linears ({args.lora_targets}), "
              f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.3f}M parameters ({100 * trainable / total:.2f}%), "
              f"base {origin}, {len(dataset):,} samples, {ctx.world_size} process(es) on {ctx.device}", flush=True)

    # Loop and save: the SFT loss; the weights file holds the adapter weights only
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, collate, causal_lm_loss,
        weights_file=lora_path(args.out_dir, args.lora_name, config.dim),
        export_state_dict=lora_state_dict,
    )
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_stage(main)
