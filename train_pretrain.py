"""Pretraining: next-token prediction on plain text, from random initialisation.

Writes out/pretrain_{dim}[_moe].pth (weights), out/pretrain_{dim}[_moe]_resume.pth (exact resume state),
out/pretrain_{dim}[_moe]_metrics.jsonl and out/pretrain_{dim}[_moe]_loss.png.

Run (from the repository root, data in ./dataset/pretrain_hq.jsonl):
    python train_pretrain.py                                        # one GPU, or CPU/MPS when there is none
    python train_pretrain.py --device cpu --dtype float32 --dim 64 --n_layers 2 --max_steps 100   # CPU smoke run
    torchrun --nproc_per_node 2 train_pretrain.py                   # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_pretrain.py --deepspeed ds_config.json
    torchrun --nproc_per_node 2 train_pretrain.py --zero_stage 2    # DeepSpeed ZeRO-2 through torchrun
    python train_pretrain.py --resume 1                             # continue where the last checkpoint left off
    python train_pretrain.py --packed 1                             # whole texts side by side in full rows, no padding
    python scripts/pretokenize.py --data_path dataset/pretrain_hq.jsonl --kind text   # tokenize once, then:
    python train_pretrain.py --data_path dataset/pretrain_hq.bin --packed 1
    python train_pretrain.py --compile 1                            # torch.compile the model (GPU)
    WANDB_MODE=offline python train_pretrain.py --use_wandb 1       # wandb without network (sync later)
"""

from model.checkpoint import weights_path
from model.cli import (
    init_run, load_tokenizer, parse_training_args, require_data, run_stage, train_settings,
    training_data, training_parser,
)
from model.loading import model_from_args
from model.trainer import Trainer, causal_lm_loss


def main() -> None:
    parser = training_parser(
        __doc__.split("\n\n")[0],
        data_path="./dataset/pretrain_hq.jsonl",
        learning_rate=5e-4,
        wandb_project="MiniMind-Pretrain",
        epochs=1,
        batch_size=32,
        accumulation_steps=8,
        max_seq_len=512,
    )
    args = parse_training_args(parser)

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: one text per sample, or with --packed 1 rows of whole texts; jsonl or a pretokenized NAME.bin
    require_data(args, "pretrain_hq.jsonl")
    tokenizer = load_tokenizer(args)
    dataset, collate = training_data(args, tokenizer, ctx, chat=False)

    # Model: random init unless --from_weight names a checkpoint to continue pretraining from
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config
    if ctx.is_main:
        print(f"MiniMind pretrain: {model.num_parameters() / 1e6:.3f}M parameters from {origin}, {len(dataset):,} "
              f"samples, {ctx.world_size} process(es) on {ctx.device}", flush=True)

    # Loop and save
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, collate, causal_lm_loss,
        weights_file=weights_path(args.out_dir, "pretrain", config),
    )
    trainer.fit()


if __name__ == "__main__":
    run_stage(main)
