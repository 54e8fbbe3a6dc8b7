"""Convert MiniMind weights between the native .pth format and a Hugging Face model folder.

Run:
    # native -> HF. Dense models become a plain LlamaForCausalLM (no trust_remote_code needed; vLLM, llama.cpp's
    # convert_hf_to_gguf.py and lm-eval read it); MoE models ship the MiniMind code (trust_remote_code=True).
    python scripts/convert_model.py torch2hf --weight out/full_sft_512.pth --hf_path MiniMind2-Small
    python scripts/convert_model.py torch2hf --weight out/full_sft_640_moe.pth --hf_path MiniMind2-MoE \
        --dim 640 --use_moe 1 --dtype bfloat16

    # HF -> native (exactly the original tensors for a folder written by torch2hf)
    python scripts/convert_model.py hf2torch --hf_path MiniMind2-Small --weight out/full_sft_512.pth

    # base + LoRA adapter -> one standalone native weights file (W + scale * B A; same outputs, no LoRA code needed)
    python scripts/convert_model.py merge_lora --weight out/full_sft_512.pth --lora out/lora/lora_identity_512.pth \
        --out out/full_sft_identity_512.pth

The conversion itself lives in model/hf_minimind.py (tested, and reused by `load_model(--load 1)`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/convert_model.py` from anywhere

from transformers import AutoTokenizer  # noqa: E402

from model.hf_minimind import load_hf_folder, save_hf_folder  # noqa: E402
from model.checkpoint import atomic_save, load_into  # noqa: E402
from model.common import DTYPES, exit_on_input_error, read_checkpoint, require_file, torch_dtype  # noqa: E402
from model.cli import DEFAULT_TOKENIZER, add_architecture_args  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindLM  # noqa: E402
from model.model_lora import attach_lora_file, merged_state_dict  # noqa: E402

DTYPE_CHOICES = ("auto", *DTYPES)  # auto keeps the checkpoint's dtype


def torch_to_hf(weight: str, hf_path: str, *, dim: int = 512, n_layers: int = 8, n_heads: int = 8,
                n_kv_heads: int = 2, use_moe: bool = False, max_seq_len: int = 8192,
                tokenizer_path: str = str(DEFAULT_TOKENIZER), dtype: torch.dtype | None = None) -> LMConfig:
    """Export a native .pth to a Hugging Face folder (dtype None keeps the checkpoint's dtype). The vocabulary
    size is read from the weights; the other architecture fields must be given as trained (checked by shape)."""
    state = read_checkpoint(weight, "pass the weights file a train_*.py script wrote")
    config = LMConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      vocab_size=state["tok_embeddings.weight"].shape[0], use_moe=use_moe, max_seq_len=max_seq_len)
    tokenizer = AutoTokenizer.from_pretrained(require_file(tokenizer_path, "pass --tokenizer_path to a tokenizer folder",
                                                           "tokenizer folder"))
    save_hf_folder(state, config, hf_path, tokenizer, dtype=dtype, source=weight)
    return config


def hf_to_torch(hf_path: str, weight: str, dtype: torch.dtype | None = None) -> LMConfig:
    """Import a Hugging Face folder as a native .pth (written atomically); returns the config it describes."""
    config, state = load_hf_folder(hf_path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        state["output.weight"] = state["tok_embeddings.weight"]  # keep the tie (one tensor, stored once)
    atomic_save(state, weight)
    return config


def merge_lora_into_weights(weight: str, lora: str, out: str, *, n_layers: int = 8, n_heads: int = 8,
                            n_kv_heads: int = 2, use_moe: bool = False) -> LMConfig:
    """Fold a LoRA adapter file into base weights and save the result as a plain native .pth (atomically).
    dim and vocabulary size are read from the weights; rank and targets from the adapter file."""
    state = read_checkpoint(weight, "pass the base weights the adapter was trained on")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    config = LMConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                      use_moe=use_moe)
    model = MiniMindLM(config)
    load_into(model, {k: v.float() for k, v in state.items()}, weight, f"--n_layers {n_layers} --n_heads {n_heads} "
                                                                       f"--n_kv_heads {n_kv_heads} --use_moe {int(use_moe)}")
    attach_lora_file(model, lora)
    dtype = state["tok_embeddings.weight"].dtype
    merged = {k: v.to(dtype) for k, v in merged_state_dict(model).items()}
    merged["output.weight"] = merged["tok_embeddings.weight"]  # keep the tie (one tensor, stored once)
    atomic_save(merged, out)
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert MiniMind weights: native .pth <-> Hugging Face folder")
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("torch2hf", help="native .pth -> Hugging Face folder")
    export.add_argument("--weight", required=True, help="native weights, e.g. out/full_sft_512.pth")
    export.add_argument("--hf_path", required=True, help="output folder")
    add_architecture_args(export)
    export.add_argument("--max_seq_len", type=int, default=8192, help="context length written to the config")
    export.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER), help="tokenizer copied into the folder")
    export.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weight dtype (auto: keep)")

    imp = sub.add_parser("hf2torch", help="Hugging Face folder -> native .pth")
    imp.add_argument("--hf_path", required=True, help="folder written by torch2hf (or a MiniMind-shaped Llama)")
    imp.add_argument("--weight", required=True, help="output .pth")
    imp.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weight dtype (auto: keep)")

    merge = sub.add_parser("merge_lora", help="base .pth + LoRA adapter -> standalone native .pth")
    merge.add_argument("--weight", required=True, help="base weights the adapter was trained on, e.g. out/full_sft_512.pth")
    merge.add_argument("--lora", required=True, help="adapter file written by train_lora.py, e.g. out/lora/lora_identity_512.pth")
    merge.add_argument("--out", required=True, help="output .pth")
    add_architecture_args(merge, with_dim=False)  # the hidden size is read from the weights
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype_name = getattr(args, "dtype", "auto")
    dtype = None if dtype_name == "auto" else torch_dtype(dtype_name)
    if args.command == "torch2hf":
        config = torch_to_hf(args.weight, args.hf_path, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                             n_kv_heads=args.n_kv_heads, use_moe=bool(args.use_moe), max_seq_len=args.max_seq_len,
                             tokenizer_path=args.tokenizer_path, dtype=dtype)
        kind = "MiniMind MoE (load with trust_remote_code=True)" if config.use_moe else "LlamaForCausalLM"
        print(f"wrote {args.hf_path} ({kind})")
    elif args.command == "merge_lora":
        config = merge_lora_into_weights(args.weight, args.lora, args.out, n_layers=args.n_layers,
                                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, use_moe=bool(args.use_moe))
        print(f"wrote {args.out} (base {args.weight} + adapter {args.lora}; load with --dim {config.dim} "
              f"--n_layers {config.n_layers} --weight {args.out})")
    else:
        config = hf_to_torch(args.hf_path, args.weight, dtype)
        moe = " --use_moe 1" if config.use_moe else ""
        print(f"wrote {args.weight} (load with --dim {config.dim} --n_layers {config.n_layers} "
              f"--n_heads {config.n_heads} --n_kv_heads {config.n_kv_heads}{moe})")


if __name__ == "__main__":
    exit_on_input_error(main)
