"""Unit tests of the training plumbing (model/trainer.py, checkpoint.py, cli.py, train_log.py, distributed.py),
each against hand-computed values or a naive re-implementation. All in-process and fast."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.backend import autocast_context, build_optimizer, make_grad_scaler
from model.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_trainable_state_dict,
    remove_stale_temp_files,
    restore_rng_state,
    resume_path,
    trainable_state_dict,
    weights_path,
)
from model.cli import parse_training_args, str2bool, train_settings, training_parser
from model.common import WeightsMismatchError
from model.dataset import Batch, PackedCollator, PackedDataset, PadCollator
from model.LMConfig import LMConfig
from model.model import MiniMindLM
from model.train_log import (
    MetricsFile, RunLogger, Throughput, format_duration, format_log_line, peak_flops, peak_flops_of, read_metrics,
    training_flops,
)
from model.trainer import (
    GlobalBatchSampler,
    Trainer,
    TrainSettings,
    causal_lm_loss,
    epoch_permutation,
    lr_at,
    masked_cross_entropy,
)
from model.distributed import DistContext, deepspeed_config

import conftest
from conftest import ROOT, same_weights, write_lines

CPU = torch.device("cpu")
TINY = {**conftest.TINY, "vocab_size": 64}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = training_parser("test", data_path="unused.jsonl", learning_rate=1e-3, wandb_project="test")
    return parse_training_args(parser, argv)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule, optimizer groups, precision


def test_lr_schedule_hand_computed_values():
    peak, floor = 1e-3, 1e-4
    # warm-up over 10 steps: (step + 1) / 10 of the peak
    assert lr_at(0, 110, peak, 10) == pytest.approx(1e-4)
    assert lr_at(4, 110, peak, 10) == pytest.approx(5e-4)
    assert lr_at(9, 110, peak, 10) == pytest.approx(1e-3)
    # cosine over the remaining 100 steps from peak to 10% of peak
    assert lr_at(10, 110, peak, 10) == pytest.approx(peak)
    assert lr_at(60, 110, peak, 10) == pytest.approx(floor + 0.5 * (peak - floor))  # cos(pi/2) = 0
    assert lr_at(35, 110, peak, 10) == pytest.approx(floor + 0.5 * (peak - floor) * (1 + math.sqrt(0.5)))  # cos(pi/4)
    assert lr_at(110, 110, peak, 10) == pytest.approx(floor)
    assert lr_at(500, 110, peak, 10) == pytest.approx(floor)  # never below the floor
    # no warm-up: the first step uses the peak
    assert lr_at(0, 50, peak, 0) == pytest.approx(peak)


def test_weight_decay_on_matrices_only_and_frozen_parameters_excluded():
    model = MiniMindLM(LMConfig(**TINY))
    model.layers[0].attention.wq.weight.requires_grad_(False)
    optimizer = build_optimizer(model, 1e-3, 0.1, CPU)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    not_decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    expected_decayed = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2}
    expected_plain = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1}
    assert {names[i] for i in decayed} == expected_decayed
    assert {names[i] for i in not_decayed} == expected_plain
    assert all(n.endswith("norm.weight") for n in expected_plain)
    assert "layers.0.attention.wq.weight" not in expected_decayed | expected_plain
    # the tied embedding/output matrix appears once
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})


@pytest.mark.parametrize("dtype_name, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)])
def test_autocast_uses_the_requested_dtype(dtype_name, expected):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_context(CPU, dtype_name):
        assert (a @ b).dtype == expected
        assert torch.is_autocast_enabled("cpu") == (expected != torch.float32)
    assert (a @ b).dtype == torch.float32  # and nothing leaks out of the context
    assert make_grad_scaler(CPU, dtype_name).is_enabled() == (dtype_name == "float16")


def tiny_dataset(n: int, length: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(3, TINY["vocab_size"], (length + 1,), generator=g)
        items.append((ids[:-1], ids[1:], torch.ones(length)))
    return items


@pytest.mark.parametrize("dtype_name, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)])
def test_training_loop_runs_the_model_in_the_requested_dtype(tmp_path, capsys, dtype_name, expected):
    """The loop itself (not just the helper) computes the forward in the --dtype asked for, and says so when it
    starts; the weights stay float32 masters and float16 goes through the GradScaler. (Settings built directly,
    without the parser.)"""
    settings = TrainSettings(dtype=dtype_name, batch_size=2, accumulation_steps=2, max_steps=3, log_interval=1,
                             save_dtype=dtype_name)
    seen_dtypes = []

    def recording_loss(model, batch):
        out = model(batch.input_ids)
        seen_dtypes.append(out.logits.dtype)
        return masked_cross_entropy(out.logits, batch.labels, batch.loss_mask), {}

    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY))
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    trainer = Trainer(settings, ctx, model, tiny_dataset(16, 8), PadCollator(0), recording_loss,
                      weights_file=tmp_path / "t.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    precision = "float32" if dtype_name == "float32" else f"{dtype_name} autocast"
    assert f"3 optimizer steps of 4 samples, {precision} on cpu" in capsys.readouterr().out
    assert seen_dtypes == [expected] * 6  # 3 steps x 2 micro-batches
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer.backend.scaler.is_enabled() == (dtype_name == "float16")
    if dtype_name == "float16":
        assert trainer.backend.scaler.get_scale() > 0
    rows = read_metrics(tmp_path / "t_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    saved = torch.load(tmp_path / "t.pth", weights_only=True)  # --save_dtype: the weights file's precision
    assert {v.dtype for v in saved.values()} == {expected}
    MiniMindLM(LMConfig(**TINY)).load_state_dict(saved, strict=True)


@pytest.mark.slow  # torch.compile takes ~45 s on this CPU even for the tiny model
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """--compile goes through the backend: the loop calls the compiled model, the same losses come out, and the
    weights file holds the plain module's names."""
    losses, weights, called = {}, {}, {}
    for compiled in (False, True):
        settings = TrainSettings(dtype="float32", batch_size=2, max_steps=3, log_interval=1, compile=compiled)

        def recording_loss(model, batch):
            called[compiled] = type(model).__name__
            return causal_lm_loss(model, batch)

        torch.manual_seed(0)
        ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
        Trainer(settings, ctx, MiniMindLM(LMConfig(**TINY)), tiny_dataset(16, 8), PadCollator(0), recording_loss,
                weights_file=tmp_path / f"c{int(compiled)}.pth").fit()
        losses[compiled] = [r["loss"] for r in read_metrics(tmp_path / f"c{int(compiled)}_metrics.jsonl")]
        weights[compiled] = torch.load(tmp_path / f"c{int(compiled)}.pth", weights_only=True)
    assert called == {False: "MiniMindLM", True: "OptimizedModule"}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert weights[True].keys() == weights[False].keys()
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-5)


