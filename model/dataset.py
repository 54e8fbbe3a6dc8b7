"""Datasets for every training stage: lazy jsonl reading, pretrain / SFT / DPO items and the padding collators.

Files are never read into memory. `JsonlRecords` scans a file once in binary chunks and keeps only the byte offset
and line number of each non-empty line (numpy arrays, so forked DataLoader workers share them without copying);
a line is read and parsed when its item is requested, through a file handle opened lazily in each process.

Every item is a next-token triple `(input_ids, labels, loss_mask)` of 1-D tensors of one length: labels are the
inputs shifted left by one, and loss_mask (float) is 1 where the label counts towards the loss. Items have
variable length; `PadCollator` pads a batch to its longest item (right padding, mask 0 on padding).

For chat data the loss covers exactly the assistant replies - each reply's first token through its end-of-turn
token (`<|im_end|>` for MiniMind) - and never the prompt, the role headers or the newline between turns.
`render_conversation` builds those ids and that mask from the tokenizer's own chat template, so the prompt tokens
are the ones inference produces.
"""
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .common import ConfigError, DataFormatError, require_file

CHAT_ROLES = ("system", "user", "assistant")
INDEX_CHUNK_BYTES = 16 * 1024 * 1024
_WHITESPACE_BYTES = np.zeros(256, dtype=bool)
_WHITESPACE_BYTES[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Validator = Callable[[Any], None]


# ----------------------------------------------------------------------------------------------------------------
# Record validation: each raises ValueError naming the offending field; JsonlRecords prefixes the file and line.

def validate_text_record(record: Any) -> None:
    """A pretraining line: `{"text": str}`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "text" not in record:
        raise ValueError("missing field 'text'")
    if not isinstance(record["text"], str):
        raise ValueError(f"field 'text' must be a string, got {type(record['text']).__name__}")


def validate_messages(messages: Any, field: str) -> None:
    """A conversation: a non-empty list of {role, content} with a prompt before the first reply and >= 1 reply."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{field}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"field '{where}' must be an object with 'role' and 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"field '{where}.role' must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"field '{where}.content' must be a string, got {type(message.get('content')).__name__}")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"field '{field}[0].role': a conversation must not start with an assistant turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"field '{field}' has no assistant turn, so nothing would be trained on")


def validate_conversation_record(record: Any) -> None:
    """An SFT line: `{"conversations": [{"role", "content"}, ...]}`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError("missing field 'conversations'")
    validate_messages(record["conversations"], "conversations")


def validate_chat_or_text_record(record: Any) -> None:
    """An SFT line: a conversation, or `{"text": str}` (pretraining text replayed during fine-tuning)."""
    if isinstance(record, dict) and "text" in record and "conversations" not in record:
        validate_text_record(record)
    else:
        validate_conversation_record(record)


def validate_preference_record(record: Any) -> None:
    """A DPO line: `{"chosen": [...], "rejected": [...]}`, both conversations."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise ValueError(f"missing field '{field}'")
        validate_messages(record[field], field)


# ----------------------------------------------------------------------------------------------------------------
# Lazy jsonl access

