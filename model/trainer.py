"""The training loop every stage shares: AMP, AdamW, LR schedule, data order, accumulation, clipping, DDP or
DeepSpeed, checkpoints with exact resume, and reporting. A stage script supplies only what makes it different:

    trainer = Trainer(args, ctx, model, dataset, collate_fn, loss_fn, weights_file=...,
                      export_state_dict=..., frozen_models=[reference_model])
    trainer.fit()

- `loss_fn(model, batch) -> (loss, metrics)`: loss is a scalar tensor (mean over the micro-batch); metrics is a
  dict of scalars to log (e.g. {"aux_loss": ...}). `model` is the wrapped model (DDP / DeepSpeed) to call.
- The parameters with requires_grad=True are trained; freeze the rest before building the Trainer.
- `export_state_dict(model)` says what goes in the weights file (default: the whole state dict; LoRA: adapters).
- `frozen_models` (DPO reference, distillation teacher) are moved to the device and put in eval mode, but never
  wrapped in DDP/DeepSpeed, never optimized and never saved.

Data order and exact resume. Each epoch uses one permutation of the dataset, drawn from (seed, epoch) alone. The
permutation is consumed in global micro-batches of batch_size * world_size samples, rank r taking the r-th
slice of batch_size, and in optimizer steps of accumulation_steps micro-batches. An epoch is floor(N / global
batch) optimizer steps; its last N mod global-batch samples are skipped (a different set every epoch). The
position in the epoch is therefore a sample count, which the resume file stores: resuming recomputes the
permutation and starts from that sample, without reading the skipped batches, and it does so for any world size.
Checkpoints are taken only between optimizer steps, so there is never a half-accumulated gradient to save.

Loss scaling: each micro-batch loss is divided by accumulation_steps and DDP averages gradients over ranks, so
a step's gradient is the mean of the micro-batch mean losses (as in the original MiniMind). With equal-length
micro-batches this equals one process with the whole global batch.
"""
from __future__ import annotations

import argparse
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpoint as ckpt
from .checkpoint import require_file
from .distributed import (
    DistContext,
    barrier,
    check_replicas_in_sync,
    deepspeed_config,
    gather_objects,
    mean_across_ranks,
    uses_deepspeed,
    wrap_ddp,
)
from .train_log import RunLogger, Throughput, format_log_line

LossFn = Callable[[nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]]
RESUME_FORMAT = 1

# ----------------------------------------------------------------------------------------------------------------
# Precision


DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def autocast_context(device: torch.device, dtype_name: str):
    """Autocast to the requested dtype on this device; float32 means no autocast at all."""
    dtype = DTYPE_BY_NAME[dtype_name]
    if dtype == torch.float32:
        return nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise RuntimeError(f"--dtype {dtype_name}: autocast is not available on device {device}; use --dtype float32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype_name: str) -> torch.amp.GradScaler:
    """Loss scaling is needed for float16 only (its small exponent range underflows gradients); bfloat16 and
    float32 get a disabled scaler whose calls pass straight through."""
    return torch.amp.GradScaler(device.type, enabled=dtype_name == "float16")


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


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
    fused = device.type == "cuda"  # one kernel for all tensors; the CPU default (foreach) is already fast
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_iters: int, final_ratio: float = 0.1) -> float:
    """Learning rate for 0-based optimizer step `step`: linear warm-up over warmup_iters steps
    (peak * (step + 1) / warmup_iters), then a cosine from peak down to final_ratio * peak at total_steps."""
    if step < warmup_iters:
        return peak_lr * (step + 1) / warmup_iters
    decay_steps = max(total_steps - warmup_iters, 1)
    progress = min((step - warmup_iters) / decay_steps, 1.0)
    floor = final_ratio * peak_lr
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Data order


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch; the same on every rank and in every run with this seed."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(dataset_size, generator=generator).tolist()


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one epoch, starting `start` samples into the epoch's permutation.

    Global micro-batch m covers permutation[start + m*B*W : start + (m+1)*B*W] (B = batch_size, W = world_size);
    rank r takes its r-th slice of B. Only whole optimizer steps (accumulation_steps micro-batches) are yielded.
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int, world_size: int, accumulation_steps: int,
                 seed: int, epoch: int, start: int = 0):
        self.dataset_size, self.batch_size, self.rank = dataset_size, batch_size, rank
        self.seed, self.epoch, self.start = seed, epoch, start
        self.samples_per_micro_batch = batch_size * world_size
        self.samples_per_step = self.samples_per_micro_batch * accumulation_steps
        self.steps = max(dataset_size - start, 0) // self.samples_per_step
        self.accumulation_steps = accumulation_steps

    def __len__(self) -> int:
        return self.steps * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.dataset_size, self.seed, self.epoch)
        for micro in range(len(self)):
            first = self.start + micro * self.samples_per_micro_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


