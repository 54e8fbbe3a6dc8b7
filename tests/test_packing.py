"""Packed rows and pretokenized files (model/dataset.py, scripts/pretokenize.py): each document of a packed row gets
exactly the logits it gets alone (dense and MoE), the packing plan against a naive best-fit-decreasing, the token
file against the jsonl datasets it was written from, its errors, and the useful-token share of the shared data."""
from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_model, write_jsonl, write_lines
from model.common import ConfigError, DataFormatError, MissingInputError
from model.dataset import (
    PADDING_DOCUMENT, PackedCollator, PackedDataset, PretokenizedDataset, PretrainDataset, SFTDataset, TokenFiles,
    open_documents, pack_documents, token_dtype, tokenizer_fingerprint, useful_token_share,
)


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Lines of 1 to ~60 tokens, Chinese and English."""
    rng = random.Random(seed)
    words = ["模型", "数据", "训练", "hello", "world", "tiny", "语言", "packing", "rows", "文档"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def text_file(path: Path, texts: list[str]) -> Path:
    return write_jsonl([json.dumps({"text": text}, ensure_ascii=False) for text in texts], path)


# ----------------------------------------------------------------------------------------------------------------
# A packed row computes what each of its documents computes alone


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_each_document_of_a_packed_row_gets_the_logits_it_gets_alone(tmp_path, tokenizer, use_moe):
    dataset = PackedDataset(text_file(tmp_path / "texts.jsonl", random_texts(24)), tokenizer, max_length=48)
    batch = PackedCollator(tokenizer.pad_token_id, dataset.row_length)([dataset[r] for r in range(len(dataset))])
    assert batch.document_ids.max() >= 2 and (batch.document_ids == PADDING_DOCUMENT).any()  # shared rows, padding
    torch.manual_seed(0)
    model = tiny_model(use_moe=use_moe)
    with torch.no_grad():
        packed = model(batch.input_ids, document_ids=batch.document_ids).logits  # (R, row_length, V)
        assert torch.isfinite(packed).all()  # padding attends to itself: no NaN anywhere
        compared = 0
        for row in range(len(dataset)):
            start = 0
            for number, document in enumerate(dataset.row_documents[dataset.row_offsets[row]:dataset.row_offsets[row + 1]]):
                inputs, labels, mask = dataset.documents[int(document)]  # the padded dataset's sample
                end = start + len(inputs)
                assert (batch.document_ids[row, start:end] == number).all()
                assert torch.equal(batch.input_ids[row, start:end], inputs)
                assert torch.equal(batch.labels[row, start:end], labels)  # no label crosses into the next document
                assert torch.equal(batch.loss_mask[row, start:end], mask)
                alone = model(inputs[None]).logits[0]
                torch.testing.assert_close(packed[row, start:end], alone, rtol=0, atol=1e-5)
                start, compared = end, compared + 1
            assert (batch.document_ids[row, start:] == PADDING_DOCUMENT).all() and not batch.loss_mask[row, start:].any()
    assert compared == len(dataset.documents) == 24
    assert batch.useful_tokens == int(dataset.positions.sum()) == int((batch.document_ids >= 0).sum())


# ----------------------------------------------------------------------------------------------------------------
# The packing plan


def naive_best_fit_decreasing(positions: list[int], row_length: int) -> list[int]:
    """The sorted row loads of best-fit decreasing, the obvious way. Rows with equal room are interchangeable for
    every later choice, so any tie-breaking gives these loads."""
    loads: list[int] = []
    for need in sorted(positions, reverse=True):
        fitting = [row for row, load in enumerate(loads) if row_length - load >= need]
        if fitting:
            loads[min(fitting, key=lambda row: row_length - loads[row])] += need
        else:
            loads.append(need)
    return sorted(loads)


@pytest.mark.parametrize("seed", range(4))
def test_packing_plan_matches_naive_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    row_length = int(rng.integers(8, 64))
    positions = rng.integers(1, row_length + 1, size=int(rng.integers(1, 300)))
    positions[rng.random(len(positions)) < 0.7] //= 4  # mostly short documents, some long ones
    positions = np.maximum(positions, 1)
    row_offsets, documents = pack_documents(positions, row_length)
    assert sorted(documents.tolist()) == list(range(len(positions)))  # every document exactly once
    loads = [int(positions[documents[a:b]].sum()) for a, b in zip(row_offsets[:-1], row_offsets[1:])]
    assert max(loads) <= row_length and min(np.diff(row_offsets)) >= 1
    assert sorted(loads) == naive_best_fit_decreasing(positions.tolist(), row_length)
    again = pack_documents(positions.copy(), row_length)  # fixed: the same plan every time
    assert np.array_equal(again[0], row_offsets) and np.array_equal(again[1], documents)


def test_packing_rejects_documents_that_cannot_fit():
    with pytest.raises(ValueError, match="1..8 positions"):
        pack_documents(np.array([3, 9]), 8)


# ----------------------------------------------------------------------------------------------------------------
# Pretokenized files


def pretokenize(argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["scripts/pretokenize.py", *argv])
    runpy.run_path(str(ROOT / "scripts" / "pretokenize.py"), run_name="__main__")


@pytest.mark.parametrize("kind, source, workers", [("text", "pretrain_mini.jsonl", "0"), ("chat", "sft_mini.jsonl", "2")])
def test_token_file_holds_exactly_what_the_jsonl_datasets_produce(tmp_path, shared_data, tokenizer, monkeypatch,
                                                                  kind, source, workers):
    jsonl = write_lines(shared_data / source, tmp_path / "corpus.jsonl", 0, 60)
    pretokenize(["--data_path", str(jsonl), "--kind", kind, "--workers", workers], monkeypatch)
    files = TokenFiles.of(tmp_path / "corpus.bin")
    assert files.mask.exists() == (kind == "chat")
    reference = (SFTDataset if kind == "chat" else PretrainDataset)(jsonl, tokenizer, max_length=64)
    stored = PretokenizedDataset(files.tokens, tokenizer, max_length=64)
    assert len(stored) == len(reference) == 60
    header = json.loads(files.header.read_text())
    assert (header["kind"], header["dtype"], header["documents"]) == (kind, "uint16", 60)
    lengths = [len(reference.document(i)[0]) for i in range(60)]
    assert header["tokens"] == sum(lengths) and header["max_document_length"] == max(lengths) > 64
    assert stored.document_lengths().tolist() == lengths
    for index in range(60):
        ids, mask = reference.document(index)
        stored_ids, stored_mask = stored.document(index)
        assert stored_ids.tolist() == ids and stored_mask.tolist() == mask
        for ours, theirs in zip(stored[index], reference[index]):  # the padded samples, cut to 64 tokens
            assert torch.equal(ours, theirs)
    if kind == "text":
        assert tokenizer.decode(stored.document(0)[0][1:-1].tolist()) == reference.records[0]["text"]
    # Packing the token file or the jsonl gives the same plan
    from_bin = PackedDataset(files.tokens, tokenizer, max_length=256, chat=kind == "chat")
    from_jsonl = PackedDataset(jsonl, tokenizer, max_length=256, chat=kind == "chat")
    assert np.array_equal(from_bin.row_offsets, from_jsonl.row_offsets)
    assert np.array_equal(from_bin.row_documents, from_jsonl.row_documents)


def test_token_dtype_widens_for_large_vocabularies():
    assert (token_dtype(6400), token_dtype(65536), token_dtype(65537)) == (np.uint16, np.uint16, np.uint32)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_pretokenize_names_the_malformed_line_in_one_line(tmp_path, monkeypatch, capsys, workers):
    jsonl = write_jsonl(['{"text": "fine"}', '{"text": "also fine"}', '{"text": 42}'], tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        pretokenize(["--data_path", str(jsonl), "--kind", "text", "--workers", workers], monkeypatch)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert lines[-1] == f"error: {jsonl}:3: field 'text' must be a string, got int"
    assert not any(line.startswith(("Traceback", "error")) for line in lines[:-1])  # above it: the progress bar only
    assert not TokenFiles.of(tmp_path / "bad.bin").header.exists()  # no header: the partial files are refused


def test_token_file_problems_are_clear_errors(tmp_path, tokenizer, monkeypatch):
    texts = text_file(tmp_path / "texts.jsonl", random_texts(5))
    pretokenize(["--data_path", str(texts), "--kind", "text"], monkeypatch)
    files = TokenFiles.of(tmp_path / "texts.bin")
    PretokenizedDataset(files.tokens, tokenizer)  # complete: reads

    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other.chat_template = "{{ messages }}"  # another template tokenizes chats differently
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    with pytest.raises(ConfigError, match="tokenized with another tokenizer"):
        PretokenizedDataset(files.tokens, other)

    chat = write_jsonl([json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]})], tmp_path / "c.jsonl")
    pretokenize(["--data_path", str(chat), "--kind", "chat", "--out", str(tmp_path / "chat.bin")], monkeypatch)
    assert open_documents(tmp_path / "chat.bin", tokenizer, chat=True).kind == "chat"
    with pytest.raises(ConfigError, match="holds chat documents"):
        open_documents(tmp_path / "chat.bin", tokenizer, chat=False)  # pretraining on reply-only masks

    data = files.tokens.read_bytes()
    files.tokens.write_bytes(data[:-2])  # one token short
    with pytest.raises(DataFormatError, match="texts.bin: .* bytes where texts.meta.json says"):
        PretokenizedDataset(files.tokens, tokenizer)
    files.tokens.write_bytes(data)
    files.header.unlink()  # as an interrupted run leaves it
    with pytest.raises(MissingInputError, match="texts.meta.json not found: .*incomplete"):
        PretokenizedDataset(files.tokens, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Useful-token share on the shared data


@pytest.mark.parametrize("source, chat, lines", [
    ("pretrain_mini.jsonl", False, 500), ("sft_mini.jsonl", True, 300),
    pytest.param("pretrain_mini.jsonl", False, None, marks=pytest.mark.slow),
    pytest.param("sft_mini.jsonl", True, None, marks=pytest.mark.slow),
])
def test_packed_rows_of_512_are_over_90_percent_document_tokens(tmp_path, shared_data, tokenizer, source, chat, lines):
    """Fast on the first lines of each file, slow on all of it. Padded batches of 8 waste far more."""
    data = shared_data / source if lines is None else write_lines(shared_data / source, tmp_path / source, 0, lines)
    workers = 2 if lines is None else 0
    packed = PackedDataset(data, tokenizer, max_length=512, chat=chat, num_workers=workers)
    share = useful_token_share(packed)
    assert share > 0.9, share
    padded_share = useful_token_share(packed.documents, batch_size=8, num_workers=workers)
    assert padded_share < share - 0.1, (padded_share, share)


# ----------------------------------------------------------------------------------------------------------------
# Every stage that offers --packed hands the document ids to every model it runs


STAGES = {  # script: (shared data file, extra flags)
    "train_pretrain.py": ("pretrain_mini.jsonl", []),
    "train_full_sft.py": ("sft_mini.jsonl", ["--from_weight", "none"]),
    "train_lora.py": ("lora_identity.jsonl", ["--from_weight", "{weights}"]),
    "train_distill_reason.py": ("r1_mini.jsonl", ["--from_weight", "none"]),
    "train_distillation.py": ("sft_mini.jsonl", ["--from_weight", "none", "--teacher_weight", "{weights}",
                                                 "--teacher_dim", "64", "--teacher_n_layers", "2",
                                                 "--teacher_n_heads", "4", "--teacher_n_kv_heads", "2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(STAGES))
def test_packed_stages_give_every_model_the_document_ids(tmp_path, shared_data, monkeypatch, capsys, script):
    from conftest import CPU_FP32, TINY_FLAGS
    from model.model import MiniMindLM

    weights = tmp_path / "tiny_64.pth"
    torch.manual_seed(0)
    torch.save(tiny_model().state_dict(), weights)
    source, extra = STAGES[script]
    data = write_lines(shared_data / source, tmp_path / source, 0, 40)
    calls = []
    forward = MiniMindLM.forward

    def recording_forward(self, input_ids, *args, **kwargs):
        document_ids = kwargs.get("document_ids")
        calls.append(None if document_ids is None else tuple(document_ids.shape))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(MiniMindLM, "forward", recording_forward)
    argv = [*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--packed", "1", "--max_seq_len", "128",
            "--batch_size", "2", "--accumulation_steps", "1", "--max_steps", "2", "--num_workers", "0",
            "--out_dir", str(tmp_path / "out"), *(flag.format(weights=weights) for flag in extra)]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / script), run_name="__main__")
    per_step = 2 if script == "train_distillation.py" else 1  # the teacher runs too
    assert calls == [(2, 127)] * 2 * per_step
    assert "packed 40 documents into " in capsys.readouterr().out
