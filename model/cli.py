"""The command-line flags every `train_*.py` stage shares, defined once.

A stage calls `training_parser(...)` with its own defaults (data file, learning rate, ...), adds its own group of
flags (e.g. `--beta` for DPO) with `parser.add_argument_group`, and parses. Booleans take explicit values
(`--use_moe 1`, `--use_wandb false`): argparse's `type=bool` would turn the string "False" into True.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .backend import resolve_training_dtype
from .checkpoint import seed_everything
from .common import DTYPES, exit_on_input_error, require_file
from .dataset import (
    HOW_TO_PRETOKENIZE, Batch, PackedCollator, PackedDataset, PadCollator, open_documents, useful_token_share,
)
from .distributed import DistContext, cleanup_distributed, init_distributed, uses_deepspeed
from .LMConfig import PRESETS, LMConfig
from .trainer import TrainSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT / "model" / "minimind_tokenizer"


def str2bool(value: str | bool) -> bool:
    """Parse 1/0, true/false, yes/no, on/off (any case); anything else is an argparse error."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false, yes/no), got {value!r}")


ARCHITECTURE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "use_moe")


def add_architecture_args(group: argparse._ActionsContainer, *, from_weights: bool = False) -> None:
    """The flags that name a MiniMind shape (shared by training, inference and conversion): --preset, then flags
    that override single fields of it. `config_from_args` turns them into an LMConfig. `from_weights`: where
    weights are read, unset flags are read from them (model/loading.py) instead of defaulting to MiniMind2-Small."""
    unset = "read from the weights" if from_weights else "the preset's, else MiniMind2-Small's"
    group.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help=f"a published architecture (sizes in the README's model table); default: {unset}")
    group.add_argument("--dim", type=int, default=None, help=f"hidden size (default: {unset})")
    group.add_argument("--n_layers", type=int, default=None, help=f"transformer blocks (default: {unset})")
    group.add_argument("--n_heads", type=int, default=None,
                       help="query heads (default: the preset's, else 8; weights without q/k norms cannot tell)")
    group.add_argument("--n_kv_heads", type=int, default=None,
                       help=f"key/value heads, grouped-query attention (default: {unset})")
    group.add_argument("--use_moe", type=str2bool, default=None, help=f"mixture-of-experts feed-forward (1/0) (default: {unset})")


def architecture_fields(args: argparse.Namespace) -> dict:
    """The LMConfig fields the architecture flags set explicitly (the unset ones are left out)."""
    return {name: getattr(args, name) for name in ARCHITECTURE_FLAGS if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace, **fields) -> LMConfig:
    """The LMConfig the architecture flags describe (--preset, default MiniMind2-Small, with single flags on top),
    plus `fields` the caller knows (vocab_size, dropout, ...)."""
    return LMConfig(**{**PRESETS[args.preset or "MiniMind2-Small"], **architecture_fields(args), **fields})


