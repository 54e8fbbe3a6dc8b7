"""Datasets for every training stage: lazy jsonl reading, pretokenized token files, packing, and the collators.

Files are never read into memory. `JsonlRecords` scans a file once in binary chunks and keeps only the byte offset
and line number of each non-empty line (numpy arrays, so forked DataLoader workers share them without copying);
a line is read and parsed when its item is requested, through a file handle opened lazily in each process. A
pretokenized file (`scripts/pretokenize.py`) is memory-mapped the same way.

A document is the token ids of one line with a 0/1 loss mask: `[bos] + text + [eos]` with every token counted
for pretraining text, the chat-template rendering with only the assistant replies counted for a conversation.
Every training sample is made of next-token triples `(input_ids, labels, loss_mask)`: labels are the inputs
shifted left by one, and loss_mask (float) is 1 where the label counts towards the loss. A document longer than
max_length tokens is cut to its first max_length tokens (max_length - 1 positions).

Two ways to batch documents:
- padded (`PretrainDataset`, `SFTDataset`, `PretokenizedDataset` + `PadCollator`): one document per sample, a
  batch right-padded to its longest item;
- packed (`PackedDataset` + `PackedCollator`): whole documents placed side by side in rows of max_length - 1
  positions by a fixed plan, with `document_ids` telling the model where each document starts, so a token
  attends only to its own document and no label crosses a boundary.
"Useful tokens" are the positions that hold a document token rather than padding, in both ways; tokens/s and the
useful-token share count those.

For chat data the loss covers exactly the assistant replies - each reply's first token through its end-of-turn
token (`<|im_end|>` for MiniMind), tool-call blocks included - and never the prompt, the role headers, the newline
between turns or tool results (`role: "tool"` messages, rendered in a user-side turn).
`render_conversation` builds those ids and that mask from the tokenizer's own chat template, so the prompt tokens
are the ones inference produces.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpoint import atomic_write_text
from .common import ConfigError, DataFormatError, MissingInputError, require_file
from .tools import openai_tool_calls_to_template

CHAT_ROLES = ("system", "user", "assistant", "tool")
INDEX_CHUNK_BYTES = 16 * 1024 * 1024
_WHITESPACE_BYTES = np.zeros(256, dtype=bool)
_WHITESPACE_BYTES[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Document = tuple[Sequence[int], Sequence[int]]  # (token ids, 0/1 loss mask) of one whole document: lists or arrays
Validator = Callable[[Any], None]
PADDING_DOCUMENT = -1  # the document id of the padding at the end of a packed row
TOKEN_FILE_FORMAT = 1
HOW_TO_PRETOKENIZE = "write it with: python scripts/pretokenize.py --data_path FILE.jsonl --kind text (or chat)"


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
    """A conversation: a non-empty list of {role, content} with a prompt before the first reply and >= 1 reply.
    An assistant turn may carry `tool_calls` (content then may be empty or null); a `tool` turn is a tool's result."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{field}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"field '{where}' must be an object with 'role' and 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"field '{where}.role' must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {message.get('role')!r}")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant":
                raise ValueError(f"field '{where}.tool_calls': only an assistant turn calls tools")
            try:
                openai_tool_calls_to_template(json.loads(calls) if isinstance(calls, str) else calls)
            except (ValueError, AttributeError, TypeError) as error:
                raise ValueError(f"field '{where}.tool_calls': {error}") from None
        content_may_be_empty = calls is not None and message.get("content") in (None, "")
        if not isinstance(message.get("content"), str) and not content_may_be_empty:
            raise ValueError(f"field '{where}.content' must be a string, got {type(message.get('content')).__name__}")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"field '{field}[0].role': a conversation must not start with an assistant turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"field '{field}' has no assistant turn, so nothing would be trained on")


def conversation_and_tools(record: dict) -> tuple[list[dict], list[dict] | None]:
    """The messages of an SFT line as the chat template takes them, and its tools. Tools come from the line's
    `tools` (the OpenAI request shape) or from the system message's `tools` / `functions` (MiniMind's jsonl shape),
    as a list or a JSON string; `tool_calls` may be a JSON string too, with arguments as objects or JSON strings."""
    messages = []
    tools = record.get("tools")
    for message in record["conversations"]:
        message = dict(message)
        if message["role"] == "system":
            tools = tools or message.pop("tools", None) or message.pop("functions", None)
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            message["tool_calls"] = openai_tool_calls_to_template(json.loads(calls) if isinstance(calls, str) else calls)
        messages.append(message)
    if isinstance(tools, str):
        tools = json.loads(tools)
    return messages, tools or None