def test_moe_balancing_loss_is_trained_and_logged(tmp_path):
    args = parse(["--device", "cpu", "--dtype", "float32", "--batch_size", "2", "--accumulation_steps", "1",
                  "--max_steps", "2", "--log_interval", "1", "--out_dir", str(tmp_path), "--num_workers", "0"])
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY, use_moe=True))
    gate_before = model.layers[0].feed_forward.gate.weight.detach().clone()
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    Trainer(train_settings(args), ctx, model, tiny_dataset(8, 8), PadCollator(0), causal_lm_loss,
            weights_file=tmp_path / "moe.pth").fit()
    rows = read_metrics(tmp_path / "moe_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["aux_loss"] > 0 for r in rows)
    assert not torch.equal(model.layers[0].feed_forward.gate.weight, gate_before)


# ----------------------------------------------------------------------------------------------------------------
# Loss


def test_masked_cross_entropy_matches_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                log_probs = logits[b, t] - torch.logsumexp(logits[b, t], dim=0)
                total += -log_probs[labels[b, t]].item()
                count += 1
    assert masked_cross_entropy(logits, labels, mask).item() == pytest.approx(total / count, rel=1e-6)
    # an all-zero mask (a reply truncated away) gives 0, not NaN
    assert masked_cross_entropy(logits, labels, torch.zeros(2, 5)).item() == 0.0


def test_causal_lm_loss_adds_the_moe_balancing_loss():
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY, use_moe=True)).train()
    x = torch.randint(0, 64, (2, 6))
    batch = Batch(x, torch.roll(x, -1, 1), torch.ones(2, 6))
    loss, metrics = causal_lm_loss(model, batch)
    torch.manual_seed(0)
    out = model(x)
    assert out.aux_loss.item() > 0
    assert metrics["aux_loss"].item() == pytest.approx(out.aux_loss.item())
    assert loss.item() == pytest.approx(masked_cross_entropy(out.logits, batch.labels, batch.loss_mask).item() + out.aux_loss.item(), rel=1e-6)
    dense_loss, dense_metrics = causal_lm_loss(MiniMindLM(LMConfig(**TINY)), batch)
    assert dense_metrics == {}


