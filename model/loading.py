"""Loading a MiniMind model: a source and flags in, a model (and for chat, its tokenizer) out, in one direction.

    source (.pth file or Hugging Face folder, of any release)
      -> read_source:      the tensors, and config.json for a folder
      -> detect_layout:    which release's names and rotary order (model/releases.py), unless --layout says
      -> native_names:     our key names
      -> the LMConfig:     config.json, else the tensors' shapes + the release's defaults + --preset + flags
      -> reorder_rotary:   q/k rows into the model's rotary order (a fixed permutation: no cost per token)
      -> strict check:     every key and shape fits MiniMindLM(config), or one error naming what differs
    = LoadedWeights(config, state, layout), which load_pretrained builds into a MiniMindLM and load_model (for
    eval_model.py, the server, the web demo and eval_bench) readies for generation with its tokenizer, LoRA
    adapter, precision and compilation. Training's --from_weight and convert_model.py read through the same path.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import describe_mismatch, resolve_from_weight, weights_path
from .cli import DEFAULT_TOKENIZER, add_architecture_args, architecture_fields, config_from_args, str2bool
from .common import (
    DTYPES, MODEL_MODES, STAGE_SCRIPTS, ConfigError, MissingInputError, WeightsMismatchError, parse_model_mode,
    read_checkpoint, require_file, select_device, torch_dtype,
)
from .LMConfig import PRESETS, LMConfig
from .model import MiniMindLM
from .model_lora import attach_lora_file, lora_path, merge_lora
from .quantize import quantize_linear_layers
from .releases import (
    LAYOUTS, NATIVE, config_from_json, detect_layout, infer_config, native_names, reorder_rotary, rope_layout_of,
    strip_wrappers, tie_or_untie,
)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
PUBLISHED_WEIGHTS = "https://www.modelscope.cn/models/gongjy/MiniMind2-PyTorch/files"
HOW_TO_EXPORT = "export a model with `python scripts/convert_model.py torch2hf --weight out/full_sft_512.pth --hf_path DIR`"


# ----------------------------------------------------------------------------------------------------------------
# Files


def read_hf_weights(hf_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    folder = Path(hf_path)
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        with open(folder / WEIGHTS_INDEX_NAME, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if (folder / TORCH_WEIGHTS_NAME).is_file():
        return read_checkpoint(folder / TORCH_WEIGHTS_NAME, f"re-export {hf_path} with scripts/convert_model.py torch2hf")
    raise MissingInputError(f"no weights in {hf_path}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}")


def read_config_json(hf_path: str | os.PathLike) -> dict:
    path = Path(hf_path) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None


def read_source(source: str | os.PathLike, how_to_get: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, config.json or None) of a .pth file or a model folder (a folder without config.json has its
    architecture read from the tensors, like a .pth)."""
    folder = Path(source)
    if not folder.is_dir():
        return read_checkpoint(source, how_to_get), None
    has_config = (folder / "config.json").is_file()
    if not has_config and not any((folder / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME)):
        raise MissingInputError(f"{folder / 'config.json'} not found (nor any weights): {HOW_TO_EXPORT}")
    return read_hf_weights(folder), read_config_json(folder) if has_config else None


# ----------------------------------------------------------------------------------------------------------------
# Any release -> our layout


@dataclass
class LoadedWeights:
    config: LMConfig
    state: dict[str, torch.Tensor]  # our names and rotary order: MiniMindLM(config).load_state_dict(state, strict=True)
    layout: str  # the release layout it was stored in (model/releases.py)
    source: str


def flags_hint(config: LMConfig) -> str:
    return (f"--dim {config.dim} --n_layers {config.n_layers} --n_heads {config.n_heads} --n_kv_heads "
            f"{config.n_kv_heads} --use_moe {int(config.use_moe)}")


