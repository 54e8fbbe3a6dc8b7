"""What a training run reports: a stable log line, a tqdm bar on terminals, a JSONL metrics file, a loss-curve
PNG and (optionally) Weights & Biases. Only rank 0 creates a `RunLogger`; the other ranks stay silent.

The log line has a fixed shape so it can be grepped and compared between runs:
    epoch 1/2 | step 40/300 | loss 4.2187 | lr 4.87e-04 | 1,523 tok/s | elapsed 0:01:12 | eta 0:07:48

tok/s counts useful tokens only: the positions of a batch that hold a document token, not padding (model/dataset.py
defines them), summed over all processes. On a GPU of a known type the line also shows `mfu 41.3%`: the model
FLOP utilisation, the FLOPs those useful tokens need (6 per weight per token for the forward and backward matmuls,
plus the attention scores, as in the PaLM paper's appendix B) divided by the peak dense bf16 FLOPs of all the
GPUs. Padding is not useful work, so packing raises it. On a CPU or an unknown GPU there is no MFU.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from .model import MiniMindLM


def format_duration(seconds: float) -> str:
    """H:MM:SS, e.g. 3725 -> '1:02:05'."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_log_line(epoch: int, epochs: int, step: int, total_steps: int, loss: float, lr: float,
                    tokens_per_sec: float, elapsed: float, eta: float, extra: dict[str, float] | None = None,
                    mfu: float | None = None) -> str:
    """The per-interval log line (epoch is 0-based in, 1-based out); `mfu 41.3%` follows tok/s when known, extra
    metrics are appended as `name value`."""
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"step {step}/{total_steps}",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
        f"{tokens_per_sec:,.0f} tok/s",
        *([f"mfu {mfu:.1%}"] if mfu is not None else []),
        f"elapsed {format_duration(elapsed)}",
        f"eta {format_duration(eta)}",
    ]
    parts += [f"{name} {value:.4f}" for name, value in (extra or {}).items()]
    return " | ".join(parts)


class MetricsFile:
    """Append-only JSONL, one object per log interval. On resume, rows past the resumed step are dropped: they
    come from the part of the killed run after its last checkpoint, which the resumed run repeats."""

    def __init__(self, path: Path, resume_from_step: int | None):
        self.path = path
        if resume_from_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> None:
    """Loss (and learning rate on a second axis) against optimizer step, from the metrics file."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.legend(loc="upper right")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


class RunLogger:
    """Rank 0's reporting: log lines (through tqdm when on a terminal), the metrics file and wandb."""

    def __init__(self, *, metrics_path: Path, png_path: Path, title: str, total_steps: int, start_step: int,
                 resumed: bool, wandb_config: dict | None, wandb_project: str, wandb_run_name: str,
                 wandb_run_id: str | None, out_dir: Path):
        self.metrics = MetricsFile(metrics_path, start_step if resumed else None)
        self.metrics_path, self.png_path, self.title = metrics_path, png_path, title
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True) if sys.stdout.isatty() else None
        self.wandb_run = None
        if wandb_config is not None:
            import wandb  # imported only when asked for: it is slow to import

            # A resumed run continues the same wandb run: its id is kept in the resume file.
            self.wandb_run = wandb.init(
                project=wandb_project,
                name=wandb_run_name,
                id=wandb_run_id,  # None on a fresh run: wandb picks one
                resume="allow" if wandb_run_id else None,
                dir=str(out_dir),
                config=wandb_config,
            )

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, row: dict, line: str) -> None:
        """Record one interval: `row` must hold at least step, epoch, loss and lr."""
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            line += " | WARNING: non-finite value"
        self.print(line)
        self.metrics.append(row)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        plot_loss_curve(self.metrics_path, self.png_path, self.title)
        if self.wandb_run is not None:
            self.wandb_run.finish()


# ----------------------------------------------------------------------------------------------------------------
# Throughput and model FLOP utilisation

# Peak dense (no sparsity) bf16 tensor-core FLOP/s of one GPU, from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order (first match). GeForce cards: the rate with fp32 accumulation, which
# is what autocast matmuls use. V100 and T4 have no bf16: their fp16 rate (run them with --dtype float16).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b", 989e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bRTX 4090\b", 165.2e12),
    (r"\bRTX 3090\b", 71e12),
    (r"\bV100\b.*\bPCIE\b", 112e12),
    (r"\bV100\b", 125e12),
    (r"\bT4\b", 65e12),
)


def peak_flops_of(gpu_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like torch.cuda.get_device_name() says, or None if not in the table."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this device: None on a CPU, MPS or a GPU missing from PEAK_BF16_FLOPS."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def training_flops(model: MiniMindLM, tokens: float, context_tokens: float) -> float:
    """FLOPs of one training pass (forward and backward) over `tokens` tokens. Each token costs 6 FLOPs per weight
    it goes through - every weight except the routed experts it was not sent to; the tied embedding counts once,
    as the output head - and the attention scores and their use cost 12 * n_layers * dim per position it attends
    over; `context_tokens` sums, over the tokens, the width of their row. (6 per weight assumes every weight
    trains: with frozen weights, as in LoRA, the real work is nearer 4.)"""
    config = model.config
    weights = model.num_parameters()
    if config.use_moe:  # routed experts are SwiGLUs of three dim x hidden_dim matrices, top-k of them per token
        idle_experts = config.n_routed_experts - config.num_experts_per_tok
        weights -= config.n_layers * idle_experts * 3 * config.dim * config.hidden_dim
    return 6.0 * weights * tokens + 12.0 * config.n_layers * config.dim * context_tokens


class Throughput:
    """Useful tokens/s and MFU since the previous report, and an ETA from this process's average step time."""

    def __init__(self, start_step: int, peak_flops: float | None = None):
        self.start_time = self.last_time = time.time()
        self.start_step = start_step
        self.peak_flops = peak_flops  # summed over every process; None: no MFU to report
        self.tokens, self.flops = 0.0, 0.0

    def add(self, tokens: float, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def report(self, step: int, final_step: int) -> tuple[float, float | None, float, float]:
        """(useful tokens per second and MFU since the last report (None without a peak), seconds elapsed,
        estimated seconds remaining)."""
        now = time.time()
        seconds = max(now - self.last_time, 1e-9)
        tokens_per_sec = self.tokens / seconds
        mfu = self.flops / seconds / self.peak_flops if self.peak_flops else None
        self.tokens, self.flops, self.last_time = 0.0, 0.0, now
        elapsed = now - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (final_step - step) if done > 0 else 0.0
        return tokens_per_sec, mfu, elapsed, eta
