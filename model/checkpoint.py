"""Checkpoint files: atomic writes, the weights file users load, and the resume state for exact continuation.

Files of one run share a stem, e.g. `out/pretrain_512.pth` (weights: a plain state dict that
`MiniMindLM(config).load_state_dict(sd, strict=True)` accepts), `out/pretrain_512_resume.pth` (everything needed
to continue bit-exactly), `out/pretrain_512_metrics.jsonl` and `out/pretrain_512_loss.png`.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the old
one (`os.replace` is atomic on POSIX and Windows), so a process killed at any moment leaves either the previous
file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import random
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from torch import nn

from .LMConfig import LMConfig

# Test hook: seconds to pause after the first bytes of a checkpoint are written, so a test can SIGKILL the
# process in the middle of a write. Unset in normal use.
WRITE_PAUSE_ENV = "MINIMIND_CHECKPOINT_WRITE_PAUSE"
TEMP_PREFIX = ".tmp-"


class MissingInputError(FileNotFoundError):
    """A data file, tokenizer or weights file the stage needs is absent; the message says how to get it."""


def require_file(path: str | os.PathLike, how_to_get: str) -> Path:
    """The path, if it exists; else MissingInputError saying what is missing and how to get it."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} not found: {how_to_get}")
    return path


def weights_path(out_dir: str | os.PathLike, stage: str, config: LMConfig) -> Path:
    """`{out_dir}/{stage}_{dim}[_moe].pth`, the names the original MiniMind uses."""
    return Path(out_dir) / f"{stage}_{config.dim}{'_moe' if config.use_moe else ''}.pth"


def resume_path(weights_file: str | os.PathLike) -> Path:
    """The resume file beside a weights file: `pretrain_512.pth` -> `pretrain_512_resume.pth`."""
    weights_file = Path(weights_file)
    return weights_file.with_name(f"{weights_file.stem}_resume.pth")


# The stage script that writes each weights-file prefix, for "run X first" messages.
STAGE_SCRIPTS = {
    "pretrain": "train_pretrain.py",
    "full_sft": "train_full_sft.py",
    "rlhf": "train_dpo.py",
    "reason": "train_distill_reason.py",
    "full_dist": "train_distillation.py",
}


def resolve_from_weight(spec: str, out_dir: str | os.PathLike, config: LMConfig) -> Path | None:
    """--from_weight: 'none' -> None; a stage name ('pretrain') -> OUT_DIR/{stage}_{dim}[_moe].pth; else a path."""
    if spec.lower() == "none":
        return None
    if spec.endswith(".pth") or "/" in spec or "\\" in spec:
        return require_file(spec, "pass an existing weights file to --from_weight (or 'none' to start from scratch)")
    path = weights_path(out_dir, spec, config)
    return require_file(
        path,
        f"run {STAGE_SCRIPTS.get(spec, f'train_{spec}.py')} first with the same --dim/--n_layers/--use_moe and --out_dir, "
        f"or pass --from_weight PATH to another weights file",
    )


class _PausingWriter:
    """File wrapper for the crash test: sleeps once, right after the first write reaches the disk."""

    def __init__(self, file, pause_seconds: float):
        self.file, self.pause_seconds, self.paused = file, pause_seconds, False

    def write(self, data) -> int:
        written = self.file.write(data)
        if not self.paused:
            self.paused = True
            self.file.flush()
            os.fsync(self.file.fileno())
            time.sleep(self.pause_seconds)
        return written

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temp file beside `path`, fsync, then rename it over `path` (and fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (exclusive create), so the file gets the usual umask-based permissions.
    tmp_name = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(tmp_name, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save, atomically (see atomic_write)."""
    pause = float(os.environ.get(WRITE_PAUSE_ENV, "0") or 0)
    atomic_write(path, lambda file: torch.save(obj, _PausingWriter(file, pause) if pause > 0 else file))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text, atomically (see atomic_write)."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def remove_stale_temp_files(folder: str | os.PathLike, final_name: str) -> list[Path]:
    """Delete temp files a killed run left behind for `final_name`; returns what was removed."""
    removed = []
    for stale in Path(folder).glob(f"{TEMP_PREFIX}{final_name}.*"):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU copy with floating-point tensors cast to dtype (the weights file may be saved in half precision)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu() for k, v in state_dict.items()}


def load_state_dict_file(path: str | os.PathLike, what_to_run: str) -> dict[str, torch.Tensor]:
    """Read a weights file, failing with a message that says how to produce it when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"weights file {path} not found: {what_to_run}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    return state_dict


def load_weights(model: nn.Module, path: str | os.PathLike, what_to_run: str) -> None:
    """Load a full weights file into model with strict key checking (any missing/unexpected key is an error)."""
    state_dict = load_state_dict_file(path, what_to_run)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"{path} does not match the model built from the flags (--dim/--n_layers/--use_moe ...): {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Resume state


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (requires_grad), by name; frozen weights are restored from --from_weight."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Restore exactly the trainable parameters; any mismatch with the current model is an error."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = trainable - state_dict.keys(), state_dict.keys() - trainable
    if missing or unexpected:
        raise RuntimeError(
            f"{source} was written for different trainable parameters: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (were the model flags changed since the run that wrote it?)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state_dict.items():
            if params[name].shape != value.shape:
                raise RuntimeError(f"{source}: {name} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(value)


def capture_rng_state(device: torch.device) -> dict:
    """All RNG states this process uses: python, numpy, torch CPU and (when used) CUDA."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    # numpy's key array is stored as a tensor so the file loads with torch.load(weights_only=True)
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too
