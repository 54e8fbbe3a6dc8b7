"""What runs underneath the training loop: plain PyTorch (one process, or DDP under torchrun) or DeepSpeed ZeRO.

Both offer the same small interface, so `Trainer.fit` is one straight path (as Lightning Fabric lets litgpt's is):

    with backend.accumulating(last):             # `last`: this micro-batch completes an optimizer step
        with backend.autocast():
            loss, metrics = loss_fn(backend.model, batch)
        backend.backward(loss)
    if last:
        backend.step(lr)

`backend.model` is what the loss function calls (the DDP wrapper or the DeepSpeed engine), `backend.state(tag)`
returns what a resume file must hold to continue exactly, `backend.load(state)` restores it.

Speed. With --compile the backend compiles the trained model (PyTorch: torch.compile before the DDP wrapper, as
nanoGPT does; DeepSpeed: engine.compile()), so the loop calls the compiled model without knowing it; weights,
optimizer and checkpoints keep using the plain module. The first steps (and the first of each new batch shape)
are slow while it compiles. AdamW runs fused (one kernel for all tensors) on CUDA and on the CPU.

Precision. PyTorch: autocast to --dtype, with a GradScaler for float16 only (its narrow exponent range underflows
gradients); float32 means no autocast at all. DeepSpeed runs the model in the configured bf16/fp16 itself, so it
gets no autocast, and the Trainer casts frozen helper models (DPO reference, teacher) to that dtype too.
"""
from __future__ import annotations

import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import checkpoint as ckpt
from .common import CheckpointError, ConfigError, torch_dtype
from .distributed import DistContext, barrier, deepspeed_config, wrap_ddp

if TYPE_CHECKING:
    from .trainer import TrainSettings


def resolve_training_dtype(name: str, device: torch.device) -> str:
    """What --dtype auto means on this device: bfloat16 autocast on GPUs that have it (float16 on older GPUs), on
    Macs, and on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX); float32 on other CPUs, where
    bfloat16 is emulated and a training step gets far slower, not faster (measured on a 2-core AVX2 EPYC: the
    26M model's backward pass took 50 s in bfloat16 against 1.2 s in float32)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "float32"
    return "bfloat16"


def autocast_context(device: torch.device, dtype_name: str) -> AbstractContextManager:
    """Autocast to the requested dtype on this device; float32 means no autocast at all."""
    dtype = torch_dtype(dtype_name)
    if dtype == torch.float32:
        return nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"--dtype {dtype_name}: autocast is not available on device {device}; use --dtype float32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype_name: str) -> torch.amp.GradScaler:
    """Loss scaling for float16 only; bfloat16 and float32 get a disabled scaler whose calls pass straight through."""
    return torch.amp.GradScaler(device.type, enabled=dtype_name == "float16")


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices (ndim >= 2) only, not on norms or biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cuda", "cpu")  # one kernel for all tensors (on this project's CPU: 0.03 s, not 0.1 s)
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TorchBackend:
    """One process, or DDP across the processes torchrun started. The resume state holds the trainable weights,
    the optimizer and the loss scaler."""

    name = "torch"
    frozen_dtype: torch.dtype | None = None  # frozen helper models keep their dtype; autocast runs them in --dtype

    def __init__(self, model: nn.Module, settings: TrainSettings, ctx: DistContext):
        self.module, self.settings, self.ctx = model, settings, ctx
        self.optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay, ctx.device)
        self.scaler = make_grad_scaler(ctx.device, settings.dtype)
        self.model = wrap_ddp(torch.compile(model) if settings.compile else model, ctx)
        self.autocast()  # an unusable --dtype fails here, before any data is read

    def accumulating(self, last: bool) -> AbstractContextManager:
        """DDP all-reduces gradients only in the backward of a step's last micro-batch."""
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()

    def autocast(self) -> AbstractContextManager:
        return autocast_context(self.ctx.device, self.settings.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.settings.accumulation_steps).backward()

    def step(self, lr: float) -> None:
        """Clip, step (skipped by the scaler if float16 gradients overflowed) and clear the gradients."""
        set_learning_rate(self.optimizer, lr)
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self, tag: str) -> dict:
        return {"model": ckpt.trainable_state_dict(self.module), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load(self, state: dict, source: Path) -> None:
        ckpt.load_trainable_state_dict(self.module, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def saved(self, state: dict) -> None:
        """Called on rank 0 once the resume file holding `state` is in place."""


class DeepSpeedBackend:
    """DeepSpeed ZeRO 0/1/2 (--deepspeed CONFIG or --zero_stage N). DeepSpeed writes its own, possibly partitioned,
    states into a tag folder beside the resume file (out/pretrain_512_resume/step_N/); the resume file only points
    at the tag, and is replaced after every rank has written, so a crash leaves the previous pointer valid."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, settings: TrainSettings, ctx: DistContext, states_dir: Path):
        import deepspeed  # slow import, only for DeepSpeed runs

        self.settings, self.ctx, self.states_dir = settings, ctx, states_dir
        optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay, ctx.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(settings, ctx.world_size))
        if settings.compile:
            self.engine.compile()
        self.model = self.engine
        self.frozen_dtype = torch_dtype(settings.dtype)
        self.last = False

    def accumulating(self, last: bool) -> AbstractContextManager:
        self.last = last
        return nullcontext()

    def autocast(self) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward divides by gradient_accumulation_steps itself. DeepSpeed counts micro-batches in
        engine.step(), so it is called after every backward; it updates only on the step's last micro-batch."""
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary() != self.last:
            raise RuntimeError("DeepSpeed's gradient-accumulation boundary differs from the trainer's")
        if not self.last:
            self.engine.step()

    def step(self, lr: float) -> None:
        """Clip (gradient_clipping), step and clear the gradients: DeepSpeed does all three in engine.step()."""
        set_learning_rate(self.optimizer, lr)
        self.engine.step()

    def state(self, tag: str) -> dict:
        """Every rank writes its part; returns the resume file's pointer to it."""
        self.engine.save_checkpoint(str(self.states_dir), tag=tag, save_latest=False)
        barrier(self.ctx)
        return {"deepspeed": {"tag": tag, "zero_stage": self.engine.zero_optimization_stage()}}

    def load(self, state: dict, source: Path) -> None:
        pointer = state["deepspeed"]
        if pointer["zero_stage"] > 0 and state["world_size"] != self.ctx.world_size:
            raise ConfigError(f"{source}: ZeRO stage {pointer['zero_stage']} partitions the optimizer over "
                              f"{state['world_size']} processes; resume with that many processes")
        load_path, _ = self.engine.load_checkpoint(str(self.states_dir), tag=pointer["tag"], load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"{source}: DeepSpeed could not load tag {pointer['tag']!r} from {self.states_dir}")

    def saved(self, state: dict) -> None:
        """Remove the tag folders older than the one the resume file now points at."""
        for old in self.states_dir.glob("step_*"):
            if old.name != state["deepspeed"]["tag"]:
                shutil.rmtree(old, ignore_errors=True)


Backend = TorchBackend | DeepSpeedBackend


def make_backend(model: nn.Module, settings: TrainSettings, ctx: DistContext, states_dir: Path) -> Backend:
    if settings.uses_deepspeed:
        return DeepSpeedBackend(model, settings, ctx, states_dir)
    return TorchBackend(model, settings, ctx)
