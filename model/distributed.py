"""Devices and processes: one code path for `python`, `torchrun` (DDP) and `deepspeed` launches.

torchrun and the deepspeed launcher both export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; when
they are present we join the process group (NCCL on CUDA, gloo otherwise). Under plain `python` there is one
process and no process group, except for DeepSpeed, which always wants one, so we provide a single-process
rendezvous for it. Only rank 0 prints and writes files.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .common import ConfigError, require_file, select_device

if TYPE_CHECKING:
    from .trainer import TrainSettings


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device_name: str = "auto", use_deepspeed: bool = False) -> DistContext:
    """Join the process group if a launcher started us (or DeepSpeed needs one) and pick this rank's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if use_deepspeed and not launched:
        # DeepSpeed needs a process group even for one process; without these it looks for MPI.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        launched = True
    if not launched:
        return DistContext(rank=0, local_rank=0, world_size=1, device=select_device(device_name))

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed  # imported lazily: it is slow to import and only needed here

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def cleanup_distributed(finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on every rank, wait for all ranks first, so none
    tears down its connections while another still uses them (a crash at exit otherwise, now and then)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around the trained model when there are several processes (else the model itself).
    Frozen helper models (DPO reference, distillation teacher) are never wrapped: they have no gradients to sync."""
    if not ctx.is_distributed or ctx.world_size == 1:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise mean of a float tensor over all ranks (a copy; the input is not modified)."""
    values = values.detach().clone()
    if ctx.is_distributed and ctx.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def gather_objects(obj: object, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. RNG states)."""
    if not ctx.is_distributed or ctx.world_size == 1:
        return [obj]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_replicas_in_sync(model: nn.Module, ctx: DistContext) -> None:
    """Raise if any rank holds different parameter values than rank 0 (data-parallel replicas must not drift).

    Compares a float64 checksum per parameter tensor (sum and sum of squares weighted by position), which any
    single changed element alters."""
    if not ctx.is_distributed or ctx.world_size == 1:
        return
    checksums = []
    for p in model.parameters():
        flat = p.detach().double().flatten()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        checksums.append(torch.stack([(flat * weights).sum(), (flat * flat).sum()]))
    local = torch.stack(checksums).cpu()  # (n_params, 2)
    everyone = gather_objects(local, ctx)
    for rank, other in enumerate(everyone[1:], start=1):
        if not torch.equal(other, everyone[0]):
            raise RuntimeError(f"model replicas diverged: rank {rank} differs from rank 0 after training")


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


def uses_deepspeed(args: argparse.Namespace) -> bool:
    return args.deepspeed is not None or args.zero_stage is not None


def deepspeed_config(args: argparse.Namespace | TrainSettings, world_size: int) -> dict:
    """The DeepSpeed config: --deepspeed FILE (its "auto" values filled from the flags) or --zero_stage N.

    The flags stay the single source of truth for batch size, accumulation, clipping and precision, because the
    data order depends on them; a config file that sets one of them to a different value is an error. The
    trainer supplies AdamW and the LR schedule, so the config must not define an optimizer or scheduler."""
    if args.deepspeed is not None:
        path = require_file(args.deepspeed, "pass a DeepSpeed JSON config such as the ds_config.json in the repository",
                            "DeepSpeed config")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    else:
        config = {}
    source = args.deepspeed or "--zero_stage"
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"{source}: remove the '{section}' section; the trainer provides AdamW and the LR schedule")
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    stage = config.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{source}: zero_optimization.stage={stage} is not supported (use 0, 1 or 2)")

    def fill(keys: tuple[str, ...], value) -> None:
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            raise ConfigError(f"{source}: {'.'.join(keys)}={current!r} contradicts the command-line flags ({value!r}); set it to \"auto\"")

    fill(("train_micro_batch_size_per_gpu",), args.batch_size)
    fill(("gradient_accumulation_steps",), args.accumulation_steps)
    fill(("train_batch_size",), args.batch_size * args.accumulation_steps * world_size)
    fill(("gradient_clipping",), float(args.grad_clip))
    fill(("bf16", "enabled"), args.dtype == "bfloat16")
    fill(("fp16", "enabled"), args.dtype == "float16")
    config.setdefault("steps_per_print", 2**31 - 1)  # the trainer does the logging
    return config
