"""Distributed runs on CPU (gloo) against one process with the same global batch: DDP under torchrun, a resume
with a different world size, and DeepSpeed ZeRO-2 (train, save, resume); and the check that replicas agree.

Every micro-batch here is full length (max_seq_len 32, texts longer than that), so the mean loss over one global
batch equals the mean of the per-rank means and the runs must agree up to float summation order."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import CPU_FP32, ROOT, TINY_FLAGS, TORCHRUN_2, run, subprocess_env, write_lines
from model.dataset import PretrainDataset

pytestmark = pytest.mark.slow  # every test here launches torchrun (and DeepSpeed) processes

# float32 weights after 4 AdamW steps of lr <= 5e-4. Summation order differs between one process and two, and
# Adam's normalisation amplifies that for rarely seen tokens' embeddings (observed: 1.2e-5); a rank that read other
# samples than the single process would differ by about the learning rate.
TOLERANCE = 5e-5
RUN = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "32", "--accumulation_steps", "2", "--log_interval", "1",
       "--save_interval", "2", "--num_workers", "0"]


def max_difference(a_file, b_file) -> float:
    a, b = torch.load(a_file, weights_only=True), torch.load(b_file, weights_only=True)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory, shared_data, tokenizer):
    """72 texts that all fill max_seq_len, and the single-process run (batch 4) every distributed run must match."""
    folder = tmp_path_factory.mktemp("distributed")
    data = write_lines(shared_data / "pretrain_mini.jsonl", folder / "pretrain_72.jsonl", 0, 72)
    dataset = PretrainDataset(data, tokenizer, max_length=32)
    assert all(float(dataset[i][2].sum()) == 31 for i in range(len(dataset)))  # the premise of the comparison
    reference = folder / "single"
    run([sys.executable, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(reference),
         "--batch_size", "4", "--max_steps", "4"])
    return data, reference / "pretrain_64.pth"


def test_ddp_matches_one_process(tmp_path, data_and_reference):
    data, reference = data_and_reference
    ddp = tmp_path / "ddp"
    stdout = run([*TORCHRUN_2, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(ddp),
                  "--batch_size", "2", "--max_steps", "4"])
    assert "replicas in sync across 2 ranks" in stdout  # checked parameter by parameter on every rank
    assert stdout.count("epoch 1/1 | step 4/4") == 1  # only rank 0 logs
    assert max_difference(ddp / "pretrain_64.pth", reference) < TOLERANCE


def test_ddp_run_resumes_with_another_world_size(tmp_path, data_and_reference):
    """Stopped after 2 steps by 2 processes, continued by 1 process from the same global sample position."""
    data, reference = data_and_reference
    switched = tmp_path / "switched"
    run([*TORCHRUN_2, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(switched),
         "--batch_size", "2", "--max_steps", "2"])
    stdout = run([sys.executable, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(switched),
                  "--batch_size", "4", "--max_steps", "4", "--resume", "1"])
    assert "at step 2 (epoch 1, sample 16/72; written by 2 process(es), now 1)" in stdout
    assert max_difference(switched / "pretrain_64.pth", reference) < TOLERANCE


def test_deepspeed_zero2_resumes_from_its_partitioned_checkpoint(tmp_path, data_and_reference):
    """ZeRO-2 over 2 processes writes partitioned optimizer states; resumed through ds_config.json, the run ends
    where one process ends. The first run on a machine JIT-builds DeepSpeed's shm op (~90 s, then cached)."""
    data, reference = data_and_reference
    out = tmp_path / "ds"
    command = [*TORCHRUN_2, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(out), "--batch_size", "2"]
    run([*command, "--zero_stage", "2", "--max_steps", "2"], timeout=600)
    state = torch.load(out / "pretrain_64_resume.pth", weights_only=True)
    assert state["step"] == 2 and state["deepspeed"] == {"tag": "step_2", "zero_stage": 2}
    assert sorted(p.name for p in (out / "pretrain_64_resume" / "step_2").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # partitioned

    # Resume through the shipped config file (ZeRO-2 too, "auto" values from the flags).
    stdout = run([*command, "--deepspeed", "ds_config.json", "--max_steps", "4", "--resume", "1"])
    assert "resumed from" in stdout and "at step 2 (epoch 1, sample 16/72" in stdout
    assert "replicas in sync across 2 ranks" in stdout
    assert [p.name for p in (out / "pretrain_64_resume").glob("step_*")] == ["step_4"]  # the old tag was removed
    assert max_difference(out / "pretrain_64.pth", reference) < TOLERANCE


REPLICA_CHECK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from model.distributed import check_replicas_in_sync, cleanup_distributed, init_distributed
ctx = init_distributed("cpu")
torch.manual_seed(0)  # the same initial weights and bias on both ranks
model = torch.nn.Linear(4, 3)
if ctx.rank == 1 and os.environ["PERTURB"] == "1":
    with torch.no_grad():
        model.weight[2, 1] += 1e-6
try:
    check_replicas_in_sync(model, ctx)
    print(f"rank {{ctx.rank}}: in sync")
except RuntimeError as error:
    print(f"rank {{ctx.rank}}: {{error}}")
finally:
    cleanup_distributed()  # without it gloo's threads can abort the interpreter at exit (SIGABRT)
"""


@pytest.mark.parametrize("perturb", ["0", "1"])
def test_replica_check_detects_a_single_changed_element(tmp_path, perturb):
    script = tmp_path / "check.py"
    script.write_text(REPLICA_CHECK_SCRIPT.format(root=str(ROOT)))
    stdout = run([*TORCHRUN_2, str(script)], env=subprocess_env(PERTURB=perturb))
    if perturb == "1":
        assert stdout.count("model replicas diverged: rank 1 differs from rank 0") == 2  # every rank raises
    else:
        assert stdout.count("in sync") == 2
