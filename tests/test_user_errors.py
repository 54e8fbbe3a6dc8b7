"""Every user error is one clear line: a bad data line in any stage's data, a truncated or foreign .pth, weights
of another shape, a bad tokenizer corpus. Each script exits with code 2 and prints `error: ...` naming the file
(and line and field) and what to do, without a traceback. The scripts run in this process through runpy, as
`python script.py` would run them; one test runs a subprocess to see exactly what a terminal shows."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CPU_FP32, ROOT, TINY, TINY_FLAGS, subprocess_env, tiny_model

GOOD_TEXT = {"text": "a good line of text"}
GOOD_CHAT = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PAIR = {"chosen": GOOD_CHAT["conversations"],
             "rejected": [GOOD_CHAT["conversations"][0], {"role": "assistant", "content": "go away"}]}


def run_script(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run `python script argv...` in this process; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A complete tiny checkpoint, usable as any stage's starting weights or as a teacher."""
    path = tmp_path_factory.mktemp("weights") / "tiny_64.pth"
    torch.manual_seed(0)
    torch.save(tiny_model().state_dict(), path)
    return path


STAGE_CASES = [  # script, a good line, the bad second line, what the message must say about it
    ("train_pretrain.py", GOOD_TEXT, '{"text": 42}', "field 'text' must be a string"),
    ("train_full_sft.py", GOOD_CHAT, '{"conversations": [{"role": "robot", "content": "x"}]}',
     "field 'conversations[0].role' must be one of system, user, assistant"),
    ("train_lora.py", GOOD_CHAT, '{"conversations": "hi"}', "field 'conversations' must be a non-empty list"),
    ("train_dpo.py", GOOD_PAIR, '{"chosen": []}', "field 'chosen' must be a non-empty list"),
    ("train_distillation.py", GOOD_CHAT, '{"conversations": [', "invalid JSON"),
    ("train_distill_reason.py", GOOD_CHAT, '["a", "list"]', "expected a JSON object"),
]


@pytest.mark.parametrize("script, good, bad, message", STAGE_CASES, ids=[case[0] for case in STAGE_CASES])
def test_a_bad_data_line_in_each_stage_is_one_line(script, good, bad, message, tmp_path, tiny_weights, monkeypatch,
                                                   capsys):
    data = write_lines(tmp_path / "data.jsonl", json.dumps(good), bad)
    argv = [*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(tmp_path / "out"), "--batch_size", "2",
            "--accumulation_steps", "1", "--max_seq_len", "32", "--num_workers", "0",
            "--from_weight", "none" if script == "train_pretrain.py" else str(tiny_weights)]
    if script == "train_distillation.py":
        argv += [*(f"--teacher_{flag[2:]}" if flag.startswith("--") else flag for flag in TINY_FLAGS),
                 "--teacher_weight", str(tiny_weights)]
    code, stderr = run_script(script, argv, monkeypatch, capsys)
    assert_one_line_error(code, stderr, f"{data}:2: {message}")


