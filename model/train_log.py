"""What a training run reports: a stable log line, a tqdm bar on terminals, a JSONL metrics file, a loss-curve
PNG and (optionally) Weights & Biases. Only rank 0 creates a `RunLogger`; the other ranks stay silent.

The log line has a fixed shape so it can be grepped and compared between runs:
    epoch 1/2 | step 40/300 | loss 4.2187 | lr 4.87e-04 | 1,523 tok/s | elapsed 0:01:12 | eta 0:07:48
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """H:MM:SS, e.g. 3725 -> '1:02:05'."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_log_line(epoch: int, epochs: int, step: int, total_steps: int, loss: float, lr: float,
                    tokens_per_sec: float, elapsed: float, eta: float, extra: dict[str, float] | None = None) -> str:
    """The per-interval log line (epoch is 0-based in, 1-based out); extra metrics are appended as `name value`."""
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"step {step}/{total_steps}",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
        f"{tokens_per_sec:,.0f} tok/s",
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


class Throughput:
    """Tokens/s since the previous report and an ETA from this process's average step time."""

    def __init__(self, start_step: int):
        self.start_time = self.last_time = time.time()
        self.start_step = start_step
        self.tokens = 0

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def report(self, step: int, final_step: int) -> tuple[float, float, float]:
        """(tokens per second since last report, seconds elapsed, estimated seconds remaining)."""
        now = time.time()
        tokens_per_sec = self.tokens / max(now - self.last_time, 1e-9)
        self.tokens, self.last_time = 0, now
        elapsed = now - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (final_step - step) if done > 0 else 0.0
        return tokens_per_sec, elapsed, eta