def test_packed_training_loss_falls_and_counts_only_document_tokens(tmp_path, shared_data, tokenizer):
    """Rows of whole documents through the real loop: the loss on those rows falls, and what tokens/s counts is the
    document tokens (document_ids >= 0), not the padding."""
    dataset = PackedDataset(write_lines(shared_data / "pretrain_mini.jsonl", tmp_path / "p.jsonl", 0, 160), tokenizer,
                            max_length=128)
    collate = PackedCollator(tokenizer.pad_token_id, dataset.row_length)
    settings = TrainSettings(dtype="float32", batch_size=4, max_steps=8, log_interval=2, learning_rate=1e-2)
    seen = []

    def recording_loss(model, batch):
        seen.append((batch.useful_tokens, int((batch.document_ids >= 0).sum()), tuple(batch.input_ids.shape)))
        return causal_lm_loss(model, batch)

    def loss_on_rows(model) -> float:
        with torch.no_grad():
            return float(causal_lm_loss(model.eval(), collate([dataset[r] for r in range(0, len(dataset), 8)]))[0])

    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**conftest.TINY, vocab_size=6400))
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    with conftest.one_thread():
        before = loss_on_rows(model)
        Trainer(settings, ctx, model, dataset, collate, recording_loss, weights_file=tmp_path / "packed.pth").fit()
        after = loss_on_rows(model)
    assert after < before - 0.5, (before, after)
    assert [r["step"] for r in read_metrics(tmp_path / "packed_metrics.jsonl")] == [2, 4, 6, 8]
    assert len(seen) == 8 and all(useful == counted and shape == (4, 127) for useful, counted, shape in seen)
    assert any(useful < 4 * 127 for useful, _, _ in seen)  # some rows end in padding, which is not counted


# ----------------------------------------------------------------------------------------------------------------
# Data order


def test_epoch_permutation_is_a_fixed_permutation_per_seed_and_epoch():
    a = epoch_permutation(100, seed=3, epoch=0)
    assert sorted(a) == list(range(100))
    assert a == epoch_permutation(100, seed=3, epoch=0)
    assert a != epoch_permutation(100, seed=3, epoch=1)
    assert a != epoch_permutation(100, seed=4, epoch=0)


def naive_rank_batches(n, batch_size, world_size, accumulation, seed, epoch, start):
    """Reference: walk the permutation from `start` in global micro-batches, deal slices to ranks, and fill the
    last step up with the permutation's first samples."""
    permutation = epoch_permutation(n, seed, epoch)
    order = permutation[start:]
    global_micro = batch_size * world_size
    step_size = global_micro * accumulation
    while len(order) % step_size:
        order = order + permutation[: step_size - len(order) % step_size]
    per_rank = {r: [] for r in range(world_size)}
    for i in range(0, len(order), global_micro):
        for r in range(world_size):
            per_rank[r].append(order[i + r * batch_size : i + (r + 1) * batch_size])
    return per_rank


@pytest.mark.parametrize("n, batch_size, world_size, accumulation, start", [(50, 3, 2, 2, 0), (50, 3, 2, 2, 12), (97, 4, 3, 1, 24), (10, 2, 1, 5, 0)])
def test_global_batch_sampler_matches_the_naive_order(n, batch_size, world_size, accumulation, start):
    expected = naive_rank_batches(n, batch_size, world_size, accumulation, seed=7, epoch=2, start=start)
    seen = set()
    for rank in range(world_size):
        sampler = GlobalBatchSampler(n, batch_size, rank, world_size, accumulation, seed=7, epoch=2, start=start)
        batches = list(sampler)
        assert batches == expected[rank]
        assert len(sampler) == len(batches) and len(batches) % accumulation == 0
        seen.update(i for batch in batches for i in batch)
    assert seen >= set(epoch_permutation(n, seed=7, epoch=2)[start:])  # no sample after start is skipped