def training_parser(
    description: str,
    *,
    data_path: str,
    learning_rate: float,
    wandb_project: str,
    from_weight: str = "none",
    epochs: int = 1,
    batch_size: int = 32,
    accumulation_steps: int = 8,
    max_seq_len: int = 512,
    save_interval: int = 100,
    log_interval: int = 100,
    warmup_iters: int = 0,
    packing: bool = True,
) -> argparse.ArgumentParser:
    """The shared flags, grouped as in the stage scripts; keyword arguments are this stage's defaults.
    `packing=False` leaves out --packed, for a stage whose samples cannot share a row (DPO's pairs)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    # Output and logging
    group = parser.add_argument_group("output and logging")
    group.add_argument("--out_dir", default="out", help="folder for weights, resume file, metrics and loss plot")
    group.add_argument("--log_interval", type=int, default=log_interval, help="optimizer steps between log lines")
    group.add_argument("--use_wandb", type=str2bool, default=False, help="log to Weights & Biases (1/0)")
    group.add_argument("--report_to", choices=("none", "wandb"), default="none", help="'wandb' is the same as --use_wandb 1")
    group.add_argument("--wandb_project", default=wandb_project, help="wandb project name")
    group.add_argument("--wandb_run_name", default=None, help="wandb run name (default: stage, size and hyper-parameters)")

    # Runtime
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    group.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="autocast dtype (float16 adds a GradScaler); auto: bfloat16 on GPUs and CPUs with native "
                            "bfloat16, float16 on older GPUs, float32 on other CPUs")
    group.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    group.add_argument("--compile", type=str2bool, default=False,
                       help="torch.compile the model (1/0): faster steps on GPU after a slow start while it compiles")
    group.add_argument("--seed", type=int, default=1337, help="base seed; rank r seeds its RNGs with seed + r")

    # Data
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=data_path,
                       help="training data: jsonl" + (", or NAME.bin from scripts/pretokenize.py" if packing else ""))
    group.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER), help="tokenizer folder")
    group.add_argument("--max_seq_len", type=int, default=max_seq_len, help="tokens per sample (longer ones are cut)")
    if packing:
        group.add_argument("--packed", type=str2bool, default=False,
                           help="pack whole documents side by side into rows of max_seq_len tokens instead of padding "
                                "each one (1/0); each document still attends only to itself")

    # Model
    group = parser.add_argument_group("model")
    add_architecture_args(group)
    group.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    group.add_argument(
        "--from_weight",
        default=from_weight,
        help="starting weights: 'none' (random init), a stage name ('pretrain' -> OUT_DIR/pretrain_{dim}[_moe].pth) or a .pth path",
    )

    # Optimisation
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=epochs, help="passes over the data")
    group.add_argument("--batch_size", type=int, default=batch_size, help="samples per micro-batch per process")
    group.add_argument("--accumulation_steps", type=int, default=accumulation_steps, help="micro-batches per optimizer step")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help="peak learning rate")
    group.add_argument("--warmup_iters", type=int, default=warmup_iters, help="linear warm-up steps, then cosine to 10%% of peak")
    group.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    group.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 disables)")

    # Horizon and checkpoints
    group = parser.add_argument_group("horizon and checkpoints")
    group.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps in total (0: run all epochs)")
    group.add_argument("--save_interval", type=int, default=save_interval, help="optimizer steps between checkpoints")
    group.add_argument("--save_dtype", choices=list(DTYPES), default="float32", help="dtype of the weights file (the resume file is always exact)")
    group.add_argument("--resume", type=str2bool, default=False, help="continue from the resume file beside the weights (1/0)")

    # Distributed
    group = parser.add_argument_group("distributed (torchrun sets up DDP by itself)")
    group.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (e.g. ds_config.json); 'auto' values are filled in")
    group.add_argument("--zero_stage", type=int, choices=(0, 1, 2), default=None, help="use DeepSpeed with this ZeRO stage")
    group.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The Trainer's settings from the parsed flags (fields and flags share their names; a field no stage flag
    sets, such as updates_per_batch outside RL, keeps its default); every flag is kept in `flags` for the resume
    file and wandb."""
    names = {f.name for f in fields(TrainSettings)} - {"flags"}
    return TrainSettings(**{name: getattr(args, name) for name in names if hasattr(args, name)}, flags=dict(vars(args)))


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check values that argparse cannot check alone."""
    args = parser.parse_args(argv)
    if args.report_to == "wandb":
        args.use_wandb = True
    for name in ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_iters", "max_steps", "num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    config = config_from_args(args)  # the architecture flags as trained, for logs, run names and the resume file
    for name in ARCHITECTURE_FLAGS:
        setattr(args, name, getattr(config, name))
    return args


MINIMIND_DATASET = ("the MiniMind dataset (https://huggingface.co/datasets/jingyaogong/minimind_dataset "
                    "or https://www.modelscope.cn/datasets/gongjy/minimind_dataset)")


def require_data(args: argparse.Namespace, dataset_file: str) -> Path:
    """--data_path, which must exist; the error names the MiniMind dataset file to download (or, for a NAME.bin,
    how to write it)."""
    if Path(args.data_path).suffix == ".bin":
        return require_file(args.data_path, HOW_TO_PRETOKENIZE, "token file")
    return require_file(args.data_path, f"download {dataset_file} from {MINIMIND_DATASET} into ./dataset/, "
                                        "or pass --data_path PATH")


def training_data(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, ctx: DistContext, *,
                  chat: bool) -> tuple[Dataset, Callable[[list], Batch]]:
    """The stage's dataset and collator from --data_path, --max_seq_len and --packed: one document per sample,
    padded (PretrainDataset / SFTDataset for jsonl, PretokenizedDataset for NAME.bin), or with --packed 1 rows of
    whole documents (PackedDataset). `chat`: the stage trains on conversations (text lines allowed) rather than
    on pretraining text."""
    if not args.packed:
        return open_documents(args.data_path, tokenizer, args.max_seq_len, chat), PadCollator(tokenizer.pad_token_id)
    dataset = PackedDataset(args.data_path, tokenizer, args.max_seq_len, chat=chat, num_workers=args.num_workers,
                            progress=ctx.is_main)
    if ctx.is_main:
        print(f"packed {len(dataset.documents):,} documents into {len(dataset):,} rows of {dataset.row_length} "
              f"positions, {useful_token_share(dataset):.1%} of them document tokens", flush=True)
    return dataset, PackedCollator(tokenizer.pad_token_id, dataset.row_length)


def load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(require_file(args.tokenizer_path, "pass --tokenizer_path to a tokenizer folder",
                                                      "tokenizer folder"))


# ----------------------------------------------------------------------------------------------------------------
# Start and end of a stage script


def init_run(args: argparse.Namespace) -> DistContext:
    """Start-of-stage setup: processes and device, then the same seed on every rank so every replica builds the
    same initial model (the Trainer reseeds per rank before the loop)."""
    ctx = init_distributed(args.device, use_deepspeed=uses_deepspeed(args))
    args.dtype = resolve_training_dtype(args.dtype, ctx.device)
    seed_everything(args.seed)
    return ctx


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's main(): a user error (model.common.InputError) ends the process with one line and exit code
    2 instead of a traceback; the process group is torn down in every case."""
    finished = False
    try:
        exit_on_input_error(main)
        finished = True
    finally:
        cleanup_distributed(finished)
