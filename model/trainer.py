"""The training loop every stage shares: LR schedule, data order, accumulation, checkpoints with exact resume and
reporting, on top of a backend (model/backend.py: PyTorch with AMP and DDP, or DeepSpeed) that runs the steps. A
stage script supplies only what makes it different:

    trainer = Trainer(train_settings(args), ctx, model, dataset, collate_fn, loss_fn, weights_file=...,
                      export_state_dict=..., frozen_models=[reference_model])
    trainer.fit()

- `collate_fn` returns a `model.dataset.Batch` (PadCollator, PackedCollator, DPOCollator do).
- `loss_fn(model, batch) -> (loss, metrics)`: loss is a scalar tensor (mean over the micro-batch); metrics is a
  dict of scalar tensors to log (e.g. {"aux_loss": ...}). `model` is the wrapped model (DDP / DeepSpeed, compiled
  with --compile) to call, with `document_ids=batch.document_ids` so that packed rows stay apart.
- The parameters with requires_grad=True are trained; freeze the rest before building the Trainer.
- `export_state_dict(model)` says what goes in the weights file (default: the whole state dict; LoRA: adapters).
- `frozen_models` (DPO reference, distillation teacher) are moved to the device and put in eval mode, but never
  wrapped in DDP/DeepSpeed, never optimized and never saved.
- `stage_state`: an object with `state_dict()` / `load_state_dict(state)` whose (per-rank) state goes into the
  resume file, for a stage that carries state from step to step (RL: the batch of rollouts being reused).
- `updates_per_batch` (settings) R > 1 makes R optimizer steps in a row on each step's data (see GlobalBatchSampler).

Data order and exact resume. Each epoch uses one permutation of the dataset, drawn from (seed, epoch) alone. The
permutation is consumed in global micro-batches of batch_size * world_size samples, rank r taking the r-th
slice of batch_size, and in optimizer steps of accumulation_steps micro-batches. An epoch is ceil(N / global
batch) optimizer steps, so every sample is trained on: the last step is filled up with the first samples of the
permutation again. The position in the epoch is therefore a sample count, which the resume file stores: resuming
recomputes the permutation and starts from that sample, without reading the batches before it, and it does so
for any world size.
Checkpoints are taken only between optimizer steps, so there is never a half-accumulated gradient to save.

Packed data (model.dataset.PackedDataset) needs nothing special here: a sample is a row of whole documents, and
the packing plan is fixed when the dataset is built, so all of the above holds for rows.

The loop itself never waits for the device: losses and metrics are summed on the device and the token counts on
the host, and both are read (and reduced across ranks) only on log steps. (The model can still wait: an MoE
model's expert routing, and float16's overflow check, do every step.) tokens/s counts useful tokens, not padding.

Loss scaling: each micro-batch loss is divided by accumulation_steps and DDP averages gradients over ranks, so
a step's gradient is the mean of the micro-batch mean losses (as in the original MiniMind). With equal-length
micro-batches this equals one process with the whole global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpoint as ckpt
from .backend import make_backend, resolve_training_dtype
from .common import CheckpointError, ConfigError, read_checkpoint, torch_dtype
from .dataset import Batch
from .distributed import DistContext, barrier, check_replicas_in_sync, gather_objects, mean_across_ranks
from .model import LMOutput
from .train_log import RunLogger, Throughput, format_log_line, peak_flops, training_flops

LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
RESUME_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainSettings:
    """Everything the Trainer reads, built from the command-line flags by model.cli.train_settings (a test can
    build one directly). The flags of the same names document each field for users."""

    # Data order and horizon
    epochs: int = 1  # passes over the data
    batch_size: int = 32  # samples per micro-batch per process
    accumulation_steps: int = 1  # micro-batches per optimizer step
    updates_per_batch: int = 1  # optimizer steps on each step's data in a row (RL: updates per batch of rollouts)
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs)
    seed: int = 1337  # the data order and, as seed + rank, every rank's random streams
    num_workers: int = 0  # DataLoader worker processes
    data_path: str = ""  # the training file, named in messages
    # Optimisation
    learning_rate: float = 5e-4  # peak learning rate
    warmup_iters: int = 0  # linear warm-up steps, then a cosine down to 10% of the peak
    weight_decay: float = 0.01  # AdamW weight decay, on matrices only
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # Precision and backend
    dtype: str = "auto"  # autocast dtype, float16 adding a GradScaler (auto: backend.resolve_training_dtype);
    # DeepSpeed runs the model in it
    compile: bool = False  # torch.compile the trained model (the backend applies it)
    deepspeed: str | None = None  # a DeepSpeed JSON config ("auto" values are filled in from these settings)
    zero_stage: int | None = None  # DeepSpeed with this ZeRO stage (0, 1, 2), without a config file
    # Checkpoints and reporting
    save_interval: int = 100  # optimizer steps between checkpoints (one is always written at the end)
    save_dtype: str = "float32"  # dtype of the weights file; the resume file is always exact
    resume: bool = False  # continue from the resume file beside the weights file
    log_interval: int = 100  # optimizer steps between log lines
    use_wandb: bool = False  # log to Weights & Biases
    wandb_project: str = "MiniMind"
    wandb_run_name: str | None = None  # default: the weights file's stem with epochs, batch size and LR
    flags: dict = field(default_factory=dict)  # every command-line flag, recorded in the resume file and in wandb

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed is not None or self.zero_stage is not None


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


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


def steps_to_cover(samples: int, samples_per_step: int) -> int:
    """Optimizer steps needed to see `samples` samples, the last one possibly part-filled (ceil division)."""
    return max(0, -(-samples // samples_per_step))


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one epoch, starting `start` samples into the epoch's permutation.

    Global micro-batch m covers permutation[start + m*B*W : start + (m+1)*B*W] (B = batch_size, W = world_size);
    rank r takes its r-th slice of B. An epoch is a whole number of optimizer steps (accumulation_steps
    micro-batches each) that covers every sample: the last step, where the permutation runs out, is filled from its
    beginning again (as torch's DistributedSampler pads), so every step and every rank has the same shape.
    With `repeats` R > 1 each step's micro-batches come R times in a row (R optimizer steps on the same data, as
    RL stages update several times on one batch of rollouts); `skip` leaves out the first repeats of the first step
    (a run resumed between them).
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int, world_size: int, accumulation_steps: int,
                 seed: int, epoch: int, start: int = 0, repeats: int = 1, skip: int = 0):
        self.dataset_size, self.batch_size, self.rank = dataset_size, batch_size, rank
        self.seed, self.epoch, self.start = seed, epoch, start
        self.samples_per_micro_batch = batch_size * world_size
        self.samples_per_step = self.samples_per_micro_batch * accumulation_steps
        self.steps = steps_to_cover(dataset_size - start, self.samples_per_step)
        self.accumulation_steps, self.repeats, self.skip = accumulation_steps, repeats, skip

    def __len__(self) -> int:
        return (self.steps * self.repeats - self.skip) * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.dataset_size, self.seed, self.epoch)
        for step in range(self.steps):
            for _ in range(self.repeats - (self.skip if step == 0 else 0)):
                for micro in range(step * self.accumulation_steps, (step + 1) * self.accumulation_steps):
                    first = self.start + micro * self.samples_per_micro_batch + self.rank * self.batch_size
                    yield [order[i % self.dataset_size] for i in range(first, first + self.batch_size)]


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


def with_moe_aux_loss(loss: torch.Tensor, out: LMOutput, metrics: dict[str, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A stage's loss plus the MoE load-balancing loss of the forward pass that made it (0 for dense models and
    in eval mode), which is also logged as `aux_loss` while an MoE model trains. Every loss function ends here."""
    metrics = dict(metrics or {})
    if out.aux_loss.requires_grad:
        metrics["aux_loss"] = out.aux_loss.detach()
    return loss + out.aux_loss, metrics


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a padded or packed batch: masked cross-entropy plus the MoE balancing loss."""
    out = model(batch.input_ids, document_ids=batch.document_ids)
    return with_moe_aux_loss(masked_cross_entropy(out.logits, batch.labels, batch.loss_mask), out)


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds the backend (optimizer; DDP or DeepSpeed), restores a resume file when asked to, and runs `fit()`:
    the epochs from the current position until the last step or max_steps, logging on rank 0 every log_interval
    steps and checkpointing every save_interval steps and at the end."""

    def __init__(
        self,
        settings: TrainSettings,
        ctx: DistContext,
        model: nn.Module,
        train_dataset: Dataset,
        collate_fn: Callable,
        loss_fn: LossFn,
        *,
        weights_file: str | Path,
        export_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
        frozen_models: tuple[nn.Module, ...] | list[nn.Module] = (),
        stage_state: object | None = None,
    ):
        settings = replace(settings, dtype=resolve_training_dtype(settings.dtype, ctx.device))
        self.settings, self.ctx = settings, ctx
        self.model = model.to(ctx.device)
        self.dataset, self.collate_fn, self.loss_fn = train_dataset, collate_fn, loss_fn
        self.weights_file = Path(weights_file)
        self.resume_file = ckpt.resume_path(self.weights_file)
        self.export_state_dict = export_state_dict or (lambda m: m.state_dict())
        self.stage_state = stage_state
        self.dataset_size = len(train_dataset)
        self.samples_per_step = settings.batch_size * ctx.world_size * settings.accumulation_steps
        if self.dataset_size < self.samples_per_step:
            raise ConfigError(
                f"{settings.data_path}: {self.dataset_size} samples are fewer than one optimizer step needs "
                f"(batch_size {settings.batch_size} x {ctx.world_size} processes x accumulation_steps "
                f"{settings.accumulation_steps})")
        if ctx.is_main:
            self.weights_file.parent.mkdir(parents=True, exist_ok=True)
            for name in (self.weights_file.name, self.resume_file.name):
                ckpt.remove_stale_temp_files(self.weights_file.parent, name)

        # Progress: optimizer steps done, and the position (epoch, samples consumed in it, and with
        # updates_per_batch > 1 the updates already made on the current step's data) in the data order.
        self.step, self.epoch, self.epoch_samples, self.repeat = 0, 0, 0, 0
        self.wandb_run_id: str | None = None
        resume_state = self._read_resume_file() if settings.resume else None
        # DeepSpeed keeps its own states in a folder beside the resume file: out/pretrain_512_resume/
        self.backend = make_backend(self.model, settings, ctx, states_dir=self.resume_file.with_suffix(""))
        for frozen in frozen_models:  # a DPO reference must compute exactly what the policy computes at step 0
            frozen.to(device=ctx.device, dtype=self.backend.frozen_dtype).eval().requires_grad_(False)
        if resume_state is not None:
            self._restore(resume_state)
        else:
            ckpt.seed_everything(settings.seed + ctx.rank)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints and resume

    def _read_resume_file(self) -> dict:
        state = read_checkpoint(self.resume_file, "start without --resume, or point --out_dir at the run to "
                                                       "continue", "resume file")
        path = self.resume_file
        if state.get("format") != RESUME_FORMAT:
            raise CheckpointError(f"{path}: unknown resume format {state.get('format')!r} (expected {RESUME_FORMAT})")
        if state["dataset_size"] != self.dataset_size:
            raise ConfigError(
                f"{path} was written for a dataset of {state['dataset_size']} samples but {self.settings.data_path} "
                f"has {self.dataset_size}: the data position would be meaningless")
        if state["seed"] != self.settings.seed:
            raise ConfigError(f"{path} was written with --seed {state['seed']}; resume with the same seed (data order)")
        if self.settings.uses_deepspeed != ("deepspeed" in state):
            raise ConfigError(f"{path} was written {'with' if 'deepspeed' in state else 'without'} DeepSpeed; "
                              f"resume the same way")
        return state

    def _restore(self, state: dict) -> None:
        self.backend.load(state, self.resume_file)
        self.step, self.epoch, self.epoch_samples = state["step"], state["epoch"], state["epoch_samples"]
        self.repeat = state.get("repeat", 0)
        if self.stage_state is not None:
            if len(state["stage"]) != self.ctx.world_size:
                raise ConfigError(f"{self.resume_file} holds the stage state of {len(state['stage'])} process(es); "
                                  f"resume with as many")
            self.stage_state.load_state_dict(state["stage"][self.ctx.rank])
        self.wandb_run_id = state["wandb_run_id"]
        rng_states = state["rng"]
        if len(rng_states) == self.ctx.world_size:
            ckpt.restore_rng_state(rng_states[self.ctx.rank], self.ctx.device)
        else:
            # Another world size: data position is exact, per-rank random streams (dropout) start afresh.
            ckpt.seed_everything(self.settings.seed + self.ctx.rank + 1_000_003 * self.step)
        if self.ctx.is_main:
            print(
                f"resumed from {self.resume_file} at step {self.step} (epoch {self.epoch + 1}, sample "
                f"{min(self.epoch_samples, self.dataset_size)}/{self.dataset_size}; written by {state['world_size']} process(es), "
                f"now {self.ctx.world_size})",
                flush=True,
            )

    def save_checkpoint(self) -> None:
        """Weights file and resume file, both atomic. Every rank must call this (RNG states are gathered, and
        DeepSpeed writes every rank's part)."""
        rng_states = gather_objects(ckpt.capture_rng_state(self.ctx.device), self.ctx)
        stage_states = gather_objects(self.stage_state.state_dict(), self.ctx) if self.stage_state is not None else None
        backend_state = self.backend.state(tag=f"step_{self.step}")
        if self.ctx.is_main:
            weights = self.export_state_dict(self.model)
            ckpt.atomic_save(ckpt.cast_state_dict(weights, torch_dtype(self.settings.save_dtype)), self.weights_file)
            state = {
                "format": RESUME_FORMAT,
                "step": self.step,
                "epoch": self.epoch,
                "epoch_samples": self.epoch_samples,
                "repeat": self.repeat,
                **({"stage": stage_states} if stage_states is not None else {}),
                "dataset_size": self.dataset_size,
                "seed": self.settings.seed,
                "world_size": self.ctx.world_size,
                "rng": rng_states,
                "wandb_run_id": self.wandb_run_id,
                "args": {k: v for k, v in self.settings.flags.items() if isinstance(v, (int, float, str, bool, type(None)))},
                **backend_state,
            }
            ckpt.atomic_save(state, self.resume_file)
            self.backend.saved(backend_state)
        barrier(self.ctx)

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _loader(self, epoch: int, start: int, skip: int = 0) -> DataLoader:
        settings = self.settings
        sampler = GlobalBatchSampler(self.dataset_size, settings.batch_size, self.ctx.rank, self.ctx.world_size,
                                     settings.accumulation_steps, settings.seed, epoch, start,
                                     settings.updates_per_batch, skip)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=settings.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            # A private generator: creating the iterator would otherwise draw from the global torch RNG.
            generator=torch.Generator().manual_seed(settings.seed + epoch),
        )

    def total_steps(self) -> int:
        """Optimizer steps of the whole run from the current position (fixes the LR schedule's length)."""
        repeats = self.settings.updates_per_batch
        steps_per_epoch = steps_to_cover(self.dataset_size, self.samples_per_step) * repeats
        left_in_epoch = steps_to_cover(self.dataset_size - self.epoch_samples, self.samples_per_step) * repeats - self.repeat
        return self.step + left_in_epoch + (self.settings.epochs - self.epoch - 1) * steps_per_epoch

    def fit(self) -> None:
        settings, ctx, backend = self.settings, self.ctx, self.backend
        total_steps = self.total_steps()
        final_step = min(total_steps, settings.max_steps) if settings.max_steps else total_steps
        logger = self._make_logger(final_step) if ctx.is_main else None
        if logger is not None:
            self.wandb_run_id = logger.wandb_run_id
            precision = "float32" if settings.dtype == "float32" else f"{settings.dtype} autocast"
            logger.print(f"{final_step - self.step:,} optimizer steps of {self.samples_per_step:,} samples, "
                         f"{precision} on {ctx.device}")
        peak = peak_flops(ctx.device)
        throughput = Throughput(self.step, peak * ctx.world_size if peak else None)
        backend.model.train()
        window = None  # summed [loss, *metrics] since the last log line, on the device
        window_micro_batches = 0
        window_tokens, window_context = 0, 0  # useful tokens, and the same times their row width, on the host
        last_saved_step = self.step if settings.resume else -1

        while self.epoch < settings.epochs and self.step < final_step:
            for micro, batch in enumerate(self._loader(self.epoch, self.epoch_samples, self.repeat)):
                batch = batch.to(ctx.device)
                last = (micro + 1) % settings.accumulation_steps == 0  # this micro-batch completes a step
                with backend.accumulating(last):
                    with backend.autocast():
                        loss, metrics = self.loss_fn(backend.model, batch)
                    backend.backward(loss)
                values = torch.stack([loss.detach().float(), *(v.detach().float() for v in metrics.values())])
                window = values if window is None else window + values
                window_micro_batches += 1
                window_tokens += batch.useful_tokens
                window_context += batch.useful_tokens * batch.input_ids.shape[1]
                if not last:
                    continue
                lr = lr_at(self.step, total_steps, settings.learning_rate, settings.warmup_iters)
                backend.step(lr)
                self.step += 1
                self.repeat = (self.repeat + 1) % settings.updates_per_batch
                if self.repeat == 0:  # the last update on this step's data: on to the next samples
                    self.epoch_samples += self.samples_per_step
                if logger is not None:
                    logger.advance()
                if self.step % settings.log_interval == 0 or self.step == final_step:
                    mean = mean_across_ranks(window, ctx) / window_micro_batches
                    counts = torch.tensor([window_tokens, window_context], dtype=torch.float64, device=ctx.device)
                    tokens, context = (mean_across_ranks(counts, ctx) * ctx.world_size).tolist()  # all ranks' sums
                    throughput.add(tokens, training_flops(self.model, tokens, context))
                    if logger is not None:
                        self._log(logger, throughput, lr, mean, list(metrics), final_step)
                    window, window_micro_batches, window_tokens, window_context = None, 0, 0, 0
                if self.step % settings.save_interval == 0 or self.step == final_step:
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

    def _make_logger(self, final_step: int) -> RunLogger:
        settings = self.settings
        stem = self.weights_file.stem
        run_name = settings.wandb_run_name or f"{stem}-ep{settings.epochs}-bs{settings.batch_size}-lr{settings.learning_rate:g}"
        return RunLogger(
            metrics_path=self.weights_file.with_name(f"{stem}_metrics.jsonl"),
            png_path=self.weights_file.with_name(f"{stem}_loss.png"),
            title=f"{stem}: training loss",
            total_steps=final_step,
            start_step=self.step,
            resumed=settings.resume,
            wandb_config=dict(settings.flags) if settings.use_wandb else None,
            wandb_project=settings.wandb_project,
            wandb_run_name=run_name,
            wandb_run_id=self.wandb_run_id,
            out_dir=self.weights_file.parent,
        )

    def _log(self, logger: RunLogger, throughput: Throughput, lr: float, mean: torch.Tensor, metric_names: list[str],
             final_step: int) -> None:
        tokens_per_sec, mfu, elapsed, eta = throughput.report(self.step, final_step)
        extra = {name: float(value) for name, value in zip(metric_names, mean[1:])}
        loss = float(mean[0])
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
               **({"mfu": mfu} if mfu is not None else {}), "elapsed": elapsed, **extra}
        line = format_log_line(self.epoch, self.settings.epochs, self.step, final_step, loss, lr, tokens_per_sec,
                               elapsed, eta, extra, mfu)
        logger.log(row, line)
