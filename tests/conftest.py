"""Shared test setup: no network, tiny configs, and the shared data folder when it exists."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_DIR = ROOT / "model" / "minimind_tokenizer"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs in subprocesses; deselect with -m 'not slow'")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout: CI has it; on a fresh user clone these tests skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide the shared data folder at {SHARED_DATA}")
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (present in CI, not in a fresh clone)")
    return SHARED_DATA


def jsonl_lines(path: Path) -> list[str]:
    """The records of a jsonl file, without newlines. Split on "\\n" only: the shared data holds U+2028 inside
    strings, where str.splitlines would cut a record in two."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