# ----------------------------------------------------------------------------------------------------------------
# The language-modelling loss shared by pretraining, SFT and friends


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where loss_mask is 1. logits (B, T, V), labels (B, T)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")  # (B*T,)
    mask = loss_mask.flatten().to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                       length_normalize: bool = False) -> torch.Tensor:
    """Log-probability of each row's counted labels: logits (B, T, V), labels (B, T), loss_mask (B, T) -> (B,).

    The sum over the positions where loss_mask is 1, or with length_normalize their mean (a row with no counted
    position gives 0)."""
    logits = logits.float()
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_log_probs = label_logits - torch.logsumexp(logits, dim=-1)  # (B, T): log softmax at the label only
    summed = (token_log_probs * loss_mask).sum(dim=-1)  # (B,)
    if length_normalize:
        return summed / loss_mask.sum(dim=-1).clamp(min=1.0)
    return summed


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a (X, Y, loss_mask) batch: masked cross-entropy plus the MoE balancing loss (0 for dense models)."""
    inputs, labels, loss_mask = batch
    out = model(inputs)
    loss = masked_cross_entropy(out.logits, labels, loss_mask)
    metrics = {"aux_loss": out.aux_loss.detach()} if out.aux_loss.requires_grad else {}
    return loss + out.aux_loss, metrics


def move_to_device(batch, device: torch.device):
    """Tensors (also inside tuples, lists and dicts) to device; non-blocking from pinned memory on CUDA."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    return batch


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds the optimizer, wraps the model for DDP or DeepSpeed, restores a resume file when --resume is set,
    and runs `fit()`: the epochs from the current position until the last step or --max_steps, logging on rank 0
    every --log_interval steps and checkpointing every --save_interval steps and at the end."""

    def __init__(
        self,
        args: argparse.Namespace,
        ctx: DistContext,
        model: nn.Module,
        train_dataset: Dataset,
        collate_fn: Callable,
        loss_fn: LossFn,
        *,
        weights_file: str | Path,
        export_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
        frozen_models: tuple[nn.Module, ...] | list[nn.Module] = (),
    ):
        self.args, self.ctx = args, ctx
        self.model = model.to(ctx.device)
        self.dataset, self.collate_fn, self.loss_fn = train_dataset, collate_fn, loss_fn
        self.weights_file = Path(weights_file)
        self.resume_file = ckpt.resume_path(self.weights_file)
        self.deepspeed_dir = self.resume_file.with_suffix("")  # DeepSpeed's own states: out/pretrain_512_resume/
        self.export_state_dict = export_state_dict or (lambda m: m.state_dict())
        self.use_deepspeed = uses_deepspeed(args)
        # DeepSpeed runs the trained model in --dtype itself (no autocast), so frozen models are cast to the same
        # dtype: a DPO reference must compute exactly what the policy computes at step 0.
        frozen_dtype = getattr(torch, args.dtype) if self.use_deepspeed else None
        for frozen in frozen_models:
            frozen.to(device=ctx.device, dtype=frozen_dtype).eval().requires_grad_(False)
        self.dataset_size = len(train_dataset)
        self.samples_per_step = args.batch_size * ctx.world_size * args.accumulation_steps
        if self.dataset_size < self.samples_per_step:
            raise ValueError(
                f"{args.data_path}: {self.dataset_size} samples are fewer than one optimizer step needs "
                f"(batch_size {args.batch_size} x {ctx.world_size} processes x accumulation_steps {args.accumulation_steps})"
            )
        if ctx.is_main:
            self.weights_file.parent.mkdir(parents=True, exist_ok=True)
            for name in (self.weights_file.name, self.resume_file.name):
                ckpt.remove_stale_temp_files(self.weights_file.parent, name)

        # Progress: optimizer steps done, and the position (epoch, samples consumed in it) in the data order.
        self.step, self.epoch, self.epoch_samples = 0, 0, 0
        self.wandb_run_id: str | None = None
        self.optimizer = build_optimizer(self.model, args.learning_rate, args.weight_decay, ctx.device)
        self.scaler = make_grad_scaler(ctx.device, args.dtype)
        resume_state = self._read_resume_file() if args.resume else None
        if self.use_deepspeed:
            import deepspeed  # slow import, only for DeepSpeed runs

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, config=deepspeed_config(args, ctx.world_size)
            )
            self.train_model: nn.Module = self.engine
            self.autocast = nullcontext()  # DeepSpeed runs the model in the configured bf16/fp16 itself
        else:
            self.engine = None
            if resume_state is not None:
                self._restore_model_and_optimizer(resume_state)
            self.train_model = wrap_ddp(self.model, ctx)
            self.autocast = autocast_context(ctx.device, args.dtype)
        if resume_state is not None:
            self._restore_progress(resume_state)
        else:
            ckpt.seed_everything(args.seed + ctx.rank)

    # ------------------------------------------------------------------------------------------------------------
    # Resume

    def _read_resume_file(self) -> dict:
        path = require_file(self.resume_file, "start without --resume, or point --out_dir at the run to continue")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != RESUME_FORMAT:
            raise ValueError(f"{path}: unknown resume format {state.get('format')!r} (expected {RESUME_FORMAT})")
        if state["dataset_size"] != self.dataset_size:
            raise ValueError(
                f"{path} was written for a dataset of {state['dataset_size']} samples but {self.args.data_path} has "
                f"{self.dataset_size}: the data position would be meaningless"
            )
        if state["seed"] != self.args.seed:
            raise ValueError(f"{path} was written with --seed {state['seed']}; resume with the same seed (data order)")
        if self.use_deepspeed != ("deepspeed" in state):
            raise ValueError(f"{path} was written {'with' if 'deepspeed' in state else 'without'} DeepSpeed; resume the same way")
        return state

    def _restore_model_and_optimizer(self, state: dict) -> None:
        ckpt.load_trainable_state_dict(self.model, state["model"], self.resume_file)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def _restore_progress(self, state: dict) -> None:
        if self.engine is not None:
            ds = state["deepspeed"]
            if ds["zero_stage"] > 0 and state["world_size"] != self.ctx.world_size:
                raise ValueError(
                    f"{self.resume_file}: ZeRO stage {ds['zero_stage']} partitions the optimizer over "
                    f"{state['world_size']} processes; resume with that many processes"
                )
            load_path, _ = self.engine.load_checkpoint(str(self.deepspeed_dir), tag=ds["tag"], load_module_strict=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load tag {ds['tag']!r} from {self.deepspeed_dir}")
        self.step, self.epoch, self.epoch_samples = state["step"], state["epoch"], state["epoch_samples"]
        self.wandb_run_id = state["wandb_run_id"]
        rng_states = state["rng"]
        if len(rng_states) == self.ctx.world_size:
            ckpt.restore_rng_state(rng_states[self.ctx.rank], self.ctx.device)
        else:
            # Another world size: data position is exact, per-rank random streams (dropout) start afresh.
            ckpt.seed_everything(self.args.seed + self.ctx.rank + 1_000_003 * self.step)
        if self.ctx.is_main:
            print(
                f"resumed from {self.resume_file} at step {self.step} (epoch {self.epoch + 1}, sample "
                f"{self.epoch_samples}/{self.dataset_size}; written by {state['world_size']} process(es), "
                f"now {self.ctx.world_size})",
                flush=True,
            )

    def save_checkpoint(self) -> None:
        """Weights file and resume file, both atomic. Every rank must call this (RNG states are gathered)."""
        rng_states = gather_objects(ckpt.capture_rng_state(self.ctx.device), self.ctx)
        deepspeed_state = None
        if self.engine is not None:
            # DeepSpeed writes its (possibly partitioned) states into a new tag folder; our resume file points at
            # it and is replaced only after every rank has finished, so a crash leaves the previous pointer valid.
            tag = f"step_{self.step}"
            self.engine.save_checkpoint(str(self.deepspeed_dir), tag=tag, save_latest=False)
            barrier(self.ctx)
            deepspeed_state = {"tag": tag, "zero_stage": self.engine.zero_optimization_stage()}
        if self.ctx.is_main:
            weights = self.export_state_dict(self.model)
            ckpt.atomic_save(ckpt.cast_state_dict(weights, DTYPE_BY_NAME[self.args.save_dtype]), self.weights_file)
            state = {
                "format": RESUME_FORMAT,
                "step": self.step,
                "epoch": self.epoch,
                "epoch_samples": self.epoch_samples,
                "dataset_size": self.dataset_size,
                "seed": self.args.seed,
                "world_size": self.ctx.world_size,
                "rng": rng_states,
                "wandb_run_id": self.wandb_run_id,
                "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            }
            if deepspeed_state is not None:
                state["deepspeed"] = deepspeed_state
            else:
                state.update(
                    model=ckpt.trainable_state_dict(self.model),
                    optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(),
                )
            ckpt.atomic_save(state, self.resume_file)
            if deepspeed_state is not None:
                for old in self.deepspeed_dir.glob("step_*"):
                    if old.name != deepspeed_state["tag"]:
                        shutil.rmtree(old, ignore_errors=True)
        barrier(self.ctx)

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _loader(self, epoch: int, start: int) -> DataLoader:
        sampler = GlobalBatchSampler(
            self.dataset_size, self.args.batch_size, self.ctx.rank, self.ctx.world_size,
            self.args.accumulation_steps, self.args.seed, epoch, start,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.args.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            # A private generator: creating the iterator would otherwise draw from the global torch RNG.
            generator=torch.Generator().manual_seed(self.args.seed + epoch),
        )

    def total_steps(self) -> int:
        """Optimizer steps of the whole run from the current position (fixes the LR schedule's length)."""
        steps_per_epoch = self.dataset_size // self.samples_per_step
        left_in_epoch = max(self.dataset_size - self.epoch_samples, 0) // self.samples_per_step
        return self.step + left_in_epoch + (self.args.epochs - self.epoch - 1) * steps_per_epoch

    def fit(self) -> None:
        args, ctx = self.args, self.ctx
        total_steps = self.total_steps()
        final_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
        logger = self._make_logger(final_step) if ctx.is_main else None
        if logger is not None:
            self.wandb_run_id = logger.wandb_run_id
        throughput = Throughput(self.step)
        self.train_model.train()
        window = None  # summed [loss, tokens, *metrics] since the last log line, on the device
        window_micro_batches = 0
        last_saved_step = self.step if args.resume else -1

        while self.epoch < args.epochs and self.step < final_step:
            loader = self._loader(self.epoch, self.epoch_samples)
            for micro, batch in enumerate(loader):
                batch = move_to_device(batch, ctx.device)
                boundary = (micro + 1) % args.accumulation_steps == 0
                lr = lr_at(self.step, total_steps, args.learning_rate, args.warmup_iters)
                loss, metrics = self._train_micro_batch(batch, boundary, lr)
                values = torch.stack([loss.detach().float(), torch.tensor(float(batch[0].numel()), device=ctx.device),
                                      *(torch.as_tensor(v, device=ctx.device).float() for v in metrics.values())])
                window = values if window is None else window + values
                window_micro_batches += 1
                if not boundary:
                    continue
                self.step += 1
                self.epoch_samples += self.samples_per_step
                if logger is not None:
                    logger.advance()
                if self.step % args.log_interval == 0 or self.step == final_step:
                    mean = mean_across_ranks(window, ctx) / window_micro_batches
                    tokens = float(mean[1]) * window_micro_batches * ctx.world_size
                    throughput.add_tokens(int(tokens))
                    if logger is not None:
                        self._log(logger, throughput, lr, mean, list(metrics), final_step)
                    window, window_micro_batches = None, 0
                if self.step % args.save_interval == 0 or self.step == final_step:
                    self.save_checkpoint()
                    last_saved_step = self.step
                if self.step >= final_step:
                    break
            else:
                self.epoch, self.epoch_samples = self.epoch + 1, 0

        if last_saved_step != self.step:
            self.save_checkpoint()
        check_replicas_in_sync(self.model, ctx)
        if logger is not None:
            if ctx.world_size > 1:
                logger.print(f"replicas in sync across {ctx.world_size} ranks")
            logger.print(f"saved {self.weights_file} (step {self.step}) and {self.resume_file}")
            logger.close()

    def _train_micro_batch(self, batch, boundary: bool, lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; on the last one of a step (`boundary`) also the update."""
        if self.engine is not None:
            loss, metrics = self.loss_fn(self.engine, batch)
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            # engine.step() is called on every micro-batch: DeepSpeed counts them and updates on the boundary
            # (clipping by gradient_clipping, stepping, zeroing gradients).
            if self.engine.is_gradient_accumulation_boundary() != boundary:
                raise RuntimeError("DeepSpeed's gradient-accumulation boundary differs from the trainer's")
            if boundary:
                self._set_lr(lr)
            self.engine.step()
            return loss, metrics
        # DDP: all-reduce gradients only on the last micro-batch of the step.
        sync = boundary or not isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        with nullcontext() if sync else self.train_model.no_sync():
            with self.autocast:
                loss, metrics = self.loss_fn(self.train_model, batch)
            self.scaler.scale(loss / self.args.accumulation_steps).backward()
        if boundary:
            self._set_lr(lr)
            if self.args.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.args.grad_clip)
            self.scaler.step(self.optimizer)  # skipped by the scaler if float16 gradients overflowed
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, metrics

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _make_logger(self, final_step: int) -> RunLogger:
        args = self.args
        stem = self.weights_file.stem
        run_name = args.wandb_run_name or f"{stem}-ep{args.epochs}-bs{args.batch_size}-lr{args.learning_rate:g}"
        return RunLogger(
            metrics_path=self.weights_file.with_name(f"{stem}_metrics.jsonl"),
            png_path=self.weights_file.with_name(f"{stem}_loss.png"),
            title=f"{stem}: training loss",
            total_steps=final_step,
            start_step=self.step,
            resumed=bool(args.resume),
            wandb_config=vars(args) if args.use_wandb else None,
            wandb_project=args.wandb_project,
            wandb_run_name=run_name,
            wandb_run_id=self.wandb_run_id,
            out_dir=self.weights_file.parent,
        )

    def _log(self, logger: RunLogger, throughput: Throughput, lr: float, mean: torch.Tensor, metric_names: list[str],
             final_step: int) -> None:
        tokens_per_sec, elapsed, eta = throughput.report(self.step, final_step)
        extra = {name: float(value) for name, value in zip(metric_names, mean[2:])}
        loss = float(mean[0])
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
               "elapsed": elapsed, **extra}
        line = format_log_line(self.epoch, self.args.epochs, self.step, final_step, loss, lr, tokens_per_sec,
                               elapsed, eta, extra)
        logger.log(row, line)
