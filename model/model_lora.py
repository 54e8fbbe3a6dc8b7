"""LoRA (Hu et al., 2021) from scratch: y = W x + (alpha / rank) * B(A(x)), with W frozen.

Each targeted nn.Linear gets a child module `lora` (A: in->rank, random; B: rank->out, zero, so a fresh adapter
changes nothing) and a forward hook that adds its output. The base weight keeps its name, so base checkpoints
still load with strict=True, and adapter files hold only `...{target}.lora.{A,B}.weight` entries (the key layout
of the original MiniMind adapters; files always hold scale-1 adapters, the scale alpha/rank folded into B).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_save
from .common import WeightsMismatchError, read_checkpoint

DEFAULT_TARGETS = ("wq", "wo")  # the square attention projections, as the original MiniMind
ALL_LINEAR = "all"  # every nn.Linear inside the decoder blocks (wq, wk, wv, wo, w1, w2, w3)


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.scale = alpha / rank
        self.merged = False  # True while the update lives inside the base weight
        nn.init.normal_(self.A.weight, std=0.02)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, (out, in)."""
        return (self.B.weight @ self.A.weight) * self.scale


def _add_lora_output(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    if module.lora.merged:
        return output
    return output + module.lora(inputs[0]).to(output.dtype)


def _targeted_linears(model: nn.Module, targets: Iterable[str] | str) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the linears inside `layers` whose last name part is in targets ("all" = every one)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith("layers.") or ".lora." in name:
            continue
        if targets == ALL_LINEAR or name.rsplit(".", 1)[-1] in targets:
            found.append((name, module))
    if not found:
        raise ValueError(f"no nn.Linear in model.layers matches LoRA targets {targets!r}")
    return found


def parse_targets(spec: str) -> tuple[str, ...] | str:
    """CLI helper: "wq,wo" -> ("wq", "wo"); "all" -> "all"."""
    spec = spec.strip()
    return ALL_LINEAR if spec == ALL_LINEAR else tuple(t.strip() for t in spec.split(",") if t.strip())


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    targets: Iterable[str] | str = DEFAULT_TARGETS,
    freeze_base: bool = True,
) -> list[str]:
    """Attach adapters (alpha defaults to rank, i.e. scale 1). Returns the names of the adapted modules."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    adapted = []
    for name, linear in _targeted_linears(model, targets):
        if hasattr(linear, "lora"):
            raise ValueError(f"{name} already has a LoRA adapter")
        lora = LoRA(linear.in_features, linear.out_features, rank, alpha)
        linear.lora = lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.register_forward_hook(_add_lora_output)
        adapted.append(name)
    if freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad = ".lora." in name
    return adapted


def lora_modules(model: nn.Module) -> list[LoRA]:
    return [m for m in model.modules() if isinstance(m, LoRA)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, e.g. `layers.0.attention.wq.lora.A.weight`, with the scale alpha/rank folded into B:
    every file is then a scale-1 adapter (the original MiniMind format) that fully defines its update, whatever
    alpha it was trained with."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRA):
            state[f"{name}.A.weight"] = module.A.weight.detach()
            state[f"{name}.B.weight"] = module.B.weight.detach() * module.scale
    if not state:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    return state


def save_lora(model: nn.Module, path: str) -> None:
    """Write the adapter-only file atomically (temp file + rename)."""
    atomic_save({k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, path)


def lora_path(out_dir: str | os.PathLike, lora_name: str, dim: int) -> Path:
    """Where an adapter lives: `{out_dir}/lora/{lora_name}_{dim}.pth`."""
    return Path(out_dir) / "lora" / f"{lora_name}_{dim}.pth"


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter weights of a file written by save_lora (a DDP `module.` prefix is dropped)."""
    state = read_checkpoint(path, "train one with train_lora.py --lora_name NAME", "LoRA adapter")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_lora(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load an adapter file (or its already-read `state`) into adapters attached with apply_lora; names and shapes
    must match exactly (else WeightsMismatchError)."""
    state = read_lora_file(path) if state is None else state
    modules = {f"{name}.": m for name, m in model.named_modules() if isinstance(m, LoRA)}
    expected = {f"{prefix}{part}.weight": getattr(m, part).weight for prefix, m in modules.items() for part in ("A", "B")}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if not modules or missing or unexpected or reshaped:
        raise WeightsMismatchError(
            f"{path} does not fit the attached adapters (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}, other shapes {reshaped[:3]}): check --lora_rank / --lora_targets / the model size")
    with torch.no_grad():
        for prefix, lora in modules.items():
            lora.A.weight.copy_(state[f"{prefix}A.weight"])
            lora.B.weight.copy_(state[f"{prefix}B.weight"] / lora.scale)  # files store scale-1 adapters


def rank_and_targets(state: dict[str, torch.Tensor]) -> tuple[int, tuple[str, ...]]:
    """Rank and target names of adapter weights, so a file can be attached without extra flags."""
    targets = sorted({k.split(".lora.")[0].rsplit(".", 1)[-1] for k in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight"))
    return rank, tuple(targets)


def attach_lora_file(model: nn.Module, path: str) -> list[str]:
    """Attach adapters shaped like the file (rank and targets read from it), load it and freeze the base."""
    state = read_lora_file(path)
    rank, targets = rank_and_targets(state)
    adapted = apply_lora(model, rank=rank, targets=targets, freeze_base=True)
    load_lora(model, path, state)
    return adapted


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale * B A); outputs stay the same."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora") and not module.lora.merged:
            module.weight += module.lora.delta_weight().to(module.weight.dtype)
            module.lora.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W -= scale * B A), so the adapter can be trained or swapped again."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora") and module.lora.merged:
            module.weight -= module.lora.delta_weight().to(module.weight.dtype)
            module.lora.merged = False


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain base-model state dict with the adapters folded in (the model itself is left as it is):
    a standalone weights file that the model core loads with strict=True."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora." not in k}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora") and not module.lora.merged:
            state[f"{name}.weight"] += module.lora.delta_weight().to(module.weight.dtype)
    return state
