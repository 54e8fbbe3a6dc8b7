"""Shared test setup: no network, the one tiny architecture, the shipped tokenizer, helpers to run the scripts as
users do, and the shared data folder when it exists.

Tests marked `slow` run scripts end to end in subprocesses (torchrun, DeepSpeed, uvicorn, streamlit, SIGKILL,
the demo); `python -m pytest -m "not slow" tests` is the fast inner loop.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_DIR = ROOT / "model" / "minimind_tokenizer"

from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindLM  # noqa: E402

# The one tiny architecture of the tests, as LMConfig fields and as the scripts' flags
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
TINY_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
CPU_FP32 = ["--device", "cpu", "--dtype", "float32"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs in subprocesses; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: CI has it; on a fresh user clone these tests skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide the shared data folder at {SHARED_DATA}")
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (present in CI, not in a fresh clone)")
    return SHARED_DATA


def tiny_model(state_dict: dict | None = None, **overrides) -> MiniMindLM:
    """The tiny architecture (vocabulary of the shipped tokenizer unless overridden) in eval mode, optionally
    loaded with strict=True."""
    model = MiniMindLM(LMConfig(**{**TINY, "vocab_size": 6400, **overrides})).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weight_differences(a: dict, b: dict) -> dict[str, float]:
    """For a failed same_weights: the largest absolute difference of each tensor that differs."""
    return {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b and not torch.equal(a[k], b[k])}


def jsonl_lines(path: Path) -> list[str]:
    """The records of a jsonl file, without newlines. Split on "\\n" only: the shared data holds U+2028 inside
    strings, where str.splitlines would cut a record in two."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def write_lines(source: Path, destination: Path, start: int, stop: int) -> Path:
    """A slice of a shared data file in the test's temp folder (never in the repository)."""
    lines = jsonl_lines(source)[start:stop]
    assert len(lines) == stop - start
    return write_jsonl(lines, destination)


def write_jsonl(lines: list[str], path: Path) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test process's environment, offline, plus `extra`."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", **extra}


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command from the repository root; it must succeed. Returns its stdout."""
    result = subprocess.run(args, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process training with one thread: tiny matrices are fastest that way, and the other core stays free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