def test_sampler_order_does_not_depend_on_world_size():
    """2 ranks x batch 3 see, micro-batch by micro-batch, exactly the samples 1 rank x batch 6 sees; a position
    reached with one world size continues identically with another."""
    one = list(GlobalBatchSampler(60, 6, 0, 1, 2, seed=1, epoch=0, start=12))
    r0 = list(GlobalBatchSampler(60, 3, 0, 2, 2, seed=1, epoch=0, start=12))
    r1 = list(GlobalBatchSampler(60, 3, 1, 2, 2, seed=1, epoch=0, start=12))
    assert one == [a + b for a, b in zip(r0, r1)]
    full = list(GlobalBatchSampler(60, 6, 0, 1, 2, seed=1, epoch=0))
    assert full[2:] == one  # start=12 skips exactly the first 2 micro-batches of 6


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files


def test_atomic_save_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.pth"
    atomic_save({"x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": torch.arange(5), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]  # and no temp file is left behind
    atomic_save({"x": torch.arange(4)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(4))
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_an_interrupted_write_leaves_only_a_temp_file_and_stale_temps_are_removed(tmp_path, monkeypatch):
    """While a checkpoint is being written, only the temp file holds bytes (the real name appears at the rename);
    cleanup removes temp files of that name only. The write is paused by a torch.save that waits after its
    first bytes."""
    import threading

    written, release = threading.Event(), threading.Event()
    real_save = torch.save

    def pausing_save(obj, file):
        real_save(obj, file)
        file.flush()
        written.set()
        release.wait(30)

    monkeypatch.setattr(torch, "save", pausing_save)
    path = tmp_path / "r.pth"
    thread = threading.Thread(target=atomic_save, args=({"x": torch.zeros(10_000)}, path))
    thread.start()
    assert written.wait(30)
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-r.pth.")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0 and not path.exists()
    release.set()
    thread.join()
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (tmp_path / ".tmp-r.pth.123.abcd").write_bytes(b"torn")
    (tmp_path / ".tmp-other.pth.1.ab").write_bytes(b"someone else's")
    assert [p.name for p in remove_stale_temp_files(tmp_path, "r.pth")] == [".tmp-r.pth.123.abcd"]
    assert (tmp_path / ".tmp-other.pth.1.ab").exists()


def test_file_names_follow_the_original_convention(tmp_path):
    assert weights_path("out", "pretrain", LMConfig(dim=512)).as_posix() == "out/pretrain_512.pth"
    assert weights_path("out", "full_sft", LMConfig(dim=640, use_moe=True)).as_posix() == "out/full_sft_640_moe.pth"
    assert resume_path("out/full_sft_640_moe.pth").as_posix() == "out/full_sft_640_moe_resume.pth"


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state(CPU)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    atomic_save({"rng": state}, tmp_path / "s.pth")
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "s.pth", weights_only=True)["rng"], CPU)
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_trainable_state_round_trip_and_mismatch_error(tmp_path):
    source = MiniMindLM(LMConfig(**TINY))
    for name, p in source.named_parameters():
        p.requires_grad_(name.startswith("layers.1."))
    state = trainable_state_dict(source)
    assert set(state) == {n for n, _ in source.named_parameters() if n.startswith("layers.1.")}
    target = MiniMindLM(LMConfig(**TINY))
    for name, p in target.named_parameters():
        p.requires_grad_(name.startswith("layers.1."))
    load_trainable_state_dict(target, state, tmp_path / "r.pth")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    everything_trainable = MiniMindLM(LMConfig(**TINY))
    with pytest.raises(WeightsMismatchError, match="written for other trainable parameters"):
        load_trainable_state_dict(everything_trainable, state, tmp_path / "r.pth")


# ----------------------------------------------------------------------------------------------------------------
# Flags, DeepSpeed config, log formatting


def test_booleans_take_explicit_values():
    assert str2bool("1") and str2bool("True") and str2bool("yes")
    assert not str2bool("0") and not str2bool("false") and not str2bool("No")
    assert parse(["--use_moe", "0"]).use_moe is False  # type=bool would have made this True
    assert parse(["--use_moe", "true"]).use_moe is True
    assert parse(["--report_to", "wandb"]).use_wandb is True
    assert parse(["--local_rank=1"]).local_rank == 1  # what the deepspeed launcher appends
    with pytest.raises(SystemExit):
        parse(["--use_moe", "maybe"])
    with pytest.raises(SystemExit):
        parse(["--batch_size", "0"])