def test_a_bad_line_read_by_a_dataloader_worker_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A worker process re-raises its error with its own traceback inside the message: still one line."""
    data = write_lines(tmp_path / "data.jsonl", json.dumps(GOOD_TEXT), "not json")
    argv = [*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(tmp_path), "--batch_size", "2",
            "--accumulation_steps", "1", "--num_workers", "1"]
    code, stderr = run_script("train_pretrain.py", argv, monkeypatch, capsys)
    assert_one_line_error(code, stderr, f"{data}:2: invalid JSON")


class NotWeights:
    """Something torch.save can pickle but a weights-only load must refuse."""


@pytest.fixture
def broken_checkpoints(tmp_path, tiny_weights) -> dict[str, Path]:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_weights.read_bytes()[: tiny_weights.stat().st_size // 2])
    foreign = tmp_path / "notes.pth"
    foreign.write_text("these are my notes, not a checkpoint\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    objects = tmp_path / "objects.pth"
    torch.save({"model": NotWeights()}, objects)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    return {"truncated": truncated, "foreign": foreign, "empty": empty, "objects": objects, "not_a_dict": not_a_dict}


UNREADABLE_REASONS = {  # what the one line must say of each kind of broken file
    "truncated": "is not a readable PyTorch checkpoint (an incomplete or damaged archive",
    "foreign": "is not a readable PyTorch checkpoint (not a file torch.save wrote)",
    "empty": "is not a readable PyTorch checkpoint (the file is empty)",
    "objects": "is not a readable PyTorch checkpoint (it holds Python objects other than tensors",
    "not_a_dict": "does not hold a state dict (found Tensor)",
}


@pytest.mark.parametrize("kind", UNREADABLE_REASONS)
def test_an_unreadable_weights_file_is_one_line(kind, broken_checkpoints, monkeypatch, capsys):
    path = broken_checkpoints[kind]
    code, stderr = run_script("eval_model.py", [*TINY_FLAGS, "--device", "cpu", "--weight", str(path), "--prompt", "hi"],
                              monkeypatch, capsys)
    assert_one_line_error(code, stderr, str(path), UNREADABLE_REASONS[kind], "run train_full_sft.py first")
    assert "weights_only" not in stderr and "pickle" not in stderr  # no torch advice about unsafe loading


def test_a_truncated_starting_checkpoint_stops_a_training_stage_in_one_line(tmp_path, broken_checkpoints, monkeypatch,
                                                                             capsys):
    data = write_lines(tmp_path / "sft.jsonl", *[json.dumps(GOOD_CHAT)] * 4)
    argv = [*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(tmp_path), "--from_weight",
            str(broken_checkpoints["truncated"])]
    code, stderr = run_script("train_full_sft.py", argv, monkeypatch, capsys)
    assert_one_line_error(code, stderr, str(broken_checkpoints["truncated"]), "is not a readable PyTorch checkpoint")


def test_weights_of_another_shape_are_one_line(tiny_weights, monkeypatch, capsys):
    flags = ["--dim", "128", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
    code, stderr = run_script("eval_model.py", [*flags, "--device", "cpu", "--weight", str(tiny_weights), "--prompt", "hi"],
                              monkeypatch, capsys)
    assert_one_line_error(code, stderr, str(tiny_weights), "does not fit the model built from the flags (--dim 128",
                          f"tok_embeddings.weight is (6400, {TINY['dim']}) in the file but (6400, 128) in the model")


def test_convert_and_tokenizer_scripts_report_bad_input_in_one_line(tmp_path, broken_checkpoints, monkeypatch, capsys):
    code, stderr = run_script("scripts/convert_model.py", ["torch2hf", "--weight", str(broken_checkpoints["foreign"]),
                                                           "--hf_path", str(tmp_path / "hf")], monkeypatch, capsys)
    assert_one_line_error(code, stderr, str(broken_checkpoints["foreign"]), "is not a readable PyTorch checkpoint")
    corpus = write_lines(tmp_path / "corpus.jsonl", json.dumps(GOOD_TEXT), '{"title": "no text"}')
    code, stderr = run_script("scripts/train_tokenizer.py", ["--data_path", str(corpus), "--out_dir", str(tmp_path / "t")],
                              monkeypatch, capsys)
    assert_one_line_error(code, stderr, f"{corpus}:2: no 'text' or 'conversations' field")


@pytest.mark.slow
def test_the_terminal_sees_one_line_and_exit_code_2(broken_checkpoints):
    """As a user runs it: no traceback, nothing but the one line on stderr."""
    path = broken_checkpoints["truncated"]
    result = subprocess.run([sys.executable, "eval_model.py", *TINY_FLAGS, "--device", "cpu", "--weight", str(path),
                             "--prompt", "hi"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert_one_line_error(result.returncode, result.stderr, str(path), "is not a readable PyTorch checkpoint")
