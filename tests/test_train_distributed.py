"""Distributed runs on CPU (gloo) against one process with the same global batch: DDP under torchrun, a resume
with a different world size, and DeepSpeed ZeRO-2 (train, save, resume); and the check that replicas agree.

Every micro-batch here is full length (max_seq_len 32, texts longer than that), so the mean loss over one global
batch equals the mean of the per-rank means and the runs must agree up to float summation order."""
from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoTokenizer

from conftest import ROOT, TOKENIZER_DIR
from model.dataset import PretrainDataset
from test_train_runs import CPU_FP32, TINY_MODEL, run, subprocess_env, write_lines

TOLERANCE = 1e-5  # float32 weights after 4 AdamW steps of lr <= 5e-4; observed differences are ~6e-7
RUN = [*CPU_FP32, *TINY_MODEL, "--max_seq_len", "32", "--accumulation_steps", "2", "--log_interval", "1",
       "--save_interval", "2", "--num_workers", "0"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def max_difference(a_file, b_file) -> float:
    a, b = torch.load(a_file, weights_only=True), torch.load(b_file, weights_only=True)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def data_and_reference(tmp_path, shared_data):
    """72 texts that all fill max_seq_len, and the single-process run (batch 4) every distributed run must match."""
    data = write_lines(shared_data / "pretrain_mini.jsonl", tmp_path / "pretrain_72.jsonl", 0, 72)
    dataset = PretrainDataset(data, AutoTokenizer.from_pretrained(TOKENIZER_DIR), max_length=32)
    assert all(float(dataset[i][2].sum()) == 31 for i in range(len(dataset)))  # the premise of the comparison
    reference = tmp_path / "single"
    run([sys.executable, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(reference),
         "--batch_size", "4", "--max_steps", "4"])
    return data, reference / "pretrain_64.pth"


def test_ddp_matches_one_process_and_resumes_with_another_world_size(tmp_path, data_and_reference):
    data, reference = data_and_reference
    ddp = tmp_path / "ddp"
    stdout = run([*TORCHRUN_2, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(ddp),
                  "--batch_size", "2", "--max_steps", "4"])
    assert "replicas in sync across 2 ranks" in stdout  # checked parameter by parameter on every rank
    assert stdout.count("epoch 1/1 | step 4/4") == 1  # only rank 0 logs
    assert max_difference(ddp / "pretrain_64.pth", reference) < TOLERANCE

    # Stopped after 2 steps by 2 processes, continued by 1 process from the same global sample position.
    switched = tmp_path / "switched"
    run([*TORCHRUN_2, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(switched),
         "--batch_size", "2", "--max_steps", "2"])
    stdout = run([sys.executable, "train_pretrain.py", *RUN, "--data_path", str(data), "--out_dir", str(switched),
                  "--batch_size", "4", "--max_steps", "4", "--resume", "1"])
    assert "at step 2 (epoch 1, sample 16/72; written by 2 process(es), now 1)" in stdout
    assert max_difference(switched / "pretrain_64.pth", reference) < TOLERANCE


def test_deepspeed_zero2_trains_saves_and_resumes(tmp_path, data_and_reference):
    """First run on a machine JIT-builds DeepSpeed's shm op (~90 s, cached in ~/.cache/torch_extensions)."""
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
