"""Using a trained MiniMind: load a checkpoint, build chat prompts, stream replies.

One module serves every front end (eval_model.py, the OpenAI-compatible server, the web demo):

    parser = argparse.ArgumentParser(); add_model_args(parser); args = parser.parse_args()
    model, tokenizer = load_model(args)
    stream = stream_chat(model, tokenizer, [{"role": "user", "content": "你好"}])
    for delta in stream: print(delta, end="", flush=True)   # the generator's return value is a GenerationResult

Native checkpoints (`out/{stage}_{dim}[_moe].pth`) and Hugging Face folders (a dense `LlamaForCausalLM` export or
a MiniMind MoE export, see model/hf_minimind.py) both become a plain `MiniMindLM`, so there is one generation path.
"""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Generator
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import STAGE_SCRIPTS, load_state_dict_file, weights_path
from .cli import DEFAULT_TOKENIZER, add_architecture_args, config_from_args
from .distributed import select_device
from .hf_minimind import load_hf_folder
from .model import MiniMindLM
from .model_lora import attach_lora_file

MODEL_MODES = {0: "pretrain", 1: "full_sft", 2: "rlhf", 3: "reason"}  # weight file prefixes in out/
# Which script writes each stage's weights, for the error message when a file is missing.
PUBLISHED_WEIGHTS = "https://www.modelscope.cn/models/gongjy/MiniMind2-PyTorch/files"
PRETRAIN_MODE = 0  # the only mode without a chat template: the model continues raw text


# ----------------------------------------------------------------------------------------------------------------
# Command line and loading


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-selection flags shared by eval_model.py, the API server and the web demo."""
    group = parser.add_argument_group("model loading")
    group.add_argument("--load", type=int, default=0, choices=(0, 1),
                       help="0: native weights out/{stage}_{dim}[_moe].pth; 1: a Hugging Face folder (--hf_path)")
    group.add_argument("--model_mode", type=int, default=1, choices=sorted(MODEL_MODES),
                       help="0: pretrain (text continuation), 1: full_sft, 2: rlhf (DPO), 3: reason")
    group.add_argument("--out_dir", default="out", help="folder holding the native .pth weights")
    group.add_argument("--weight", default=None, help="explicit .pth file (overrides --model_mode's file name)")
    group.add_argument("--hf_path", default=None, help="Hugging Face model folder, used with --load 1")
    add_architecture_args(group)
    group.add_argument("--max_seq_len", type=int, default=8192, help="context length: prompts are cut to fit it")
    group.add_argument("--lora_name", default=None,
                       help="LoRA adapter to apply, read from {out_dir}/lora/{lora_name}_{dim}.pth")
    group.add_argument("--tokenizer_path", default=None,
                       help=f"tokenizer folder (default: the HF folder with --load 1, else {DEFAULT_TOKENIZER})")
    group.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), or e.g. cpu, cuda:0")
    group.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                       help="auto: bfloat16 on GPUs that support it, float16 on other GPUs/MPS, float32 on CPU")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def native_weight_path(args: argparse.Namespace) -> str:
    """The .pth file --load 0 reads: --weight, else {out_dir}/{stage}_{dim}[_moe].pth."""
    if args.weight:
        return args.weight
    return str(weights_path(args.out_dir, MODEL_MODES[args.model_mode], config_from_args(args)))


def load_model(args: argparse.Namespace) -> tuple[MiniMindLM, PreTrainedTokenizerBase]:
    """Build the model the flags of add_model_args describe, in eval mode on the chosen device and dtype.

    --load 0 reads a native .pth (strict: every key must match the --dim/--n_layers/--use_moe architecture);
    --load 1 converts a Hugging Face folder in memory with the same code scripts/convert_model.py uses.
    A missing file raises FileNotFoundError naming the file and how to produce it.
    """
    device = select_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.load == 1:
        if not args.hf_path:
            raise ValueError("--load 1 needs --hf_path (a folder written by scripts/convert_model.py torch2hf)")
        source = args.hf_path
        config, state = load_hf_folder(source)
        config.max_seq_len = min(config.max_seq_len, args.max_seq_len)
        tokenizer_path = args.tokenizer_path or args.hf_path
    else:
        source = native_weight_path(args)
        stage = MODEL_MODES[args.model_mode]
        state = load_state_dict_file(source, what_to_run=(
            f"model_mode {args.model_mode} ({stage}) needs it: run {STAGE_SCRIPTS[stage]} first, pass --weight PATH, "
            f"or download published MiniMind2 weights from {PUBLISHED_WEIGHTS} into {args.out_dir}/"))
        embedding = state.get("tok_embeddings.weight")  # the vocabulary size comes from the weights
        vocab_size = embedding.shape[0] if embedding is not None else 6400
        config = config_from_args(args, vocab_size=vocab_size, max_seq_len=args.max_seq_len)
        tokenizer_path = args.tokenizer_path or str(DEFAULT_TOKENIZER)
    if not os.path.isdir(tokenizer_path):
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_path} (train it with train_tokenizer.py)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    model = MiniMindLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not match the model built from the flags "
                         f"(--dim {config.dim} --n_layers {config.n_layers} --use_moe {int(config.use_moe)}): {err}") from err
    if args.lora_name:
        attach_lora_file(model, lora_path(args, config.dim))
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def lora_path(args: argparse.Namespace, dim: int) -> str:
    return os.path.join(args.out_dir, "lora", f"{args.lora_name}_{dim}.pth")


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_prompt_tokens: int,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the chat-templated conversation, at most max_prompt_tokens long.

    Too long: the oldest non-system messages are dropped first (a leading assistant reply goes with the user turn
    before it; the last message always stays), then tokens are cut from the left of everything after the system
    message. The system message is always kept whole; if it alone does not fit, ValueError.
    """
    if not messages:
        raise ValueError("messages is empty")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = list(messages[len(system):])
    ids = _encode(tokenizer, _render(tokenizer, system + turns, add_generation_prompt))
    while len(ids) > max_prompt_tokens and len(turns) > 1:
        turns.pop(0)
        while len(turns) > 1 and turns[0].get("role") == "assistant":
            turns.pop(0)
        ids = _encode(tokenizer, _render(tokenizer, system + turns, add_generation_prompt))
    if len(ids) <= max_prompt_tokens:
        return ids
    text = _render(tokenizer, system + turns, add_generation_prompt)
    prefix_text = _render(tokenizer, system, add_generation_prompt=False) if system else ""
    if not text.startswith(prefix_text):
        raise ValueError("the chat template does not render the system message as a prefix; cannot keep it")
    prefix = _encode(tokenizer, prefix_text) if prefix_text else []
    room = max_prompt_tokens - len(prefix)
    if room < 1:
        raise ValueError(f"the system message alone is {len(prefix)} tokens; it does not fit in {max_prompt_tokens}")
    rest = _encode(tokenizer, text[len(prefix_text):])
    return prefix + rest[-room:]