def index_jsonl_lines(path: str | Path, chunk_bytes: int = INDEX_CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers (int64 arrays) of the lines holding anything but whitespace.

    The file is scanned in binary chunks, so memory stays O(chunk + number of lines) for any file size.
    """
    starts: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    line_start = 0  # absolute offset of the line currently being scanned
    line_number = 1
    line_has_content = False  # whether that line showed a non-whitespace byte in earlier chunks
    chunk_offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            data = np.frombuffer(chunk, dtype=np.uint8)
            is_content = ~_WHITESPACE_BYTES[data]  # (N,) True at non-whitespace bytes
            newlines = np.flatnonzero(data == ord("\n"))  # (L,) local positions of the line ends in this chunk
            if newlines.size:
                segment_starts = np.concatenate(([0], newlines[:-1] + 1))  # (L,) where each ending line begins here
                # segment i spans segment_starts[i]..newlines[i] inclusive, never empty, so reduceat is exact
                has_content = np.logical_or.reduceat(is_content[: newlines[-1] + 1], segment_starts)  # (L,)
                has_content[0] |= line_has_content
                absolute_starts = chunk_offset + segment_starts
                absolute_starts[0] = line_start
                starts.append(absolute_starts[has_content])
                numbers.append(line_number + np.flatnonzero(has_content))
                line_number += newlines.size
                tail = newlines[-1] + 1
                line_start = chunk_offset + tail
                line_has_content = bool(is_content[tail:].any())
            else:
                line_has_content = line_has_content or bool(is_content.any())
            chunk_offset += len(chunk)
    if line_has_content:  # a last line without a trailing newline
        starts.append(np.array([line_start]))
        numbers.append(np.array([line_number]))
    if not starts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(starts).astype(np.int64), np.concatenate(numbers).astype(np.int64)


class JsonlRecords:
    """Random access to the parsed, validated records of a jsonl file, without holding its content in memory.

    `records[i]` reads and parses the i-th non-empty line. A malformed line raises DataFormatError (a ValueError)
    naming the file, the 1-based line number and the field. With `skip_invalid=True` every line is validated once here and the invalid
    ones are dropped; their number is `skipped` and a warning names the file and the first bad line.
    """

    def __init__(self, path: str | Path, validate: Validator, skip_invalid: bool = False):
        self.path = require_file(path, "put the jsonl files in ./dataset/ (e.g. dataset/pretrain_hq.jsonl, "
                                        "dataset/sft_mini_512.jsonl) or pass --data_path PATH", "data file")
        self.validate = validate
        self.offsets, self.line_numbers = index_jsonl_lines(self.path)
        self._handle = None
        self._handle_pid: int | None = None
        self.skipped = 0
        if skip_invalid:
            self._drop_invalid_lines()

    def _drop_invalid_lines(self) -> None:
        keep = np.ones(len(self.offsets), dtype=bool)
        first_error = None
        for index in range(len(self.offsets)):
            try:
                self[index]
            except ValueError as error:
                keep[index] = False
                first_error = first_error or str(error)
        self.skipped = int((~keep).sum())
        if self.skipped:
            self.offsets, self.line_numbers = self.offsets[keep], self.line_numbers[keep]
            warnings.warn(f"{self.path}: skipped {self.skipped} invalid line(s) of {len(keep)}; first: {first_error}",
                          stacklevel=3)

    def _read_line(self, index: int) -> bytes:
        # Each process opens its own handle: a handle inherited through fork shares its file position with the
        # parent and the other workers, so concurrent seek+read would interleave.
        if self._handle is None or self._handle_pid != os.getpid():
            self.close()  # in a forked child this closes only the child's copy of the parent's descriptor
            self._handle = open(self.path, "rb")
            self._handle_pid = os.getpid()
        self._handle.seek(int(self.offsets[index]))
        return self._handle.readline()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self.offsets):
            raise IndexError(f"record {index} out of range for {self.path} ({len(self.offsets)} records)")
        where = f"{self.path}:{int(self.line_numbers[index])}"
        try:
            record = json.loads(self._read_line(index))  # bytes: json detects UTF-8 and tolerates a BOM
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataFormatError(f"{where}: invalid JSON ({error})") from error
        try:
            self.validate(record)
        except ValueError as error:
            raise DataFormatError(f"{where}: {error}") from error
        return record

    def close(self) -> None:
        """Close this process's file handle; the next access reopens it."""
        handle = getattr(self, "_handle", None)  # absent when __init__ failed before opening anything
        if handle is not None:
            handle.close()
        self._handle, self._handle_pid = None, None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_handle_pid"] = None, None  # open files do not pickle (spawned workers)
        return state


# ----------------------------------------------------------------------------------------------------------------
# Token sequences

def shift_for_next_token(ids: list[int], mask: list[int]) -> Triple:
    """(input_ids, labels, loss_mask) for next-token prediction: position t predicts ids[t+1], counted if mask[t+1]."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to form an input/label pair, got {len(ids)}")
    tokens = torch.tensor(ids, dtype=torch.long)  # (T+1,)
    loss_mask = torch.tensor(mask[1:], dtype=torch.float32)  # (T,)
    return tokens[:-1], tokens[1:], loss_mask


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                        max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered by the tokenizer's chat template, and a 0/1 mask of its reply tokens.

    For assistant turn i the reply is the text between the render of messages[:i] with the generation prompt and
    the render of messages[:i+1]; whitespace after the reply's end-of-turn token goes to the following prompt
    segment. Prompt and reply segments are tokenized separately, so the prompt ids equal those a chat client
    produces for the same history. The result is truncated to `max_length` tokens.
    """
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    segments: list[tuple[str, int]] = []  # (text, 1 if it is a reply)
    cursor = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise ValueError("a conversation must not start with an assistant turn (there is no prompt to answer)")
        prompt_text = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        through_reply = _render(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not (full_text.startswith(prompt_text) and full_text.startswith(through_reply)
                and cursor <= len(prompt_text) <= len(through_reply)):
            raise ConfigError(f"the tokenizer's chat template is not prefix-stable at turn {turn}: rendering the "
                             f"first turns does not give a prefix of the full conversation, so reply spans "
                             f"cannot be located")
        reply = full_text[len(prompt_text):len(through_reply)].rstrip()
        segments.append((full_text[cursor:len(prompt_text)], 0))
        segments.append((reply, 1))
        cursor = len(prompt_text) + len(reply)
    segments.append((full_text[cursor:], 0))

    ids: list[int] = []
    mask: list[int] = []
    for text, is_reply in segments:
        if text:
            segment_ids = tokenizer.encode(text, add_special_tokens=False)
            ids.extend(segment_ids)
            mask.extend([is_reply] * len(segment_ids))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class JsonlDataset(Dataset):
    """A lazily read jsonl file whose lines are checked by `validate`; subclasses turn a record into tensors."""

    validate: Callable[[object], None]

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 skip_invalid: bool = False):
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (one input and one label), got {max_length}")
        self.records = JsonlRecords(data_path, type(self).validate, skip_invalid)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def skipped(self) -> int:
        return self.records.skipped

    def __len__(self) -> int:
        return len(self.records)


def text_item(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> Triple:
    """[bos] + text + [eos], truncated to max_length, every label counted."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError("plain-text samples need a tokenizer with bos_token and eos_token set")
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return shift_for_next_token(ids[:max_length], [1] * min(len(ids), max_length))


class PretrainDataset(JsonlDataset):
    """`{"text"}` lines -> [bos] + text + [eos], truncated to max_length, every label counted."""

    validate = staticmethod(validate_text_record)

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 skip_invalid: bool = False):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("PretrainDataset needs a tokenizer with bos_token and eos_token set")
        super().__init__(data_path, tokenizer, max_length, skip_invalid)

    def __getitem__(self, index: int) -> Triple:
        return text_item(self.tokenizer, self.records[index]["text"], self.max_length)


class SFTDataset(JsonlDataset):
    """`{"conversations": [...]}` lines -> the chat-template rendering, loss on the assistant replies only.

    A line may instead be `{"text": ...}`: pretraining text replayed during fine-tuning, trained on every token as
    in pretraining. Mixing some in keeps a small model from forgetting what it read while it learns to chat.
    A reply truncated away entirely leaves an all-zero loss_mask; the training loss must divide by
    `loss_mask.sum().clamp(min=1)`.
    """

    validate = staticmethod(validate_chat_or_text_record)

    def __getitem__(self, index: int) -> Triple:
        record = self.records[index]
        if "conversations" not in record:
            return text_item(self.tokenizer, record["text"], self.max_length)
        return shift_for_next_token(*render_conversation(self.tokenizer, record["conversations"], self.max_length))


class DPODataset(JsonlDataset):
    """`{"chosen": [...], "rejected": [...]}` lines -> (chosen_triple, rejected_triple), each rendered like SFT."""

    validate = staticmethod(validate_preference_record)

    def __getitem__(self, index: int) -> tuple[Triple, Triple]:
        record = self.records[index]
        chosen = shift_for_next_token(*render_conversation(self.tokenizer, record["chosen"], self.max_length))
        rejected = shift_for_next_token(*render_conversation(self.tokenizer, record["rejected"], self.max_length))
        return chosen, rejected


# ----------------------------------------------------------------------------------------------------------------
# Collators

class PadCollator:
    """Stack triples into (X (B,T) long, Y (B,T) long, loss_mask (B,T) float), right-padded to the longest item."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[Triple]) -> Triple:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(input_ids) for input_ids, _, _ in batch)
        inputs = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        loss_mask = torch.zeros(len(batch), longest, dtype=torch.float32)  # (B, T)
        for row, (input_ids, label_ids, mask) in enumerate(batch):
            length = len(input_ids)
            inputs[row, :length] = input_ids
            labels[row, :length] = label_ids
            loss_mask[row, :length] = mask
        return inputs, labels, loss_mask


class DPOCollator:
    """Collate (chosen, rejected) pairs into (2B, T) tensors: the B chosen rows first, then the B rejected rows."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, batch: list[tuple[Triple, Triple]]) -> Triple:
        chosen = [pair[0] for pair in batch]
        rejected = [pair[1] for pair in batch]
        return self.pad(chosen + rejected)
