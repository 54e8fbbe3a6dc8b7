"""Tokenize a jsonl corpus once into a binary token file, for training with `--data_path NAME.bin`.

Writes, beside the jsonl (or where --out NAME.bin says):
    NAME.bin        the token ids of every document back to back (uint16; uint32 for vocabularies over 65,536)
    NAME.idx        int64: where each document starts in NAME.bin, then the total (documents + 1 values)
    NAME.mask       uint8 loss mask of every token (--kind chat only: 1 on the assistant replies)
    NAME.meta.json  the header: kind, dtype, counts, longest document, tokenizer path and SHA-256, source file

Documents are tokenized exactly as the training scripts tokenize jsonl: --kind text as train_pretrain.py does
([bos] + text + [eos], every token counted), --kind chat as train_full_sft.py does (the tokenizer's chat template,
loss on the assistant replies only; {"text"} lines are replayed text, every token counted). They are stored
whole, so one file serves any --max_seq_len. Documents are streamed to disk as they are tokenized (with a progress
bar): memory does not grow with the corpus. The header is written last, so a file whose run was interrupted is
refused when read. Training checks that it uses the same tokenizer (by its SHA-256).

Run (from the repository root):
    python scripts/pretokenize.py --data_path dataset/pretrain_hq.jsonl --kind text
    python scripts/pretokenize.py --data_path dataset/sft_mini_512.jsonl --kind chat --workers 2
Then train on it, packed (rows of whole documents) or padded (one document per sample):
    python train_pretrain.py --data_path dataset/pretrain_hq.bin --packed 1
    python train_full_sft.py --data_path dataset/sft_mini_512.bin --packed 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/pretokenize.py` from anywhere

from model.cli import DEFAULT_TOKENIZER  # noqa: E402
from model.common import exit_on_input_error, require_file  # noqa: E402
from model.dataset import PretrainDataset, SFTDataset, TokenFiles, write_token_file  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Write the token file; returns its header."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", required=True, help="the jsonl corpus")
    parser.add_argument("--kind", required=True, choices=("text", "chat"),
                        help="text: {\"text\"} lines, as in pretraining; chat: {\"conversations\"} lines (and "
                             "replayed {\"text\"} lines), as in SFT, LoRA and distillation")
    parser.add_argument("--out", default=None, help="the NAME.bin to write (default: the jsonl's name with .bin)")
    parser.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER), help="tokenizer folder")
    parser.add_argument("--workers", type=int, default=0, help="extra processes that tokenize in parallel")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.data_path).with_suffix(".bin")
    if out.suffix != ".bin":
        parser.error(f"--out must name a .bin file, got {out}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")

    tokenizer = AutoTokenizer.from_pretrained(require_file(args.tokenizer_path, "pass --tokenizer_path to a tokenizer "
                                                                                "folder", "tokenizer folder"))
    dataset_class = SFTDataset if args.kind == "chat" else PretrainDataset
    documents = dataset_class(args.data_path, tokenizer)
    header = write_token_file(documents, out, args.tokenizer_path, args.workers, progress=True)
    files = TokenFiles.of(out)
    written = ", ".join(str(path) for path in files if path.exists())
    print(f"{header['documents']:,} {args.kind} documents, {header['tokens']:,} tokens ({header['dtype']}, longest "
          f"{header['max_document_length']:,}) -> {written}", flush=True)
    return header


if __name__ == "__main__":
    exit_on_input_error(main)