def build_continuation_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_prompt_tokens: int) -> list[int]:
    """bos + raw text for a pretrained (not chat-tuned) model; cut from the left (bos kept) to fit."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = _encode(tokenizer, text)
    room = max_prompt_tokens - len(bos)
    if room < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for the prompt")
    return bos + ids[-room:]


# ----------------------------------------------------------------------------------------------------------------
# Streaming generation


@dataclass
class GenerationResult:
    text: str  # the whole reply, without the eos token or the stop string
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_new_tokens or the context is full)
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the eos token included


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never end inside a multi-byte character.

    A byte-level BPE token can hold half of a UTF-8 character; decoding it alone gives U+FFFD. Text is only
    released once its decoding no longer ends in U+FFFD. Each step decodes a short window (the last released
    tokens plus the new ones) instead of the whole reply, so streaming stays linear in the reply length.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: tokens already released, kept as context for the decoder
        self.read_offset = 0  # tokens before this index are released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly stable text (possibly "")."""
        self.ids.append(token_id)
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) <= len(released) or window.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(released) :]

    def flush(self) -> str:
        """Whatever is left at the end, even an incomplete character."""
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(released) :]


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:], or None. Text before `start` was already released, and
    release holds back any tail that could begin a stop string, so no stop string can start before it."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string (it may still grow into
    one, so it must not be released yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stream_chat(
    model: MiniMindLM,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.85,
    top_p: float = 0.85,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    max_context: int | None = None,
    continuation: bool = False,
) -> Generator[str, None, GenerationResult]:
    """Yield the reply to `messages` as text deltas; return a GenerationResult when done.

    continuation=True is for pretrained models (model_mode 0): no chat template, the model continues
    bos + the last message's content. The prompt keeps at most max_context - max_new_tokens tokens (but at least
    half the context); generation also stops when prompt + reply fill max_context (default: the model's
    max_seq_len), with finish_reason "length". Stop strings end the reply and are not part of it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_context = max_context or model.config.max_seq_len
    prompt_budget = max(max_context - max_new_tokens, max_context // 2)
    if continuation:
        prompt_ids = build_continuation_prompt(tokenizer, messages[-1]["content"], prompt_budget)
    else:
        prompt_ids = build_prompt(tokenizer, messages, prompt_budget)
    budget = min(max_new_tokens, max_context - len(prompt_ids))
    stops = [s for s in (stop or []) if s]
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)

    decoder = IncrementalDecoder(tokenizer)
    text, released = "", 0  # decoded reply so far; how much of it was yielded
    finish_reason, completion_tokens, cut_at_stop_string = "length", 0, False
    for step in model.stream_generate(input_ids, max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                      top_k=top_k, repetition_penalty=repetition_penalty, eos_token_id=eos,
                                      pad_token_id=tokenizer.pad_token_id or 0, seed=seed):
        token = int(step[0])
        completion_tokens += 1
        if token == eos:
            finish_reason = "stop"
            break
        text += decoder.push(token)
        cut = _first_stop(text, stops, released)
        if cut is not None:
            text, finish_reason, cut_at_stop_string = text[:cut], "stop", True
            break
        safe_end = len(text) - _stop_holdback(text, stops)
        if safe_end > released:
            yield text[released:safe_end]
            released = safe_end
    if not cut_at_stop_string:
        text += decoder.flush()  # bytes of an unfinished character, if generation ended inside one
        cut = _first_stop(text, stops, released)
        if cut is not None:
            text, finish_reason = text[:cut], "stop"
    if len(text) > released:
        yield text[released:]
    return GenerationResult(text=text, finish_reason=finish_reason, prompt_tokens=len(prompt_ids),
                            completion_tokens=completion_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Reasoning replies: "<think>...</think><answer>...</answer>"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_TAGS = re.compile(r"</?answer>")


def split_reasoning(text: str) -> tuple[str, str]:
    """(think part, answer part) of a reasoning reply, tags removed and whitespace trimmed.

    The opening <think> may be missing (a template can put it in the generation prompt); a reply cut off inside
    the think part has an empty answer; a reply without </think> or <think> is all answer.
    """
    if THINK_CLOSE in text:
        think, answer = text.split(THINK_CLOSE, 1)
        think = think.split(THINK_OPEN, 1)[-1]
    elif THINK_OPEN in text:
        think, answer = text.split(THINK_OPEN, 1)[1], ""
    else:
        think, answer = "", text
    return think.strip(), ANSWER_TAGS.sub("", answer).strip()


class ReasoningStream:
    """Routes streamed deltas of a reasoning reply to ("think", text) or ("answer", text) pieces as they come.

    Tags may arrive split across deltas, so a delta ending in a possible tag prefix is held back until the next
    one. Tags themselves are never emitted; <answer>/</answer> are dropped.
    """

    TAGS = (THINK_OPEN, THINK_CLOSE, "<answer>", "</answer>")

    def __init__(self):
        self.pending = ""
        self.in_think = False

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.pending += delta
        pieces: list[tuple[str, str]] = []
        while True:
            found = [(i, tag) for tag in self.TAGS if (i := self.pending.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            self._emit(pieces, self.pending[:i])
            self.pending = self.pending[i + len(tag) :]
            if tag == THINK_OPEN:
                self.in_think = True
            elif tag == THINK_CLOSE:
                self.in_think = False
        hold = _stop_holdback(self.pending, list(self.TAGS))
        self._emit(pieces, self.pending[: len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold :]
        return pieces

    def close(self) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        self._emit(pieces, self.pending)
        self.pending = ""
        return pieces

    def _emit(self, pieces: list[tuple[str, str]], text: str) -> None:
        if text:
            pieces.append(("think" if self.in_think else "answer", text))