def validate_conversation_record(record: Any) -> None:
    """An SFT line: `{"conversations": [{"role", "content"}, ...]}`, optionally with tools (see
    conversation_and_tools)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError("missing field 'conversations'")
    validate_messages(record["conversations"], "conversations")
    try:
        _, tools = conversation_and_tools(record)
    except json.JSONDecodeError as error:
        raise ValueError(f"a 'tools', 'functions' or 'tool_calls' field is not valid JSON: {error.msg}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("field 'tools' must be a list of tool schemas (objects)")


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
# Documents and token sequences

def shift_for_next_token(ids: Sequence[int], mask: Sequence[int]) -> Triple:
    """(input_ids, labels, loss_mask) for next-token prediction: position t predicts ids[t+1], counted if mask[t+1]."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to form an input/label pair, got {len(ids)}")
    tokens = torch.tensor(ids, dtype=torch.long)  # (T+1,)
    loss_mask = torch.tensor(mask[1:], dtype=torch.float32)  # (T,)
    return tokens[:-1], tokens[1:], loss_mask


def document_triple(document: Document, max_length: int) -> Triple:
    """A document's next-token triple, cut to its first max_length tokens (at most max_length - 1 positions)."""
    ids, mask = document
    return shift_for_next_token(ids[:max_length], mask[:max_length])


def text_document(tokenizer: PreTrainedTokenizerBase, text: str) -> Document:
    """[bos] + text + [eos], every token counted."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError("plain-text samples need a tokenizer with bos_token and eos_token set")
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int | None = None,
                        tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered by the tokenizer's chat template (listing `tools` if given), and a
    0/1 mask of its reply tokens.

    For assistant turn i the reply is the text between the render of messages[:i] with the generation prompt and
    the render of messages[:i+1]; whitespace after the reply's end-of-turn token goes to the following prompt
    segment. Prompt and reply segments are tokenized separately, so the prompt ids equal those a chat client
    produces for the same history. The result is truncated to `max_length` tokens.
    """
    def _render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools)

    full_text = _render(messages, add_generation_prompt=False)
    segments: list[tuple[str, int]] = []  # (text, 1 if it is a reply)
    cursor = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise ValueError("a conversation must not start with an assistant turn (there is no prompt to answer)")
        prompt_text = _render(messages[:turn], add_generation_prompt=True)
        through_reply = _render(messages[: turn + 1], add_generation_prompt=False)
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
# Datasets of documents, one sample per document


def check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (one input and one label), got {max_length}")


class DocumentDataset(Dataset, ABC):
    """Documents, one training sample each: `dataset[i]` is document i's next-token triple cut to max_length tokens.
    Subclasses say where the documents come from by defining `document(i)`."""

    max_length: int

    @abstractmethod
    def document(self, index: int) -> Document:
        """Token ids and loss mask of the whole document `index` (not cut to max_length)."""

    def __getitem__(self, index: int) -> Triple:
        return document_triple(self.document(index), self.max_length)

    def document_lengths(self, num_workers: int = 0, progress: bool = False) -> np.ndarray:
        """Token count of every whole document, (N,) int64; tokenizes each document once."""
        lengths = (len(ids) for ids, _ in iterate_documents(self, num_workers, progress, "measuring documents"))
        return np.fromiter(lengths, dtype=np.int64, count=len(self))


class _WholeDocuments(Dataset):
    """`documents.document(i)` as a Dataset, so that DataLoader workers can share the tokenizing."""

    def __init__(self, documents: DocumentDataset):
        self.documents = documents

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> Document:
        return self.documents.document(index)


def iterate_documents(documents: DocumentDataset, num_workers: int = 0, progress: bool = False,
                      description: str = "tokenizing") -> Iterator[Document]:
    """Every whole document, in order; num_workers > 0 worker processes tokenize ahead. `progress` shows a bar."""
    loader = DataLoader(_WholeDocuments(documents), batch_size=256, num_workers=num_workers, collate_fn=list)
    with tqdm(total=len(documents), desc=description, unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in loader:
            yield from chunk
            bar.update(len(chunk))


class JsonlDataset(Dataset):
    """A lazily read jsonl file whose lines are checked by `validate`; subclasses turn a record into tensors."""

    validate: Callable[[object], None]

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 skip_invalid: bool = False):
        check_max_length(max_length)
        self.records = JsonlRecords(data_path, type(self).validate, skip_invalid)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def skipped(self) -> int:
        return self.records.skipped

    def __len__(self) -> int:
        return len(self.records)


