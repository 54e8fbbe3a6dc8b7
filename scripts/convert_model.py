"""Convert MiniMind weights between the native .pth format and a Hugging Face model folder.

Run:
    # weights -> HF (the architecture is read from the weights; any release's layout). Dense models become a plain
    # LlamaForCausalLM, or Qwen3ForCausalLM with per-head q/k norms (minimind-3) (no trust_remote_code needed; vLLM,
    # llama.cpp's convert_hf_to_gguf.py and lm-eval read them); MoE models ship the MiniMind code.
    python scripts/convert_model.py torch2hf --weight out/full_sft_512.pth --hf_path MiniMind2-Small
    python scripts/convert_model.py torch2hf --weight out/full_sft_640_moe.pth --hf_path MiniMind2-MoE --dtype bfloat16

    # HF -> native (exactly the original tensors for a folder written by torch2hf; any release's folder)
    python scripts/convert_model.py hf2torch --hf_path MiniMind2-Small --weight out/full_sft_512.pth

    # base + LoRA adapter -> one standalone native weights file (W + scale * B A; same outputs, no LoRA code needed)
    python scripts/convert_model.py merge_lora --weight out/full_sft_512.pth --lora out/lora/lora_identity_512.pth \
        --out out/full_sft_identity_512.pth

Reading goes through model/loading.py (as every --from_weight and eval_model.py), writing through model/hf_minimind.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/convert_model.py` from anywhere

from transformers import AutoTokenizer  # noqa: E402

from model.checkpoint import atomic_save  # noqa: E402
from model.cli import DEFAULT_TOKENIZER, add_architecture_args, architecture_fields  # noqa: E402
from model.common import DTYPES, exit_on_input_error, require_file, torch_dtype  # noqa: E402
from model.hf_minimind import save_hf_folder  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.loading import load_checkpoint  # noqa: E402
from model.model import MiniMindLM  # noqa: E402
from model.model_lora import attach_lora_file, merged_state_dict  # noqa: E402
from model.releases import LAYOUTS  # noqa: E402

DTYPE_CHOICES = ("auto", *DTYPES)  # auto keeps the checkpoint's dtype


def torch_to_hf(weight: str, hf_path: str, *, tokenizer_path: str = str(DEFAULT_TOKENIZER),
                dtype: torch.dtype | None = None, layout: str | None = None, preset: str | None = None,
                **given) -> LMConfig:
    """Export weights of any release (.pth or folder) to a Hugging Face folder (dtype None keeps the weights'
    dtype). The architecture is read from the weights; `given` LMConfig fields (e.g. n_heads, max_seq_len) and
    a preset override it, and a checkpoint that does not fit them is an error naming what differs."""
    loaded = load_checkpoint(weight, layout=layout, preset=preset, how_to_get="pass the weights file a train_*.py "
                             "script wrote (or a downloaded release)", **given)
    tokenizer = AutoTokenizer.from_pretrained(require_file(tokenizer_path, "pass --tokenizer_path to a tokenizer folder",
                                                           "tokenizer folder"))
    save_hf_folder(loaded.state, loaded.config, hf_path, tokenizer, dtype=dtype, source=weight)
    return loaded.config


def hf_to_torch(hf_path: str, weight: str, dtype: torch.dtype | None = None) -> LMConfig:
    """Import a model folder of any release as a native .pth (written atomically); returns its config."""
    loaded = load_checkpoint(hf_path)
    state = loaded.state
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if loaded.config.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]  # keep the tie (one tensor, stored once)
    atomic_save(state, weight)
    return loaded.config


def merge_lora_into_weights(weight: str, lora: str, out: str, **given) -> LMConfig:
    """Fold a LoRA adapter file into base weights and save the result as a plain native .pth (atomically).
    The architecture is read from the weights (`given` fields override it); rank and targets from the adapter."""
    loaded = load_checkpoint(weight, how_to_get="pass the base weights the adapter was trained on", **given)
    model = MiniMindLM(loaded.config)
    model.load_state_dict(loaded.state, strict=True)
    attach_lora_file(model, lora)
    dtype = loaded.state["tok_embeddings.weight"].dtype
    merged = {k: v.to(dtype) for k, v in merged_state_dict(model).items()}
    if loaded.config.tie_word_embeddings:
        merged["output.weight"] = merged["tok_embeddings.weight"]  # keep the tie (one tensor, stored once)
    atomic_save(merged, out)
    return loaded.config


def shape_flags(config: LMConfig) -> str:
    """The flags that load a native .pth of this architecture."""
    flags = f"--dim {config.dim} --n_layers {config.n_layers} --n_heads {config.n_heads} --n_kv_heads {config.n_kv_heads}"
    return flags + (" --use_moe 1" if config.use_moe else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert MiniMind weights: native .pth <-> Hugging Face folder")
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("torch2hf", help="weights of any release (.pth or folder) -> Hugging Face folder")
    export.add_argument("--weight", required=True, help="weights, e.g. out/full_sft_512.pth or a release's .pth")
    export.add_argument("--hf_path", required=True, help="output folder")
    export.add_argument("--layout", default=None, choices=LAYOUTS, help="release layout (default: from the key names)")
    add_architecture_args(export, from_weights=True)
    export.add_argument("--max_seq_len", type=int, default=None, help="context length written to the config (default: 8192)")
    export.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER), help="tokenizer copied into the folder")
    export.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weight dtype (auto: keep)")

    imp = sub.add_parser("hf2torch", help="Hugging Face folder of any release -> native .pth")
    imp.add_argument("--hf_path", required=True, help="folder written by torch2hf, or a MiniMind release's folder")
    imp.add_argument("--weight", required=True, help="output .pth")
    imp.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weight dtype (auto: keep)")

    merge = sub.add_parser("merge_lora", help="base .pth + LoRA adapter -> standalone native .pth")
    merge.add_argument("--weight", required=True, help="base weights the adapter was trained on, e.g. out/full_sft_512.pth")
    merge.add_argument("--lora", required=True, help="adapter file written by train_lora.py, e.g. out/lora/lora_identity_512.pth")
    merge.add_argument("--out", required=True, help="output .pth")
    add_architecture_args(merge, from_weights=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype_name = getattr(args, "dtype", "auto")
    dtype = None if dtype_name == "auto" else torch_dtype(dtype_name)
    if args.command == "torch2hf":
        config = torch_to_hf(args.weight, args.hf_path, tokenizer_path=args.tokenizer_path, dtype=dtype,
                             layout=args.layout, preset=args.preset, max_seq_len=args.max_seq_len,
                             **architecture_fields(args))
        kind = ("MiniMind MoE (load with trust_remote_code=True)" if config.use_moe
                else "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM")
        print(f"wrote {args.hf_path} ({kind})")
    elif args.command == "merge_lora":
        config = merge_lora_into_weights(args.weight, args.lora, args.out, **architecture_fields(args))
        print(f"wrote {args.out} (base {args.weight} + adapter {args.lora}; load with {shape_flags(config)} "
              f"--weight {args.out})")
    else:
        config = hf_to_torch(args.hf_path, args.weight, dtype)
        print(f"wrote {args.weight} (load with {shape_flags(config)})")


if __name__ == "__main__":
    exit_on_input_error(main)