def test_deepspeed_config_fills_auto_values_and_rejects_contradictions(tmp_path):
    args = parse(["--zero_stage", "2", "--batch_size", "4", "--accumulation_steps", "3", "--grad_clip", "0.5", "--dtype", "float32"])
    config = deepspeed_config(args, world_size=2)
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False

    shipped = parse(["--deepspeed", str(ROOT / "ds_config.json"), "--batch_size", "4", "--dtype", "bfloat16"])
    config = deepspeed_config(shipped, world_size=1)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["bf16"]["enabled"] is True
    assert "optimizer" not in config

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 contradicts"):
        deepspeed_config(parse(["--deepspeed", str(bad), "--batch_size", "4"]), world_size=1)
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        deepspeed_config(parse(["--deepspeed", str(bad)]), world_size=1)
    bad.write_text("{\n  \"zero_optimization\": {,}\n}")
    with pytest.raises(ValueError, match="invalid JSON at line 2"):
        deepspeed_config(parse(["--deepspeed", str(bad)]), world_size=1)


def test_log_line_format():
    line = format_log_line(0, 2, 40, 300, 4.21874, 4.87e-4, 1523.4, 72, 468, {"aux_loss": 0.01234})
    assert line == ("epoch 1/2 | step 40/300 | loss 4.2187 | lr 4.87e-04 | 1,523 tok/s | elapsed 0:01:12 | "
                    "eta 0:07:48 | aux_loss 0.0123")
    assert format_duration(3725) == "1:02:05"
    with_mfu = format_log_line(0, 2, 40, 300, 4.21874, 4.87e-4, 1523.4, 72, 468, mfu=0.41349)
    assert " | 1,523 tok/s | mfu 41.3% | elapsed 0:01:12 | " in with_mfu


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_training_flops_match_torch_flop_counter(use_moe):
    """6 FLOPs per weight and token plus the attention term, against torch's own count of one forward and backward
    (explicit attention, whose matmuls it counts); only the norm weights, which do no matmul, differ."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = conftest.tiny_model(use_moe=use_moe, flash_attn=False).train()
    inputs = torch.randint(0, 6400, (2, 40))
    with FlopCounterMode(display=False) as counter:
        out = model(inputs)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    norm_weights = (2 * model.config.n_layers + 1) * model.config.dim
    assert training_flops(model, 80, 80 * 40) == counter.get_total_flops() + 6 * norm_weights * 80


def test_mfu_needs_a_known_gpu():
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA GeForce RTX 4090") == 165.2e12 and peak_flops_of("Tesla V100-PCIE-32GB") == 112e12
    assert peak_flops_of("NVIDIA L4") == 121e12 and peak_flops_of("NVIDIA L40S") == 362e12
    assert peak_flops_of("NVIDIA A10") == 125e12 and peak_flops_of("NVIDIA A10G") is None  # A10G: not in the table
    assert peak_flops(CPU) is None
    throughput = Throughput(start_step=0, peak_flops=100e12)
    throughput.last_time -= 2.0
    throughput.add(tokens=1000, flops=50e12)
    tokens_per_sec, mfu, _, _ = throughput.report(step=1, final_step=2)
    assert tokens_per_sec == pytest.approx(500, rel=1e-3) and mfu == pytest.approx(0.25, rel=1e-3)
    assert Throughput(start_step=0).report(1, 2)[1] is None  # no peak (CPU): no MFU


def test_metrics_file_drops_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "m.jsonl"
    metrics = MetricsFile(path, resume_from_step=None)
    for step in (10, 20, 30):
        metrics.append({"step": step, "loss": 1.0})
    MetricsFile(path, resume_from_step=20)  # the run was killed after step 30 but its checkpoint is at 20
    assert [r["step"] for r in read_metrics(path)] == [10, 20]
    MetricsFile(path, resume_from_step=None)  # a fresh run starts a fresh file
    assert not path.exists()


def test_terminal_gets_a_progress_bar_and_the_same_log_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    logger = RunLogger(metrics_path=tmp_path / "m.jsonl", png_path=tmp_path / "loss.png", title="t", total_steps=10,
                       start_step=4, resumed=False, wandb_config=None, wandb_project="p", wandb_run_name="r",
                       wandb_run_id=None, out_dir=tmp_path)
    assert logger.bar is not None and logger.bar.n == 4  # a resumed bar starts where the run is
    logger.advance()
    logger.log({"step": 5, "epoch": 0, "loss": 2.5, "lr": 1e-3}, "epoch 1/1 | step 5/10 | loss 2.5000")
    logger.close()
    assert logger.bar.n == 5
    assert "epoch 1/1 | step 5/10 | loss 2.5000" in capsys.readouterr().out
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 5, "epoch": 0, "loss": 2.5, "lr": 1e-3}]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------------------
# Stage scripts fail early and clearly on missing inputs


def run_script_main(script: str, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exit_info.value.code


def test_missing_data_file_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    code = run_script_main("train_pretrain.py", ["--data_path", str(tmp_path / "nope.jsonl"), "--device", "cpu"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "nope.jsonl not found" in err and "minimind_dataset" in err and "--data_path" in err


def test_sft_without_pretrained_weights_names_the_stage_to_run_first(tmp_path, monkeypatch, capsys, shared_data):
    argv = ["--data_path", str(shared_data / "sft_mini.jsonl"), "--out_dir", str(tmp_path), "--device", "cpu", "--dim", "64"]
    code = run_script_main("train_full_sft.py", argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path}/pretrain_64.pth not found" in err and "run train_pretrain.py first" in err


# ----------------------------------------------------------------------------------------------------------------
# Several updates per batch (RL): repeated steps, stage state in the resume file


def test_sampler_repeats_each_steps_micro_batches_in_a_row():
    plain = list(GlobalBatchSampler(12, 2, 0, 1, 2, seed=3, epoch=0))  # 3 steps of 2 micro-batches
    steps = [plain[i:i + 2] for i in range(0, 6, 2)]
    repeated = list(GlobalBatchSampler(12, 2, 0, 1, 2, seed=3, epoch=0, repeats=3))
    assert repeated == [mb for step in steps for mb in step * 3] and len(repeated) == 18
    resumed = list(GlobalBatchSampler(12, 2, 0, 1, 2, seed=3, epoch=0, start=4, repeats=3, skip=2))
    assert resumed == steps[1] + steps[2] * 3  # one update left on step 2's data, then step 3's three


class CountingLoss:
    """A loss with state carried from step to step (as an RL stage's rollout buffer): the number of batches seen,
    which scales the loss, so a resume that lost it would train differently."""

    def __init__(self):
        self.calls = torch.zeros((), dtype=torch.long)

    def __call__(self, model, batch):
        self.calls += 1
        loss, metrics = causal_lm_loss(model, batch)
        return loss * (1 + 0.1 * self.calls), {**metrics, "calls": self.calls.float()}

    def state_dict(self) -> dict:
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"].clone()


def test_updates_per_batch_resume_between_updates_is_exact(tmp_path):
    """3 updates per step's data: a run stopped after update 2 of a step and resumed equals the uninterrupted run
    (weights, losses), with the stage state restored; the schedule counts every update."""
    def run(out: Path, max_steps: int, resume: bool) -> CountingLoss:
        settings = TrainSettings(dtype="float32", batch_size=2, accumulation_steps=2, updates_per_batch=3,
                                 max_steps=max_steps, log_interval=1, save_interval=100, resume=resume)
        torch.manual_seed(0)
        loss = CountingLoss()
        ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
        trainer = Trainer(settings, ctx, MiniMindLM(LMConfig(**TINY)), tiny_dataset(10, 8), PadCollator(0), loss,
                          weights_file=out / "rl.pth", stage_state=loss)
        assert trainer.total_steps() == 9  # ceil(10 / 4) = 3 steps of data, 3 updates each
        trainer.fit()
        return loss

    assert run(tmp_path / "whole", 9, False).calls == 18
    run(tmp_path / "part", 5, False)
    state = torch.load(tmp_path / "part" / "rl_resume.pth", weights_only=True)
    assert (state["step"], state["epoch_samples"], state["repeat"]) == (5, 4, 2) and state["stage"][0]["calls"] == 10
    assert run(tmp_path / "part", 9, True).calls == 18
    assert same_weights(torch.load(tmp_path / "part" / "rl.pth", weights_only=True),
                        torch.load(tmp_path / "whole" / "rl.pth", weights_only=True))
    ours, theirs = read_metrics(tmp_path / "part" / "rl_metrics.jsonl"), read_metrics(tmp_path / "whole" / "rl_metrics.jsonl")
    assert [(r["step"], r["loss"], r["calls"]) for r in ours] == [(r["step"], r["loss"], r["calls"]) for r in theirs]
