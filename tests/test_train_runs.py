"""End-to-end runs of train_pretrain.py and train_full_sft.py as users run them (subprocesses, tiny models, CPU):
the loss falls on held-out data, resume is bit-exact, a SIGKILL during a checkpoint write loses nothing but the
steps since the previous checkpoint, and wandb offline / metrics / loss plot are written."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from conftest import (
    CPU_FP32, ROOT, TINY_FLAGS, TOKENIZER_DIR, run, same_weights, subprocess_env, tiny_model, write_lines,
)
from model.dataset import PackedDataset, PretrainDataset, SFTDataset
from model import preset
from model.model import MiniMindLM
from model.train_log import read_metrics



@torch.no_grad()
def held_out_loss(model: MiniMindLM, dataset) -> float:
    """Token-weighted mean cross-entropy over the counted labels of every item, one item at a time."""
    total, count = 0.0, 0.0
    for index in range(len(dataset)):
        inputs, labels, mask = dataset[index]
        per_token = F.cross_entropy(model(inputs[None]).logits[0].float(), labels, reduction="none")
        total += float((per_token * mask).sum())
        count += float(mask.sum())
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# Loss falls; wandb offline, metrics file and plot


@pytest.mark.slow
def test_pretrain_then_sft_lower_held_out_loss(tmp_path, shared_data):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    pretrain_file = shared_data / "pretrain_mini.jsonl"
    sft_file = shared_data / "sft_mini.jsonl"
    out = tmp_path / "out"
    common = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "128", "--batch_size", "8", "--accumulation_steps", "1",
              "--warmup_iters", "10", "--log_interval", "10", "--num_workers", "0", "--out_dir", str(out)]

    # Pretrain: 480 samples / batch 8 = 60 optimizer steps, held-out texts from the end of the file.
    train = write_lines(pretrain_file, tmp_path / "pretrain_train.jsonl", 0, 480)
    held = PretrainDataset(write_lines(pretrain_file, tmp_path / "pretrain_held.jsonl", 12_700, 12_800), tokenizer, 128)
    stdout = run([sys.executable, "train_pretrain.py", *common, "--data_path", str(train), "--learning_rate", "3e-3",
                  "--use_wandb", "1", "--wandb_project", "minimind-test"])
    torch.manual_seed(1337)  # the script seeds with --seed 1337 before building the model: this is step 0
    initial = held_out_loss(tiny_model(), held)
    pretrained = torch.load(out / "pretrain_64.pth", weights_only=True)
    after = held_out_loss(tiny_model(pretrained), held)
    assert initial == pytest.approx(8.76, abs=0.1)  # ~ln(6400): a fresh model knows nothing
    assert after < initial - 1.0, (initial, after)

    # The log line, the metrics file (one row per 10 steps), the loss plot and the offline wandb run.
    assert "epoch 1/1 | step 60/60 | loss " in stdout and " tok/s | elapsed " in stdout
    rows = read_metrics(out / "pretrain_64_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    assert rows[-1]["loss"] < rows[0]["loss"]
    png = out / "pretrain_64_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    wandb_id = torch.load(out / "pretrain_64_resume.pth", weights_only=True)["wandb_run_id"]
    assert wandb_id and list((out / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))

    # SFT from those weights (the default --from_weight pretrain): 60 steps, held-out conversations.
    sft_train = write_lines(sft_file, tmp_path / "sft_train.jsonl", 0, 480)
    sft_held = SFTDataset(write_lines(sft_file, tmp_path / "sft_held.jsonl", 13_100, 13_200), tokenizer, 128)
    stdout = run([sys.executable, "train_full_sft.py", *common, "--data_path", str(sft_train), "--learning_rate", "2e-3"])
    assert "from " + str(out / "pretrain_64.pth") in stdout
    sft_before = held_out_loss(tiny_model(pretrained), sft_held)
    sft_after = held_out_loss(tiny_model(torch.load(out / "full_sft_64.pth", weights_only=True)), sft_held)
    assert sft_after < sft_before - 0.5, (sft_before, sft_after)


# ----------------------------------------------------------------------------------------------------------------
# Exact resume and crash safety

# 72 samples, 4 per micro-batch x 2 accumulation = 8 per step -> 9 steps per epoch, 18 over 2 epochs. The runs
# stop at step 12, past the epoch boundary; the interrupted ones stop at 6 first. Dropout makes the torch RNG
# matter, so restoring it is tested too.
RESUME_RUN = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "64", "--batch_size", "4", "--accumulation_steps", "2",
              "--epochs", "2", "--dropout", "0.1", "--learning_rate", "2e-3", "--warmup_iters", "2",
              "--log_interval", "1", "--save_interval", "4"]
_reference_cache: dict[Path, Path] = {}


def resume_data(shared_data: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "resume_data"
    folder.mkdir(exist_ok=True)
    return write_lines(shared_data / "pretrain_mini.jsonl", folder / "pretrain_72.jsonl", 0, 72)


def reference_run(shared_data: Path, tmp_path_factory) -> Path:
    """The uninterrupted 12-step run (num_workers 0), computed once per test session."""
    data = resume_data(shared_data, tmp_path_factory)
    if data not in _reference_cache:
        out = tmp_path_factory.mktemp("reference")
        run([sys.executable, "train_pretrain.py", *RESUME_RUN, "--data_path", str(data), "--out_dir", str(out),
             "--num_workers", "0", "--max_steps", "12"])
        _reference_cache[data] = out
    return _reference_cache[data]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_is_bit_identical(tmp_path, tmp_path_factory, shared_data, num_workers):
    reference = reference_run(shared_data, tmp_path_factory)
    data = resume_data(shared_data, tmp_path_factory)
    command = [sys.executable, "train_pretrain.py", *RESUME_RUN, "--data_path", str(data), "--out_dir", str(tmp_path),
               "--num_workers", str(num_workers)]
    use_wandb = ["--use_wandb", "1"] if num_workers == 0 else []
    run([*command, "--max_steps", "6", *use_wandb])
    first = torch.load(tmp_path / "pretrain_64_resume.pth", weights_only=True)
    assert (first["step"], first["epoch"], first["epoch_samples"]) == (6, 0, 48)
    stdout = run([*command, "--max_steps", "12", "--resume", "1", *use_wandb])
    assert "resumed from" in stdout and "at step 6 (epoch 1, sample 48/72" in stdout

    resumed = torch.load(tmp_path / "pretrain_64.pth", weights_only=True)
    uninterrupted = torch.load(reference / "pretrain_64.pth", weights_only=True)
    assert same_weights(resumed, uninterrupted)
    assert not torch.equal(resumed["norm.weight"], first["model"]["norm.weight"])  # the second half did train
    final = torch.load(tmp_path / "pretrain_64_resume.pth", weights_only=True)
    assert (final["step"], final["epoch"], final["epoch_samples"]) == (12, 1, 24)
    # every step logged once, with exactly the uninterrupted run's losses and learning rates
    ours, theirs = read_metrics(tmp_path / "pretrain_64_metrics.jsonl"), read_metrics(reference / "pretrain_64_metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, 13))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]
    if use_wandb:  # the resumed run continued the same wandb run
        assert final["wandb_run_id"] == first["wandb_run_id"] is not None
        assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{first['wandb_run_id']}"))) == 2


@pytest.mark.slow
def test_packed_sft_on_a_token_file_stops_and_resumes_bit_identically(tmp_path, shared_data, tokenizer):
    """Conversations pretokenized once, then SFT on packed rows (2 DataLoader workers, dropout): a run stopped inside
    the first epoch and resumed past the second epoch's start equals the uninterrupted run, weights and losses."""
    jsonl = write_lines(shared_data / "sft_mini.jsonl", tmp_path / "sft.jsonl", 0, 120)
    run([sys.executable, "scripts/pretokenize.py", "--data_path", str(jsonl), "--kind", "chat"])
    rows = len(PackedDataset(tmp_path / "sft.bin", tokenizer, max_length=256, chat=True))
    steps_per_epoch = -(-rows // 8)  # batch 4 x accumulation 2, the last step filled up
    stop, total = steps_per_epoch - 2, steps_per_epoch + 2
    command = [sys.executable, "train_full_sft.py", *CPU_FP32, *TINY_FLAGS, "--from_weight", "none",
               "--data_path", str(tmp_path / "sft.bin"), "--packed", "1", "--max_seq_len", "256", "--batch_size", "4",
               "--accumulation_steps", "2", "--epochs", "2", "--dropout", "0.1", "--learning_rate", "2e-3",
               "--log_interval", "1", "--save_interval", "3", "--num_workers", "2"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    stdout = run([*command, "--out_dir", str(reference), "--max_steps", str(total)])
    assert f"packed 120 documents into {rows} rows of 255 positions" in stdout
    run([*command, "--out_dir", str(resumed), "--max_steps", str(stop)])
    stdout = run([*command, "--out_dir", str(resumed), "--max_steps", str(total), "--resume", "1"])
    assert f"at step {stop} (epoch 1, sample {stop * 8}/{rows}" in stdout
    assert same_weights(torch.load(resumed / "full_sft_64.pth", weights_only=True),
                        torch.load(reference / "full_sft_64.pth", weights_only=True))
    ours, theirs = read_metrics(resumed / "full_sft_64_metrics.jsonl"), read_metrics(reference / "full_sft_64_metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, total + 1))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]


# Runs a script (argv[1:]) with torch.save writing its first bytes, flushing them, and pausing 1.5 s, so that a
# checkpoint write can be killed half-way.
SLOW_WRITES = """
import runpy, sys, time, torch
real_save = torch.save
def slow_save(obj, file, *args, **kwargs):
    class Pausing:
        def __init__(self): self.paused = False
        def write(self, data):
            written = file.write(data)
            if not self.paused:
                self.paused = True
                file.flush()
                time.sleep(1.5)
            return written
        def flush(self): file.flush()
    return real_save(obj, Pausing(), *args, **kwargs)
torch.save = slow_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tmp_path_factory, shared_data):
    reference = reference_run(shared_data, tmp_path_factory)
    data = resume_data(shared_data, tmp_path_factory)
    command = [sys.executable, "train_pretrain.py", *RESUME_RUN, "--data_path", str(data), "--out_dir", str(tmp_path),
               "--num_workers", "0"]
    resume_file = tmp_path / "pretrain_64_resume.pth"
    # Every checkpoint write pauses 1.5 s after its first bytes: kill the run inside the step-8 resume-file write.
    paused = [sys.executable, "-c", SLOW_WRITES, *command[1:], "--max_steps", "12"]
    process = subprocess.Popen(paused, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed_mid_write = False
    while time.time() < deadline and process.poll() is None:
        if resume_file.exists():
            torn = list(tmp_path.glob(".tmp-pretrain_64_resume.pth.*"))
            if torn and torn[0].stat().st_size > 0:
                process.send_signal(signal.SIGKILL)
                killed_mid_write = True
                break
        time.sleep(0.05)
    process.wait(timeout=30)
    process.stdout.close(), process.stderr.close()
    assert killed_mid_write, "the run ended before the second checkpoint write"
    assert process.returncode == -signal.SIGKILL

    # A torn temp file is left; the files under the real names are whole: the previous checkpoint (step 4).
    assert list(tmp_path.glob(".tmp-pretrain_64_resume.pth.*"))
    previous = torch.load(resume_file, weights_only=True)
    assert previous["step"] == 4
    tiny_model(torch.load(tmp_path / "pretrain_64.pth", weights_only=True))  # loads with strict=True

    stdout = run([*command, "--max_steps", "12", "--resume", "1"])
    assert "at step 4 (epoch 1, sample 32/72" in stdout
    assert same_weights(torch.load(tmp_path / "pretrain_64.pth", weights_only=True),
                        torch.load(reference / "pretrain_64.pth", weights_only=True))
    assert not list(tmp_path.glob(".tmp-*"))  # the stale temp file was cleaned up


# ---------------------------------------------------------------------------------------------------------------
# The newest architecture: --preset minimind-3 (per-head q/k norms) trains, resumes, exports and chats


@pytest.mark.slow
def test_minimind3_preset_trains_resumes_exports_and_chats(tmp_path, shared_data, tokenizer):
    """Two layers of minimind-3 (its widths, q/k norms, 8 query / 4 KV heads): a run stopped at step 2 and resumed
    to step 4 equals the uninterrupted 4 steps; the weights export with no architecture flags to a plain
    Qwen3ForCausalLM with equal logits, and eval_model.py chats with them, again without flags. The MoE preset
    trains too, with its balancing loss logged."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from model.loading import load_pretrained

    data = write_lines(shared_data / "pretrain_mini.jsonl", tmp_path / "pretrain.jsonl", 0, 16)
    command = [sys.executable, "train_pretrain.py", *CPU_FP32, "--preset", "minimind-3", "--n_layers", "2",
               "--data_path", str(data), "--max_seq_len", "64", "--batch_size", "2", "--accumulation_steps", "1",
               "--log_interval", "1", "--save_interval", "2", "--num_workers", "0"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    stdout = run([*command, "--out_dir", str(reference), "--max_steps", "4"])
    # embedding 6400*768 + final norm 768 + 2 x (q, o 768*768; k, v 384*768; q/k norms 96; norms 2*768; FFN 3*768*2432)
    assert "pretrain: 19.665M parameters" in stdout
    run([*command, "--out_dir", str(resumed), "--max_steps", "2"])
    assert "at step 2" in run([*command, "--out_dir", str(resumed), "--max_steps", "4", "--resume", "1"])
    weights = resumed / "pretrain_768.pth"
    state = torch.load(weights, weights_only=True)
    assert same_weights(state, torch.load(reference / "pretrain_768.pth", weights_only=True))
    assert state["layers.1.attention.q_norm.weight"].shape == (96,) and state["layers.1.attention.wk.weight"].shape == (384, 768)

    hf_path = tmp_path / "hf"
    assert "Qwen3ForCausalLM" in run([sys.executable, "scripts/convert_model.py", "torch2hf", "--weight", str(weights),
                                      "--hf_path", str(hf_path)])
    ours = load_pretrained(weights)
    assert ours.config.qk_norm and ours.config.norm_eps == 1e-6 and (ours.config.n_heads, ours.config.n_kv_heads) == (8, 4)
    hf = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    assert type(hf) is Qwen3ForCausalLM
    ids = torch.tensor([tokenizer.encode("人类大脑的主要功能是处理信息", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    stdout = run([sys.executable, "eval_model.py", "--weight", str(weights), "--model_mode", "0", "--device", "cpu",
                  "--prompt", "人类大脑", "--max_new_tokens", "8", "--temperature", "0"])
    assert "人类大脑" in stdout


def test_minimind3_moe_preset_trains_with_its_balancing_loss():
    """One layer of minimind-3-moe: 4 experts, one per token with weight 1, no shared expert; in training the
    balancing loss is alpha * E * sum_e(share of tokens routed to e * mean router probability of e)."""
    torch.manual_seed(0)
    model = MiniMindLM(preset("minimind-3-moe", n_layers=1, max_seq_len=64)).train()
    ids = torch.randint(0, 6400, (2, 32))
    out = model(ids)
    gate = model.layers[0].feed_forward.gate
    with torch.no_grad():
        h = model.layers[0].attention(model.layers[0].attention_norm(model.tok_embeddings(ids)),
                                      *model.rotary(torch.arange(32).expand(2, 32)), None)
        h = h + model.tok_embeddings(ids)
        probs = torch.softmax(model.layers[0].ffn_norm(h).reshape(-1, 768) @ gate.weight.T, dim=-1)
        share = torch.bincount(probs.argmax(-1), minlength=4).float() / probs.shape[0]
    torch.testing.assert_close(out.aux_loss, 5e-4 * 4 * (share * probs.mean(0)).sum())
    (F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), ids[:, 1:].reshape(-1)) + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
