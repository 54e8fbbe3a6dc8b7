"""Facts every part of MiniMind shares, each defined once: the kinds of user error, dtype names, and the stages a
checkpoint can come from.

User errors. Anything wrong with what the user gave us (a missing file, a malformed data line, a checkpoint that is
truncated or of another shape, flags that cannot work together) raises an `InputError`. Every command-line entry
point catches it and prints one line, `error: <what and where>: <what to do>`, with exit code 2 and no traceback;
any other exception is a bug and keeps its traceback. Each kind also derives from the built-in type that callers
would naturally catch (FileNotFoundError, ValueError).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch


class InputError(Exception):
    """A problem with the user's files, data or flags; the message names it and says what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """A data file, tokenizer, weights or config file is absent; the message says how to get it."""


class DataFormatError(InputError, ValueError):
    """A malformed line of a data file; the message names the file, the line and the field."""


class CheckpointError(InputError, ValueError):
    """A weights or resume file that cannot be read (truncated, corrupted, not a checkpoint at all)."""


class WeightsMismatchError(InputError, ValueError):
    """Weights whose names or shapes do not fit the model built from the flags."""


class ConfigError(InputError, ValueError):
    """Flags or config values that cannot work together (model shape, DeepSpeed config, resume settings, device)."""


def require_file(path: str | os.PathLike, how_to_get: str, what: str = "") -> Path:
    """The path, if it exists (file or folder); else MissingInputError naming `what` is missing (e.g. "weights
    file") and how to get it."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{what + ' ' if what else ''}{path} not found: {how_to_get}")
    return path


def why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load(weights_only=True) refused, in the user's words rather than torch's."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if "zip archive" in str(error):
        return "an incomplete or damaged archive: a truncated download, an interrupted copy or a changed file"
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
        return "it holds Python objects other than tensors, so it is not a weights file"
    return "not a file torch.save wrote"


def read_checkpoint(path: str | os.PathLike, how_to_get: str, what: str = "weights file") -> dict:
    """The dict saved in a .pth file (weights, adapter or resume state), read on the CPU without executing code.

    A missing file is a MissingInputError saying `how_to_get` it; a file torch cannot read (truncated, corrupted,
    not a checkpoint) or one that holds something else than a dict is a CheckpointError."""
    path = require_file(path, how_to_get, what)
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a .pth file: {how_to_get}")
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol would warn before the error says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and storage errors of a damaged file all land here
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({why_unreadable(path, error)}): "
                              f"{how_to_get}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}): {how_to_get}")
    return state


WORKER_TRACEBACK_MARK = "Original Traceback"


def one_line(error: BaseException) -> str:
    """The message of a user error as one line. A DataLoader worker re-raises its exception with the worker's
    traceback inside the message; the last line of that holds the original message."""
    message = str(error).strip()
    if WORKER_TRACEBACK_MARK in message:  # its last line is "package.module.ErrorClass: the original message"
        head, _, rest = message.splitlines()[-1].partition(": ")
        message = rest if head.split(".")[-1] == type(error).__name__ else message.splitlines()[-1]
    return " ".join(message.split("\n"))


Result = TypeVar("Result")


def exit_on_input_error(main: Callable[[], Result]) -> Result:
    """Run a command's main(): a user error ends the process with one line on stderr and exit code 2."""
    try:
        return main()
    except InputError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Devices and precision names


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks cuda (this process's GPU) -> mps -> cpu; an explicit name must be usable here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine (use --device cpu or auto)")
    return device



DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------
# Stages: the weight-file prefixes in out/, the mode numbers of eval_model.py and the script that writes each

MODEL_MODES = {0: "pretrain", 1: "full_sft", 2: "rlhf", 3: "reason"}
PRETRAIN_MODE, REASON_MODE = 0, 3  # raw-text continuation; replies that think before they answer
STAGE_SCRIPTS = {
    "pretrain": "train_pretrain.py",
    "full_sft": "train_full_sft.py",
    "rlhf": "train_dpo.py",
    "reason": "train_distill_reason.py",
    "full_dist": "train_distillation.py",
    "grpo": "train_grpo.py",
    "ppo": "train_ppo.py",
}


def parse_model_mode(value: str | int) -> int:
    """A model mode given as its number (`1`) or its stage name (`full_sft`), as argparse's `type=`."""
    text = str(value).strip()
    if text.isdigit() and int(text) in MODEL_MODES:
        return int(text)
    for mode, stage in MODEL_MODES.items():
        if text == stage:
            return mode
    choices = ", ".join(f"{mode} or {stage}" for mode, stage in MODEL_MODES.items())
    raise argparse.ArgumentTypeError(f"unknown model mode {value!r}: use {choices}")
