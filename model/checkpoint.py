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
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from torch import nn

from .common import STAGE_SCRIPTS, WeightsMismatchError, require_file
from .LMConfig import LMConfig

TEMP_PREFIX = ".tmp-"


def weights_path(out_dir: str | os.PathLike, stage: str, config: LMConfig) -> Path:
    """`{out_dir}/{stage}_{dim}[_moe].pth`, the names the original MiniMind uses."""
    return Path(out_dir) / f"{stage}_{config.dim}{'_moe' if config.use_moe else ''}.pth"


def resume_path(weights_file: str | os.PathLike) -> Path:
    """The resume file beside a weights file: `pretrain_512.pth` -> `pretrain_512_resume.pth`."""
    weights_file = Path(weights_file)
    return weights_file.with_name(f"{weights_file.stem}_resume.pth")


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
    atomic_write(path, lambda file: torch.save(obj, file))


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


def describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state_dict` from loading into `model` with strict=True, in one line (None if it fits)."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    reshaped = [f"{name} is {tuple(state_dict[name].shape)} in the file but {tuple(tensor.shape)} in the model"
                for name, tensor in expected.items() if name in state_dict and state_dict[name].shape != tensor.shape]
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} {what} key(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatch(es) ({'; '.join(reshaped[:2])}{'; ...' if len(reshaped) > 2 else ''})")
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------------------------------------------
# Resume state


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (requires_grad), by name; frozen weights are restored from --from_weight."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Restore exactly the trainable parameters; any mismatch with the current model is a WeightsMismatchError."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = trainable.keys() - state_dict.keys(), state_dict.keys() - trainable.keys()
    reshaped = [name for name in trainable.keys() & state_dict.keys() if trainable[name].shape != state_dict[name].shape]
    if missing or unexpected or reshaped:
        raise WeightsMismatchError(
            f"{source} was written for other trainable parameters (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}, other shapes {sorted(reshaped)[:3]}): resume with the model flags of the run "
            f"that wrote it")
    with torch.no_grad():
        for name, value in state_dict.items():
            trainable[name].copy_(value)


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
