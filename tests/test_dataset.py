"""Datasets: lazy jsonl indexing, pretrain/SFT/DPO items, exact assistant-only loss masks, collators, workers."""
import json
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR
from model.dataset import (
    DPOCollator, DPODataset, JsonlRecords, PadCollator, PretrainDataset, SFTDataset, index_jsonl_lines,
    render_conversation, validate_conversation_record, validate_text_record,
)

BOS, EOS, PAD = 1, 2, 0


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def runs(values: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of 1s."""
    spans, start = [], None
    for position, value in enumerate(values + [0]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            spans.append((start, position))
            start = None
    return spans


def assert_mask_is_exactly_the_replies(tokenizer, messages, ids, mask):
    """Masked runs decode to each reply + <|im_end|>, in order; everything else decodes to the rest of the render."""
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    spans = runs(mask)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == replies
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full
    unmasked = "".join(tokenizer.decode(ids[a:b]) for a, b in runs([1 - m for m in mask]))
    expected_unmasked, position = "", 0
    for reply in replies:
        header = "<|im_start|>assistant\n"
        start = full.index(header + reply, position) + len(header)
        expected_unmasked += full[position:start]
        position = start + len(reply)
    assert unmasked == expected_unmasked + full[position:]


# ----------------------------------------------------------------------------------------------------------------
# Indexing and lazy reading

def naive_index(data: bytes) -> tuple[list[int], list[int]]:
    offsets, numbers, position = [], [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(b" \t\r\n"):
            offsets.append(position)
            numbers.append(number)
        position += len(line) + 1
    return offsets, numbers


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64, 1 << 20])
def test_index_matches_naive_split_for_any_chunk_size(tmp_path, chunk_bytes):
    data = ('\n\n{"text": "a"}\n   \n\t\r\n{"text": "你好 🙂"}\r\n\n{"text": "  x  "}\n \n'
            '{"text": "' + "long " * 40 + '"}\n  {"text": "indented"}\n{"text": "no newline at end"}').encode()
    path = tmp_path / "lines.jsonl"
    path.write_bytes(data)
    offsets, numbers = index_jsonl_lines(path, chunk_bytes=chunk_bytes)
    assert (offsets.tolist(), numbers.tolist()) == naive_index(data)
    assert numbers.tolist() == [3, 6, 8, 10, 11, 12]


def test_index_of_empty_and_whitespace_only_files(tmp_path):
    for content in [b"", b"\n\n", b"  \t\r\n  "]:
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        offsets, numbers = index_jsonl_lines(path)
        assert offsets.size == 0 and numbers.size == 0


def test_records_are_read_lazily_with_random_access(tmp_path):
    rng = random.Random(0)
    records = [{"text": "".join(rng.choice("abc你好 🙂\n\t") for _ in range(rng.randint(0, 300))), "i": i}
               for i in range(3000)]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    lines = path.read_text(encoding="utf-8").splitlines()
    dataset = JsonlRecords(path, validate_text_record)
    assert len(dataset) == len(records)
    for index in rng.sample(range(len(records)), 200):
        assert dataset[index] == json.loads(lines[index]) == records[index]
    # the index holds offsets, not text: its pickled state is a small fraction of the file
    assert len(pickle.dumps(dataset)) < path.stat().st_size / 5
    # and reads happen at access time: an in-place edit of a line (same byte length) is seen afterwards
    edited = json.dumps({"text": "X" * len(records[7]["text"].encode()), "i": 7}).encode()
    original = json.dumps(records[7], ensure_ascii=False).encode()
    assert len(edited) <= len(original)
    edited += b" " * (len(original) - len(edited))
    with open(path, "r+b") as handle:
        handle.seek(int(dataset.offsets[7]))
        handle.write(edited)
    assert dataset[7] == json.loads(edited)
    with pytest.raises(IndexError):
        dataset[len(records)]


def test_missing_file_says_where_to_put_data(tmp_path, tokenizer):
    for dataset_class in (PretrainDataset, SFTDataset, DPODataset):
        with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*\./dataset/.*--data_path"):
            dataset_class(tmp_path / "nope.jsonl", tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Malformed lines

BAD_SFT_LINES = [
    ('{"conversations": [', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"texts": "a typo"}', "missing field 'conversations'"),
    ('{"text": 3}', "field 'text' must be a string"),
    ('{"conversations": "hi"}', "field 'conversations' must be a non-empty list"),
    ('{"conversations": []}', "field 'conversations' must be a non-empty list"),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "function", "content": "a"}]}',
     r"field 'conversations\[1\]\.role' must be one of system, user, assistant, tool, got 'function'"),
    ('{"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     r"field 'conversations\[0\]\.content' must be a string"),
    ('{"conversations": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     r"field 'conversations\[0\]\.content' must be a string"),
    ('{"conversations": [{"role": "user", "content": "q"}]}', "field 'conversations' has no assistant turn"),
    ('{"conversations": [{"role": "assistant", "content": "a"}]}',
     r"field 'conversations\[0\]\.role': a conversation must not start"),
]
GOOD_SFT = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("bad_line,message", BAD_SFT_LINES)
def test_malformed_sft_line_names_file_line_and_field(tmp_path, tokenizer, bad_line, message):
    path = tmp_path / "sft.jsonl"
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad
    path.write_text(f"{json.dumps(GOOD_SFT)}\n\n{json.dumps(GOOD_SFT)}\n{bad_line}\n", encoding="utf-8")
    dataset = SFTDataset(path, tokenizer)
    assert len(dataset) == 3
    dataset[0], dataset[1]
    with pytest.raises(ValueError, match=rf"sft\.jsonl:4: {message}"):
        dataset[2]


@pytest.mark.parametrize("dataset_class,bad_line,message", [
    (PretrainDataset, '{"text": 3}', "field 'text' must be a string"),
    (PretrainDataset, '{"content": "x"}', "missing field 'text'"),
    (PretrainDataset, '{"text": "unterminated}', "invalid JSON"),
    (DPODataset, '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "missing field 'rejected'"),
    (DPODataset, '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                 '"rejected": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     r"field 'rejected\[1\]\.role'"),
])
def test_malformed_lines_of_other_stages(tmp_path, tokenizer, dataset_class, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data\.jsonl:2: {message}"):
        dataset_class(path, tokenizer)[0]


def test_skip_invalid_drops_and_counts_bad_lines(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD_SFT), BAD_SFT_LINES[5][0], "", json.dumps(GOOD_SFT), BAD_SFT_LINES[0][0],
             json.dumps({"conversations": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"mixed\.jsonl: skipped 2 invalid line\(s\) of 5; first: .*mixed\.jsonl:2"):
        dataset = SFTDataset(path, tokenizer, skip_invalid=True)
    assert dataset.skipped == 2 and len(dataset) == 3
    assert dataset.records.line_numbers.tolist() == [1, 4, 6]
    assert tokenizer.decode(dataset[2][1][dataset[2][2].bool()]) == "w<|im_end|>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = SFTDataset(write_jsonl(tmp_path / "clean.jsonl", [GOOD_SFT]), tokenizer, skip_invalid=True)
    assert clean.skipped == 0


# ----------------------------------------------------------------------------------------------------------------
# Pretrain items

def test_pretrain_item_is_bos_text_eos_shifted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "长文本" * 50}])
    dataset = PretrainDataset(path, tokenizer, max_length=16)
    body = tokenizer.encode("hello world", add_special_tokens=False)
    ids = [BOS, *body, EOS]
    x, y, mask = dataset[0]
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]
    assert mask.dtype == torch.float32 and mask.tolist() == [1.0] * (len(ids) - 1)
    assert x.dtype == y.dtype == torch.long
    x, y, mask = dataset[1]
    assert (x.tolist(), y.tolist(), mask.tolist()) == ([BOS], [EOS], [1.0])
    x, y, mask = dataset[2]  # truncated to max_length tokens, so 15 input/label pairs and no eos
    full = [BOS, *tokenizer.encode("长文本" * 50, add_special_tokens=False)]
    assert x.tolist() == full[:15] and y.tolist() == full[1:16] and EOS not in y.tolist()


def test_sft_replays_text_lines_exactly_as_pretraining(tmp_path, tokenizer):
    """A {"text"} line in SFT data is trained like pretraining (every token counts); chats keep their reply mask."""
    rows = [{"text": "hello world 你好"}, GOOD_SFT, {"text": "长文本" * 50}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    sft, pretrain = SFTDataset(path, tokenizer, max_length=16), PretrainDataset(path, tokenizer, max_length=16)
    for index in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(sft[index], pretrain[index]))
    chat_ids, chat_mask = render_conversation(tokenizer, GOOD_SFT["conversations"], 16)
    x, y, mask = sft[1]
    assert x.tolist() == chat_ids[:-1] and mask.tolist() == [float(m) for m in chat_mask[1:]]
    assert 0 < mask.sum() < len(mask)


# ----------------------------------------------------------------------------------------------------------------
# SFT loss masks

def test_sft_mask_matches_hand_built_example(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = [BOS, *encode("user\nhi"), EOS, *encode("\n"), BOS, *encode("assistant\n")]
    reply = [*encode("yo"), EOS]
    expected_ids = prompt + reply + encode("\n")
    expected_mask = [0] * len(prompt) + [1] * len(reply) + [0]
    assert render_conversation(tokenizer, messages) == (expected_ids, expected_mask)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are MiniMind, a helpful assistant."},
     {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
     {"role": "user", "content": "写一行代码"}, {"role": "assistant", "content": "```python\nprint('hi')\t\n```\n"},
     {"role": "user", "content": "thanks 🙂"}, {"role": "assistant", "content": "  You're welcome 🙂  "}],
    [{"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"}],
    [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}],
], ids=["single-turn", "system-multi-turn", "reasoning", "empty-reply"])
def test_sft_mask_is_exactly_the_assistant_replies(tmp_path, tokenizer, messages):
    ids, mask = render_conversation(tokenizer, messages)
    assert_mask_is_exactly_the_replies(tokenizer, messages, ids, mask)
    # every prompt equals what a chat client tokenizes for the same history
    reply_starts = [start for start, _ in runs(mask)]
    prompts = [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
    for start, history in zip(reply_starts, prompts):
        rendered = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert ids[:start] == tokenizer.encode(rendered, add_special_tokens=False)
    # the dataset item is the same sequence shifted by one
    x, y, loss_mask = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}]), tokenizer,
                                 max_length=4096)[0]
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:] and loss_mask.tolist() == mask[1:]


def test_sft_truncation_keeps_mask_aligned(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c d e f g h i j " * 5}]
    full_ids, full_mask = render_conversation(tokenizer, messages)
    ids, mask = render_conversation(tokenizer, messages, max_length=20)
    assert (ids, mask) == (full_ids[:20], full_mask[:20])
    x, y, loss_mask = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": messages}]), tokenizer,
                                 max_length=20)[0]
    assert len(x) == 19 and loss_mask.tolist() == full_mask[1:20]


def test_render_uses_the_tokenizers_own_template(tokenizer):
    other = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Q: {{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}### A: {{ m['content'] }}<|im_end|>\n\n"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### A: {% endif %}")
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"},
                {"role": "assistant", "content": "w"}]
    ids, mask = render_conversation(other, messages)
    assert [other.decode(ids[a:b]) for a, b in runs(mask)] == ["y<|im_end|>", "w<|im_end|>"]
    assert other.decode(ids) == "sys\n### Q: x\n### A: y<|im_end|>\n\n### Q: z\n### A: w<|im_end|>\n\n"


def test_template_that_rewrites_history_is_rejected(tokenizer):
    other = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    # like templates that drop earlier reasoning: a reply renders differently once it is no longer the last turn
    other.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier reply]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="not prefix-stable at turn 1"):
        render_conversation(other, messages)


# ----------------------------------------------------------------------------------------------------------------
# Collators

def test_pad_collator_right_pads_with_zero_mask():
    batch = [
        (torch.tensor([5, 6]), torch.tensor([6, 7]), torch.tensor([0.0, 1.0])),
        (torch.tensor([8, 9, 10, 11]), torch.tensor([9, 10, 11, 12]), torch.tensor([1.0, 1.0, 0.0, 1.0])),
    ]
    x, y, mask = PadCollator(pad_token_id=3)(batch)
    assert x.tolist() == [[5, 6, 3, 3], [8, 9, 10, 11]]
    assert y.tolist() == [[6, 7, 3, 3], [9, 10, 11, 12]]
    assert mask.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    assert x.dtype == y.dtype == torch.long and mask.dtype == torch.float32


def test_dpo_collation_puts_chosen_rows_first(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "Which is bigger, 3 or 5?"}]
    records = [
        {"chosen": prompt + [{"role": "assistant", "content": "5 is bigger."}],
         "rejected": prompt + [{"role": "assistant", "content": "3, definitely, without any doubt at all."}]},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
    ]
    dataset = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", records), tokenizer)
    items = [dataset[0], dataset[1]]
    x, y, mask = DPOCollator(PAD)(items)
    rows = [items[0][0], items[1][0], items[0][1], items[1][1]]  # chosen 0, chosen 1, rejected 0, rejected 1
    assert x.shape == y.shape == mask.shape == (4, max(len(row[0]) for row in rows))
    for row, (rx, ry, rmask) in enumerate(rows):
        length = len(rx)
        assert x[row, :length].tolist() == rx.tolist() and y[row, :length].tolist() == ry.tolist()
        assert mask[row, :length].tolist() == rmask.tolist()
        assert (x[row, length:] == PAD).all() and (y[row, length:] == PAD).all() and (mask[row, length:] == 0).all()
    replies = [r[k][-1]["content"] + "<|im_end|>" for k in ("chosen", "rejected") for r in records]
    assert [tokenizer.decode(y[row][mask[row].bool()]) for row in range(4)] == replies


# ----------------------------------------------------------------------------------------------------------------
# DataLoader workers

def test_dataloader_workers_give_the_same_batches(tmp_path, tokenizer):
    rng = random.Random(3)
    records = [{"conversations": [{"role": "user", "content": f"问题 {i} " + "x" * rng.randint(0, 40)},
                                  {"role": "assistant", "content": f"answer {i} " + "好" * rng.randint(0, 40)}]}
               for i in range(48)]
    dataset = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", records), tokenizer, max_length=64)
    dataset[0]  # the parent opens its handle first: forked workers must not share its file position
    collate = PadCollator(tokenizer.pad_token_id)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=5, shuffle=False, num_workers=workers, collate_fn=collate)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 10
    for single, parallel in zip(batches[0], batches[2]):
        for a, b in zip(single, parallel):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# The shared data files

def sample_indices(length: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(length), min(count, length)))


@pytest.mark.parametrize("name", ["sft_mini.jsonl", "r1_mini.jsonl"])
def test_shared_conversations_render_with_exact_masks(shared_data, tokenizer, name):
    dataset = SFTDataset(shared_data / name, tokenizer, max_length=512)
    for index in sample_indices(len(dataset), 150, seed=len(name)):
        messages = dataset.records[index]["conversations"]
        ids, mask = render_conversation(tokenizer, messages)
        assert sum(mask) > 0
        assert_mask_is_exactly_the_replies(tokenizer, messages, ids, mask)
        x, y, loss_mask = dataset[index]
        assert len(x) == min(len(ids), 512) - 1 and x[0] == BOS
        if name == "r1_mini.jsonl":
            assert {3, 4, 5, 6} <= set(y[loss_mask.bool()].tolist()) or len(ids) > 512


def test_shared_dpo_pairs_render_with_exact_masks(shared_data, tokenizer):
    dataset = DPODataset(shared_data / "dpo_mini.jsonl", tokenizer, max_length=4096)
    for index in sample_indices(len(dataset), 60, seed=5):
        record = dataset.records[index]
        chosen, rejected = dataset[index]
        for messages, (x, y, loss_mask) in ((record["chosen"], chosen), (record["rejected"], rejected)):
            ids, mask = render_conversation(tokenizer, messages)
            assert_mask_is_exactly_the_replies(tokenizer, messages, ids, mask)
            assert loss_mask.sum() > 0 and y.tolist() == ids[1:4096]


def test_shared_pretrain_items(shared_data, tokenizer):
    dataset = PretrainDataset(shared_data / "pretrain_mini.jsonl", tokenizer, max_length=512)
    assert len(dataset) == 12875
    for index in sample_indices(len(dataset), 100, seed=7):
        x, y, mask = dataset[index]
        text = dataset.records[index]["text"]
        assert x[0] == BOS and mask.all()
        assert x[1:].tolist() == tokenizer.encode(text, add_special_tokens=False)[: len(x) - 1]
        if len(x) < 511:
            assert y[-1] == EOS and tokenizer.decode(y[:-1]) == text


def test_validators_accept_every_shared_line(shared_data):
    """All shared conversation files are well-formed (skip_invalid finds nothing to skip)."""
    for name in ("sft_mini.jsonl", "r1_mini.jsonl", "lora_identity.jsonl"):
        assert JsonlRecords(shared_data / name, validate_conversation_record, skip_invalid=True).skipped == 0