class PretrainDataset(JsonlDataset, DocumentDataset):
    """`{"text"}` lines -> [bos] + text + [eos], truncated to max_length, every label counted."""

    validate = staticmethod(validate_text_record)

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 skip_invalid: bool = False):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("PretrainDataset needs a tokenizer with bos_token and eos_token set")
        super().__init__(data_path, tokenizer, max_length, skip_invalid)

    def document(self, index: int) -> Document:
        return text_document(self.tokenizer, self.records[index]["text"])


class SFTDataset(JsonlDataset, DocumentDataset):
    """`{"conversations": [...]}` lines -> the chat-template rendering, loss on the assistant replies only.

    A line may instead be `{"text": ...}`: pretraining text replayed during fine-tuning, trained on every token as
    in pretraining. Mixing some in keeps a small model from forgetting what it read while it learns to chat.
    A reply truncated away entirely leaves an all-zero loss_mask; the training loss must divide by
    `loss_mask.sum().clamp(min=1)`.
    """

    validate = staticmethod(validate_chat_or_text_record)

    def document(self, index: int) -> Document:
        record = self.records[index]
        if "conversations" not in record:
            return text_document(self.tokenizer, record["text"])
        messages, tools = conversation_and_tools(record)
        return render_conversation(self.tokenizer, messages, tools=tools)


class DPODataset(JsonlDataset):
    """`{"chosen": [...], "rejected": [...]}` lines -> (chosen_triple, rejected_triple), each rendered like SFT."""

    validate = staticmethod(validate_preference_record)

    def __getitem__(self, index: int) -> tuple[Triple, Triple]:
        record = self.records[index]
        chosen = shift_for_next_token(*render_conversation(self.tokenizer, record["chosen"], self.max_length))
        rejected = shift_for_next_token(*render_conversation(self.tokenizer, record["rejected"], self.max_length))
        return chosen, rejected


# ----------------------------------------------------------------------------------------------------------------
# Pretokenized files: a corpus tokenized once by scripts/pretokenize.py, read memory-mapped