def load_checkpoint(source: str | os.PathLike, *, layout: str | None = None, preset: str | None = None,
                    config: LMConfig | None = None, how_to_get: str = "pass an existing weights file or folder",
                    **given) -> LoadedWeights:
    """The weights of `source` (.pth or Hugging Face folder, any release) in our layout, with their config.

    The config is `config` when the caller has built its model already (training's --from_weight), else the
    folder's config.json, else read from the tensors' shapes with the release's defaults, `preset` and the
    `given` LMConfig fields (None values ignored) on top. `layout` overrides the detected release layout.
    Anything that keeps the result from loading strictly raises WeightsMismatchError naming source and what differs.
    """
    source = str(source)
    tensors, config_json = read_source(source, how_to_get)
    tensors = strip_wrappers(tensors)
    detected = detect_layout(tensors, source)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    layout = layout or detected
    if (layout == NATIVE) != (detected == NATIVE):
        raise ConfigError(f"--layout {layout}: {source} has {detected} key names")
    state = native_names(tensors, detected, source)
    given = {name: value for name, value in given.items() if value is not None}
    made_from = ("the flags" if config is not None or given or preset
                 else "its config.json" if config_json is not None else "its layout and shapes")
    if config is None and config_json is not None:
        config = config_from_json(config_json, layout, str(Path(source) / "config.json"), **given)
    elif config is None:
        config = infer_config(state, layout, source, preset, **given)
    # A native folder says its own rotary order (a model trained with rope_layout "half"); a bare .pth of our
    # names is in the order of the model it is loaded into; the later releases rotate halves.
    stored_order = (config_json or {}).get("rope_layout", config.rope_layout) if layout == NATIVE else rope_layout_of(layout)
    state = tie_or_untie(reorder_rotary(state, config, stored_order, config.rope_layout), config, source)
    with torch.device("meta"):
        mismatch = describe_mismatch(MiniMindLM(config), state)
    if mismatch is not None:
        raise WeightsMismatchError(f"{source} does not fit the model built from {made_from} ({flags_hint(config)}; "
                                   f"{layout} layout): {mismatch}")
    return LoadedWeights(config, state, layout, source)


def load_pretrained(source: str | os.PathLike, **kwargs) -> MiniMindLM:
    """A MiniMindLM in eval mode with the weights of `source` (any release; arguments as load_checkpoint)."""
    loaded = load_checkpoint(source, **kwargs)
    model = MiniMindLM(loaded.config)
    model.load_state_dict(loaded.state, strict=True)
    return model.eval()


def load_into_model(model: MiniMindLM, source: str | os.PathLike, how_to_get: str) -> None:
    """Load `source` (any release) into a model already built from the flags (a training stage's start, a
    distillation teacher)."""
    loaded = load_checkpoint(source, config=model.config, how_to_get=how_to_get)
    model.load_state_dict(loaded.state, strict=True)


def model_from_args(args: argparse.Namespace, vocab_size: int) -> tuple[MiniMindLM, str]:
    """A training stage's model: the one the flags describe, with the --from_weight file (any release's layout)
    loaded into it strictly, and where its weights came from: that file, or "random initialisation". A missing
    file stops here, naming the stage that writes it."""
    model = MiniMindLM(config_from_args(args, vocab_size=vocab_size, dropout=args.dropout))
    start_weights = resolve_from_weight(args.from_weight, args.out_dir, model.config)
    if start_weights is None:
        return model, "random initialisation"
    load_into_model(model, start_weights, "pass an existing --from_weight file")
    return model, str(start_weights)


# ----------------------------------------------------------------------------------------------------------------
# For chat: flags -> model + tokenizer, ready to generate

