"""Full supervised fine-tuning: every weight trained on chat conversations, loss on the assistant replies only.

Starts from out/pretrain_{dim}[_moe].pth (run train_pretrain.py first) unless --from_weight says otherwise, and
writes out/full_sft_{dim}[_moe].pth, out/full_sft_{dim}[_moe]_resume.pth, ..._metrics.jsonl and ..._loss.png.

Run (from the repository root, data in ./dataset/sft_mini_512.jsonl):
    python train_full_sft.py                                        # one GPU, or CPU/MPS when there is none
    python train_full_sft.py --from_weight out/my_pretrain.pth      # start from another checkpoint
    torchrun --nproc_per_node 2 train_full_sft.py                   # DDP on 2 GPUs (gloo on CPU)
    deepspeed --num_gpus 2 train_full_sft.py --deepspeed ds_config.json
    python train_full_sft.py --resume 1                             # continue where the last checkpoint left off
    python train_full_sft.py --packed 1                             # whole conversations side by side, no padding
    python scripts/pretokenize.py --data_path dataset/sft_mini_512.jsonl --kind chat   # tokenize once, then:
    python train_full_sft.py --data_path dataset/sft_mini_512.bin --packed 1
    WANDB_MODE=offline python train_full_sft.py --use_wandb 1       # wandb without network (sync later)
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
        data_path="./dataset/sft_mini_512.jsonl",
        learning_rate=5e-5,
        wandb_project="MiniMind-Full-SFT",
        from_weight="pretrain",
        epochs=1,
        batch_size=32,
        accumulation_steps=1,
        max_seq_len=512,
    )
    args = parse_training_args(parser)

    # Init: processes, device, seed
    ctx = init_run(args)

    # Data: conversations (and replayed text), one per sample or packed with --packed 1
    require_data(args, "sft_mini_512.jsonl")
    tokenizer = load_tokenizer(args)
    dataset, collate = training_data(args, tokenizer, ctx, chat=True)

    # Model: the pretrained weights (a missing file stops here and names the stage to run first)
    model, origin = model_from_args(args, vocab_size=len(tokenizer))
    config = model.config
    if ctx.is_main:
        print(f"MiniMind full SFT: {model.num_parameters() / 1e6:.3f}M parameters from {origin}, {len(dataset):,} "
              f"samples, {ctx.world_size} process(es) on {ctx.device}", flush=True)

    # Loop and save
    trainer = Trainer(
        train_settings(args), ctx, model, dataset, collate, causal_lm_loss,
        weights_file=weights_path(args.out_dir, "full_sft", config),
    )
    trainer.fit()


if __name__ == "__main__":
    run_stage(main)