class TokenFiles(NamedTuple):
    """The files of one pretokenized corpus, all named after its NAME.bin."""

    tokens: Path  # NAME.bin: the token ids of every document back to back, uint16 (uint32 for vocabularies > 65536)
    offsets: Path  # NAME.idx: int64, where each document starts in NAME.bin, then the total (documents + 1 values)
    mask: Path  # NAME.mask: uint8, the loss mask of every token (chat corpora only)
    header: Path  # NAME.meta.json: format, kind, dtype, counts, tokenizer; written last, so it marks a complete file

    @classmethod
    def of(cls, path: str | Path) -> TokenFiles:
        stem = Path(path).with_suffix("")
        return cls(*(stem.with_name(stem.name + suffix) for suffix in (".bin", ".idx", ".mask", ".meta.json")))


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides the ids: the tokenizer's whole definition (vocabulary, merges, normalisation,
    special tokens) and its chat template."""
    definition = tokenizer.backend_tokenizer.to_str() + "\n" + str(tokenizer.chat_template)
    return hashlib.sha256(definition.encode("utf-8")).hexdigest()


def write_token_file(documents: PretrainDataset | SFTDataset, path: str | Path, tokenizer_path: str = "",
                     num_workers: int = 0, progress: bool = False) -> dict:
    """Tokenize every document of a jsonl dataset once into the token files of `path` (NAME.bin); returns the
    header. Streaming: each document is appended as it comes, so memory does not grow with the corpus. The header
    is removed first and written last (atomically), so an interrupted run leaves files that are refused."""
    files = TokenFiles.of(path)
    files.header.parent.mkdir(parents=True, exist_ok=True)
    files.header.unlink(missing_ok=True)
    chat = isinstance(documents, SFTDataset)
    dtype = token_dtype(len(documents.tokenizer))
    count, total, longest = 0, 0, 0
    buffer = 1 << 20
    with (open(files.tokens, "wb", buffering=buffer) as tokens_out,
          open(files.offsets, "wb", buffering=buffer) as offsets_out,
          open(files.mask, "wb", buffering=buffer) if chat else nullcontext() as mask_out):
        offsets_out.write(np.int64(0).tobytes())
        for ids, mask in iterate_documents(documents, num_workers, progress, f"tokenizing {documents.records.path}"):
            tokens_out.write(np.asarray(ids, dtype=dtype).tobytes())
            if mask_out is not None:
                mask_out.write(np.asarray(mask, dtype=np.uint8).tobytes())
            count, total, longest = count + 1, total + len(ids), max(longest, len(ids))
            offsets_out.write(np.int64(total).tobytes())
    if not chat:
        files.mask.unlink(missing_ok=True)  # a stale mask of an earlier chat run under the same name
    header = {
        "format": TOKEN_FILE_FORMAT,
        "kind": "chat" if chat else "text",
        "dtype": dtype.name,
        "vocab_size": len(documents.tokenizer),
        "documents": count,
        "tokens": total,
        "max_document_length": longest,
        "tokenizer_path": str(tokenizer_path),
        "tokenizer_sha256": tokenizer_fingerprint(documents.tokenizer),
        "source": str(documents.records.path),
    }
    atomic_write_text(files.header, json.dumps(header, indent=2) + "\n")
    return header


def read_token_header(files: TokenFiles) -> dict:
    """The header of a token file, checked against the sizes of the files beside it."""
    if not files.header.exists():
        raise MissingInputError(f"{files.header} not found: {files.tokens} is incomplete (an interrupted "
                                f"pretokenize run?) or was not written by scripts/pretokenize.py; {HOW_TO_PRETOKENIZE}")
    try:
        header = json.loads(files.header.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{files.header}: not a token-file header ({error}); {HOW_TO_PRETOKENIZE}") from error
    if not isinstance(header, dict) or header.get("format") != TOKEN_FILE_FORMAT:
        raise DataFormatError(f"{files.header}: unknown token-file format (expected format {TOKEN_FILE_FORMAT}); "
                              f"{HOW_TO_PRETOKENIZE}")
    sizes = {files.tokens: header["tokens"] * np.dtype(header["dtype"]).itemsize,
             files.offsets: (header["documents"] + 1) * 8}
    if header["kind"] == "chat":
        sizes[files.mask] = header["tokens"]
    for file, size in sizes.items():
        actual = require_file(file, HOW_TO_PRETOKENIZE, "token file").stat().st_size
        if actual != size:
            raise DataFormatError(f"{file}: {actual:,} bytes where {files.header.name} says {size:,} (truncated, or "
                                  f"from another run); {HOW_TO_PRETOKENIZE}")
    return header


class PretokenizedDataset(DocumentDataset):
    """The documents of a token file (NAME.bin and the files beside it), memory-mapped: nothing is read into RAM
    and forked DataLoader workers share the pages. Each document is one training sample, cut to max_length, equal
    to what PretrainDataset / SFTDataset give for the jsonl it was written from."""

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512):
        check_max_length(max_length)
        self.files = TokenFiles.of(require_file(data_path, HOW_TO_PRETOKENIZE, "token file"))
        self.header = read_token_header(self.files)
        if self.header["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{self.files.tokens} was tokenized with another tokenizer "
                              f"({self.header['tokenizer_path'] or 'unnamed'}) than the one given: pass that "
                              f"--tokenizer_path, or pretokenize again with this one")
        if self.header["documents"] == 0:
            raise DataFormatError(f"{self.files.tokens} holds no documents (its source "
                                  f"{self.header['source']} had none)")
        self.kind: str = self.header["kind"]
        self.max_length = max_length
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens, offsets, mask or None), mapped on first use in each process."""
        if self._maps is None:
            files = self.files
            self._maps = (np.memmap(files.tokens, dtype=np.dtype(self.header["dtype"]), mode="r"),
                          np.memmap(files.offsets, dtype=np.int64, mode="r"),
                          np.memmap(files.mask, dtype=np.uint8, mode="r") if self.kind == "chat" else None)
        return self._maps

    def __len__(self) -> int:
        return self.header["documents"]

    def document(self, index: int) -> Document:
        tokens, offsets, mask = self._arrays()
        start, end = int(offsets[index]), int(offsets[index + 1])
        return tokens[start:end], mask[start:end] if mask is not None else np.ones(end - start, dtype=np.uint8)

    def document_lengths(self, num_workers: int = 0, progress: bool = False) -> np.ndarray:
        """Read from the offsets: nothing to tokenize."""
        return np.diff(self._arrays()[1]).astype(np.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None  # pickling a memmap would copy the data (spawned workers map the files themselves)
        return state


def open_documents(data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                   chat: bool = False) -> DocumentDataset:
    """The documents of a training file, one sample each: a token file (NAME.bin), or a jsonl of pretraining text
    (chat=False: PretrainDataset) or of conversations and replayed text (chat=True: SFTDataset)."""
    if Path(data_path).suffix != ".bin":
        return (SFTDataset if chat else PretrainDataset)(data_path, tokenizer, max_length)
    documents = PretokenizedDataset(data_path, tokenizer, max_length)
    if documents.kind == "chat" and not chat:
        raise ConfigError(f"{data_path} holds chat documents (loss on the replies only); this stage trains on text: "
                          f"pretokenize its text with --kind text")
    return documents


# ----------------------------------------------------------------------------------------------------------------
# Packing: whole documents side by side in rows of a fixed width


def pack_documents(positions: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed plan placing documents of `positions` input positions each into rows of row_length positions:
    best-fit decreasing (the longest document first, each into the open row it fills most tightly, a new row when
    none has room). Deterministic: equal lengths keep the document order.

    Returns (row_offsets (R+1,), documents (N,)), int64: row r holds documents[row_offsets[r]:row_offsets[r+1]].
    """
    if len(positions) and (positions.min() < 1 or positions.max() > row_length):
        raise ValueError(f"every document must fill 1..{row_length} positions, got {positions.min()}..{positions.max()}")
    order = np.argsort(-positions, kind="stable")
    open_rows: list[list[int]] = [[] for _ in range(row_length + 1)]  # open_rows[f]: the rows with f positions free
    open_count = np.zeros(row_length + 1, dtype=np.int64)  # len(open_rows[f]), searched in one vectorised call
    row_of = np.empty(len(positions), dtype=np.int64)
    rows = 0
    for document, need in zip(order.tolist(), positions[order].tolist()):
        fitting = np.flatnonzero(open_count[need:])
        if fitting.size:
            free = need + int(fitting[0])
            row = open_rows[free].pop()
            open_count[free] -= 1
        else:
            row, free = rows, row_length
            rows += 1
        row_of[document] = row
        if free > need:
            open_rows[free - need].append(row)
            open_count[free - need] += 1
    placed = order[np.argsort(row_of[order], kind="stable")]  # grouped by row, in placement order within a row
    row_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=row_offsets[1:])
    return row_offsets, placed


class PackedDataset(Dataset):
    """Whole documents packed into rows of max_length - 1 positions (as wide as the longest padded sample), one
    training sample per row: `dataset[r]` is the list of row r's document triples, each cut to max_length tokens
    exactly as the padded datasets cut them. PackedCollator turns rows into a batch.

    `data_path` is a token file (NAME.bin) or a jsonl file; a jsonl is tokenized once here to learn the document
    lengths (`num_workers` processes, a progress bar with `progress`) and again when its rows are read. The plan
    (pack_documents) is fixed at construction and depends only on the data and max_length, so the trainer's data
    order and exact resume work on rows as on any samples."""

    def __init__(self, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 chat: bool = False, num_workers: int = 0, progress: bool = False):
        self.documents = open_documents(data_path, tokenizer, max_length, chat)
        self.max_length, self.row_length = max_length, max_length - 1
        lengths = self.documents.document_lengths(num_workers, progress)
        self.positions = np.minimum(lengths, max_length) - 1  # (N,) positions each document fills in its row
        self.row_offsets, self.row_documents = pack_documents(self.positions, self.row_length)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, row: int) -> list[Triple]:
        start, end = self.row_offsets[row], self.row_offsets[row + 1]
        return [self.documents[int(document)] for document in self.row_documents[start:end]]


def useful_token_share(dataset: PackedDataset | DocumentDataset, batch_size: int = 8, seed: int = 0,
                       num_workers: int = 0, progress: bool = False) -> float:
    """The share of batch positions that hold a document token rather than padding, batched as for training.

    Packed: every row is row_length wide, so the share is the same for any batch. Padded: a batch is as wide as
    its longest sample, so the share is measured over the full batches of batch_size samples in a seeded random
    order (the trainer's order is another one of the same kind). A jsonl dataset is tokenized once for this."""
    if isinstance(dataset, PackedDataset):
        return float(dataset.positions.sum()) / (len(dataset) * dataset.row_length)
    positions = np.minimum(dataset.document_lengths(num_workers, progress), dataset.max_length) - 1
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed)).numpy()
    batches = positions[order[: len(order) // batch_size * batch_size]].reshape(-1, batch_size)  # (batches, B)
    return float(batches.sum()) / float(batches.max(axis=1).sum() * batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Batches and collators


@dataclass
class Batch:
    """A collated batch of next-token triples. It unpacks like the triple, `inputs, labels, loss_mask = batch`;
    packed batches also carry document_ids, which the loss functions pass on to the model."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long: each document's inputs shifted left by one
    loss_mask: torch.Tensor  # (B, T) float: 1 where the label counts towards the loss
    document_ids: torch.Tensor | None = None  # (B, T) long, packed rows: 0, 1, ... per document, -1 on padding
    useful_tokens: int = 0  # positions holding a document token (not padding): what tokens/s counts

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.input_ids, self.labels, self.loss_mask))

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; copies from pinned memory (CUDA DataLoaders) do not block the host."""
        non_blocking = device.type == "cuda"
        return replace(self, **{name: t.to(device, non_blocking=non_blocking) for name, t in self._tensors().items()})

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with pin_memory=True."""
        return replace(self, **{name: t.pin_memory() for name, t in self._tensors().items()})


class PadCollator:
    """Stack triples into a Batch of (B, T) tensors, right-padded to the longest item (padding: pad_token_id, mask 0),
    or to a fixed `width` (as the original MiniMind pads every sample to max_seq_len)."""

    def __init__(self, pad_token_id: int, width: int | None = None):
        self.pad_token_id, self.width = pad_token_id, width

    def __call__(self, batch: list[Triple]) -> Batch:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        longest = self.width or max(len(input_ids) for input_ids, _, _ in batch)
        inputs = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        loss_mask = torch.zeros(len(batch), longest, dtype=torch.float32)  # (B, T)
        for row, (input_ids, label_ids, mask) in enumerate(batch):
            length = len(input_ids)
            inputs[row, :length] = input_ids
            labels[row, :length] = label_ids
            loss_mask[row, :length] = mask
        return Batch(inputs, labels, loss_mask, useful_tokens=sum(len(input_ids) for input_ids, _, _ in batch))


class PackedCollator:
    """Stack packed rows (lists of document triples) into a Batch of (B, row_length) tensors: each row's documents
    side by side, then padding (pad_token_id, mask 0). document_ids numbers the documents of a row 0, 1, ... and
    gives the padding its own id, -1, so the padding attends only to itself."""

    def __init__(self, pad_token_id: int, row_length: int):
        self.pad_token_id, self.row_length = pad_token_id, row_length

    def __call__(self, rows: list[list[Triple]]) -> Batch:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        shape = (len(rows), self.row_length)
        inputs = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full(shape, self.pad_token_id, dtype=torch.long)  # (B, T)
        loss_mask = torch.zeros(shape, dtype=torch.float32)  # (B, T)
        document_ids = torch.full(shape, PADDING_DOCUMENT, dtype=torch.long)  # (B, T)
        useful = 0
        for row, documents in enumerate(rows):
            start = 0
            for number, (input_ids, label_ids, mask) in enumerate(documents):
                end = start + len(input_ids)
                if end > self.row_length:
                    raise ValueError(f"a packed row of {end} positions does not fit rows of {self.row_length}")
                inputs[row, start:end] = input_ids
                labels[row, start:end] = label_ids
                loss_mask[row, start:end] = mask
                document_ids[row, start:end] = number
                start = end
            useful += start
        return Batch(inputs, labels, loss_mask, document_ids, useful)


class DPOCollator:
    """Collate (chosen, rejected) pairs into a (2B, T) Batch: the B chosen rows first, then the B rejected rows."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, batch: list[tuple[Triple, Triple]]) -> Batch:
        chosen = [pair[0] for pair in batch]
        rejected = [pair[1] for pair in batch]
        return self.pad(chosen + rejected)