INFER_DTYPES = ("auto", *DTYPES, "int8")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-selection flags shared by eval_model.py, the API server, the web demo and eval_bench."""
    group = parser.add_argument_group("model loading")
    group.add_argument("--load", type=int, default=0, choices=(0, 1),
                       help="0: native weights out/{stage}_{dim}[_moe].pth (or --weight); 1: a Hugging Face folder "
                            "(--hf_path). Either may hold any MiniMind release's layout")
    group.add_argument("--model_mode", type=parse_model_mode, default=1,
                       help="which stage's weights: 0 or pretrain (text continuation), 1 or full_sft, 2 or rlhf (DPO), "
                            "3 or reason")
    group.add_argument("--out_dir", default="out", help="folder holding the native .pth weights")
    group.add_argument("--weight", default=None, help="explicit .pth file or model folder (overrides --model_mode's file name)")
    group.add_argument("--hf_path", default=None, help="Hugging Face model folder, used with --load 1")
    group.add_argument("--layout", default=None, choices=LAYOUTS,
                       help="the release layout of the weights (default: recognised from the key names)")
    add_architecture_args(group, from_weights=True)
    group.add_argument("--max_seq_len", type=int, default=8192, help="context length: prompts are cut to fit it")
    group.add_argument("--lora_name", default=None,
                       help="LoRA adapter to apply, read from {out_dir}/lora/{lora_name}_{dim}.pth")
    group.add_argument("--tokenizer_path", default=None,
                       help=f"tokenizer folder (default: the model folder if it has one, else {DEFAULT_TOKENIZER})")
    group.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), or e.g. cpu, cuda:0")
    group.add_argument("--compile", type=str2bool, default=False,
                       help="torch.compile the model for generation (1/0): decode steps ~1.7x faster on a CPU, after a "
                            "one-time compile of ~30-60 s when the model loads")
    group.add_argument("--infer_dtype", "--dtype", dest="infer_dtype", default="auto", choices=INFER_DTYPES,
                       help="precision of the weights and activations: auto = bfloat16 on GPUs that support it, "
                            "float16 on other GPUs/MPS, float32 on CPU; int8 (CPU) = int8 weights with bfloat16 "
                            "activations, the fastest decoding on a CPU (see model/quantize.py)")


def resolve_infer_dtype(name: str, device: torch.device) -> str:
    """The precision name --infer_dtype means on this device ("auto" resolved; int8 only on the CPU)."""
    if name == "int8" and device.type != "cpu":
        raise ConfigError(f"--infer_dtype int8 runs on the CPU only; on {device.type} use bfloat16 or float16")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device.type == "mps" else "float32"


def compile_for_generation(model: MiniMindLM) -> MiniMindLM:
    """torch.compile the model in place (shapes dynamic: any prompt length, any cache length) and compile its two
    graphs now, the prompt's forward pass and the one-token decode step, so the first reply is not the slow one.
    A decode step is a few hundred small operations around a few matrix products; compiled, they are fused and
    Python leaves the loop. On the CPU the graphs are called from C++ (inductor's cpp_wrapper), which takes
    longer to compile but halves what a step costs beyond its matrix products. The model's modules are not
    guarded (their weights and settings must not change afterwards: the model is for generation only)."""
    device = next(model.parameters()).device
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
               **({"cpp_wrapper": True} if device.type == "cpu" else {})}
    model.compile(dynamic=True, options=options)
    model.generate(torch.arange(3, 11, device=device)[None], max_new_tokens=3, temperature=0)
    return model


def to_infer_dtype(model: MiniMindLM, name: str) -> MiniMindLM:
    """The model made ready for generation: eval mode, LoRA adapters merged, projections fused
    (MiniMindLM.fuse_for_inference), in precision `name` (a DTYPES name, or int8: int8 weights)."""
    merge_lora(model)
    model.fuse_for_inference()
    return quantize_linear_layers(model) if name == "int8" else model.to(torch_dtype(name))


def model_source(args: argparse.Namespace) -> str:
    """What the model flags point at: --hf_path with --load 1; else --weight, else {out_dir}/{stage}_{dim}[_moe].pth
    (dim and MoE from the flags, else the preset, else MiniMind2-Small's 512)."""
    if args.load == 1:
        if not args.hf_path:
            raise ConfigError("--load 1 needs --hf_path (a model folder, e.g. written by scripts/convert_model.py torch2hf)")
        return args.hf_path
    if args.weight:
        return args.weight
    named = {**PRESETS[args.preset or "MiniMind2-Small"], **architecture_fields(args)}
    return str(weights_path(args.out_dir, MODEL_MODES[args.model_mode], LMConfig(**named)))


def load_model(args: argparse.Namespace) -> tuple[MiniMindLM, PreTrainedTokenizerBase]:
    """The model the flags of add_model_args point at, with its tokenizer, in eval mode on the chosen device and
    precision, ready to generate. Architecture flags left unset are read from the weights (see load_checkpoint).
    A missing file raises MissingInputError naming the file and how to produce it; weights of another shape a
    WeightsMismatchError."""
    device = select_device(args.device)
    infer_dtype = resolve_infer_dtype(args.infer_dtype, device)
    source = model_source(args)
    stage = MODEL_MODES[args.model_mode]
    loaded = load_checkpoint(
        source, layout=args.layout, preset=args.preset, how_to_get=(
            f"model_mode {args.model_mode} ({stage}) needs it: run {STAGE_SCRIPTS[stage]} first, pass --weight PATH, "
            f"or download published MiniMind weights from {PUBLISHED_WEIGHTS} into {args.out_dir}/"),
        **architecture_fields(args))
    config = loaded.config
    config.max_seq_len = min(config.max_seq_len, args.max_seq_len)
    model = MiniMindLM(config)
    model.load_state_dict(loaded.state, strict=True)
    tokenizer = load_chat_tokenizer(args.tokenizer_path, source)
    if args.lora_name:
        attach_lora_file(model, lora_path(args.out_dir, args.lora_name, config.dim))
    model = to_infer_dtype(model.eval().to(device), infer_dtype)
    if args.compile:
        print("compiling the model for generation (once, ~30-60 s on a CPU) ...", flush=True)
        compile_for_generation(model)
    return model, tokenizer


def load_chat_tokenizer(tokenizer_path: str | None, source: str) -> PreTrainedTokenizerBase:
    """--tokenizer_path; else the model folder's own tokenizer (a release folder ships one, with its chat
    template); else the tokenizer of this project."""
    if tokenizer_path is None:
        folder_has_one = Path(source).is_dir() and any((Path(source) / name).is_file()
                                                        for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer_path = source if folder_has_one else str(DEFAULT_TOKENIZER)
    return AutoTokenizer.from_pretrained(require_file(
        tokenizer_path, "pass --tokenizer_path to a tokenizer folder (scripts/train_tokenizer.py makes one)",
        "tokenizer folder"))
