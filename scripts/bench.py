"""Speed and memory benchmark of the model core; prints a table.

    python scripts/bench.py                                   # MiniMind2-Small on the best device, defaults below
    python scripts/bench.py --presets MiniMind2-Small MiniMind2 MiniMind2-MoE --batch_size 16 --seq_len 512
    python scripts/bench.py --device cpu --dtypes float32 bfloat16 --steps 3

Rows: one training step (forward + backward + AdamW) in tokens/s, with SDPA and with the explicit attention path;
and KV-cache generation in new tokens/s. Memory: peak CUDA memory on GPU, peak resident set size of the process
on CPU (cumulative over the rows, so read it as an upper bound for later rows).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import MiniMindLM, preset  # noqa: E402
from model.distributed import select_device  # noqa: E402
from model.backend import autocast_context  # noqa: E402


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(model: MiniMindLM, device, dtype_name: str, batch: int, seq: int, steps: int) -> float:
    """Tokens per second of full training steps (after one warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    model.train()

    def step():
        with autocast_context(device, dtype_name):
            out = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * seq * steps / (time.perf_counter() - start)


def bench_generate(model: MiniMindLM, device, dtype_name: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    """New tokens per second of greedy KV-cache decoding (all rows together)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    model.eval()
    with autocast_context(device, dtype_name):
        model.generate(ids, max_new_tokens=2, temperature=0)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, temperature=0)
        synchronize(device)
    return out.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["MiniMind2-Small"], help="MiniMind2-Small, MiniMind2, MiniMind2-MoE")
    parser.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: bfloat16 on CUDA, float32 bfloat16 on CPU")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per row")
    parser.add_argument("--gen_batch", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    device = select_device(args.device)
    dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    torch.manual_seed(0)
    header = f"{'preset':<16} {'params':>8} {'dtype':<9} {'train tok/s (sdpa)':>19} {'train tok/s (explicit)':>23} {'gen tok/s':>10} {'peak MB':>9}"
    print(f"device {device}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} timed steps; "
          f"generation: batch {args.gen_batch}, {args.new_tokens} new tokens\n")
    print(header)
    print("-" * len(header))
    for name in args.presets:
        for dtype_name in dtypes:
            row = {}
            for flash in (True, False):
                model = MiniMindLM(preset(name, flash_attn=flash)).to(device)
                row[flash] = bench_train(model, device, dtype_name, args.batch_size, args.seq_len, args.steps)
                if flash:
                    gen = bench_generate(model, device, dtype_name, args.gen_batch, 32, args.new_tokens)
                    params = model.num_parameters()
                del model
            print(f"{name:<16} {params / 1e6:>7.1f}M {dtype_name:<9} {row[True]:>19,.0f} {row[False]:>23,.0f} "
                  f"{gen:>10,.1f} {peak_memory_mb(device):>9,.0f}", flush=True)


if __name__ == "__main__":
    main()
