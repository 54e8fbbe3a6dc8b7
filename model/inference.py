"""Using a trained MiniMind: build chat prompts, stream replies.

One module serves every front end (eval_model.py, the OpenAI-compatible server, the web demo):

    parser = argparse.ArgumentParser(); add_model_args(parser); args = parser.parse_args()
    model, tokenizer = load_model(args)                          # model/loading.py: any release, .pth or folder
    stream = stream_chat(model, tokenizer, [{"role": "user", "content": "你好"}])
    for delta in stream: print(delta, end="", flush=True)   # the generator's return value is a GenerationResult
"""
from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .model import MiniMindLM

# ----------------------------------------------------------------------------------------------------------------
# Prompts


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         tools=tools or None)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_prompt_tokens: int,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of the chat-templated conversation (with `tools`, OpenAI function schemas, listed by the
    template), at most max_prompt_tokens long.

    Too long: the oldest non-system messages are dropped first (a leading assistant reply goes with the user turn
    before it, and tool results with the call before them; the last message always stays), then tokens are cut
    from the left of everything after the system turn. The system turn (the system message and the tools) is
    always kept whole; if it alone does not fit, ValueError.
    """
    if not messages:
        raise ValueError("messages is empty")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = list(messages[len(system):])
    ids = _encode(tokenizer, _render(tokenizer, system + turns, add_generation_prompt, tools))
    while len(ids) > max_prompt_tokens and len(turns) > 1:
        turns.pop(0)
        while len(turns) > 1 and turns[0].get("role") in ("assistant", "tool"):
            turns.pop(0)
        ids = _encode(tokenizer, _render(tokenizer, system + turns, add_generation_prompt, tools))
    if len(ids) <= max_prompt_tokens:
        return ids
    text = _render(tokenizer, system + turns, add_generation_prompt, tools)
    prefix_text = _system_turn(tokenizer, system, tools) if system or tools else ""
    if not text.startswith(prefix_text):
        raise ValueError("the chat template does not render the system message as a prefix; cannot keep it")
    prefix = _encode(tokenizer, prefix_text) if prefix_text else []
    room = max_prompt_tokens - len(prefix)
    if room < 1:
        raise ValueError(f"the system message alone is {len(prefix)} tokens; it does not fit in {max_prompt_tokens}")
    rest = _encode(tokenizer, text[len(prefix_text):])
    return prefix + rest[-room:]


def _system_turn(tokenizer: PreTrainedTokenizerBase, system: list[dict], tools: list[dict] | None) -> str:
    """What the template renders before the first turn after the system message: the system message and the tool
    list. (With tools and no system message there is nothing to render alone, so it is the common start of two
    conversations that differ in their first user message, less that message's header.)"""
    if not tools:
        return _render(tokenizer, system, add_generation_prompt=False)
    first = [_render(tokenizer, system + [{"role": "user", "content": c}], False, tools) for c in "ab"]
    header = os.path.commonprefix([_render(tokenizer, [{"role": "user", "content": c}], False) for c in "ab"])
    shared = os.path.commonprefix(first)
    if not shared.endswith(header):
        raise ValueError("the chat template does not render the tools before the conversation; cannot keep them")
    return shared[: len(shared) - len(header)]


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


@dataclass
class ChatPrompt:
    ids: list[int]  # the prompt's token ids
    budget: int  # how many tokens the reply may have: max_new_tokens, less if the context would overflow


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_new_tokens: int, max_context: int,
                continuation: bool = False, tools: list[dict] | None = None, reply_prefix: str = "") -> ChatPrompt:
    """The prompt for `messages` (and `tools`) and the reply's token budget within max_context.

    continuation=True is for pretrained models (model_mode 0): no chat template, the model continues bos + the last
    message's content. reply_prefix is text the reply is made to start with (e.g. the opening of a tool call the
    caller requires); it ends the prompt, so it is not part of what is generated. The prompt keeps at most
    max_context - max_new_tokens tokens (but at least half the context), so prompt + reply never exceed max_context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prefix_ids = _encode(tokenizer, reply_prefix) if reply_prefix else []
    prompt_budget = max(max_context - max_new_tokens, max_context // 2) - len(prefix_ids)
    if continuation:
        ids = build_continuation_prompt(tokenizer, messages[-1]["content"], prompt_budget)
    else:
        ids = build_prompt(tokenizer, messages, prompt_budget, tools=tools) + prefix_ids
    return ChatPrompt(ids, min(max_new_tokens, max_context - len(ids)))


class ReplyText:
    """Turns a reply's tokens, pushed one by one, into text deltas: stops at eos or at a stop string (which is not
    part of the reply), never releases half a character or the start of what may become a stop string.
    `push` returns the new text (possibly ""); once `done`, `finish()` returns the last text and the result."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_tokens: int, stop: list[str] | None = None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.stops = [s for s in (stop or []) if s]
        self.prompt_tokens = prompt_tokens
        self.text, self.released = "", 0  # decoded reply so far; how much of it was handed out
        self.completion_tokens, self.finish_reason, self.done = 0, "length", False
        self.cut_at_stop_string = False

    def push(self, token: int) -> str:
        self.completion_tokens += 1
        if token == self.eos:
            self.finish_reason, self.done = "stop", True
            return ""
        self.text += self.decoder.push(token)
        cut = _first_stop(self.text, self.stops, self.released)
        if cut is not None:
            self.text, self.finish_reason, self.done, self.cut_at_stop_string = self.text[:cut], "stop", True, True
            return ""
        return self._release(len(self.text) - _stop_holdback(self.text, self.stops))

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        delta, self.released = self.text[self.released:end], end
        return delta

    def finish(self) -> tuple[str, GenerationResult]:
        """The text still held back, and the result, when generation ended (done, or out of budget)."""
        if not self.cut_at_stop_string:
            self.text += self.decoder.flush()  # bytes of an unfinished character, if generation ended inside one
            cut = _first_stop(self.text, self.stops, self.released)
            if cut is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
        last = self._release(len(self.text))
        return last, GenerationResult(text=self.text, finish_reason=self.finish_reason,
                                      prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)


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
    tools: list[dict] | None = None,
) -> Generator[str, None, GenerationResult]:
    """Yield the reply to `messages` as text deltas; return a GenerationResult when done.

    The prompt and the reply's budget come from chat_prompt (max_context defaults to the model's max_seq_len;
    `tools` are listed in the prompt, see model/tools.py for reading calls back out of the reply); generation stops
    at eos, at a stop string (not part of the reply) or when the budget is spent, with finish_reason "length"."""
    prompt = chat_prompt(tokenizer, messages, max_new_tokens, max_context or model.config.max_seq_len, continuation,
                         tools)
    reply = ReplyText(tokenizer, len(prompt.ids), stop)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)  # (1, T)
    for step in model.stream_generate(input_ids, max_new_tokens=prompt.budget, temperature=temperature, top_p=top_p,
                                      top_k=top_k, repetition_penalty=repetition_penalty, eos_token_id=reply.eos,
                                      pad_token_id=tokenizer.pad_token_id or 0, seed=seed):
        delta = reply.push(int(step[0]))
        if delta:
            yield delta
        if reply.done:
            break
    last, result = reply.finish()
    if last:
        yield last
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reasoning replies: "<think>...</think><answer>...</answer>"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REPLY_TAGS = (THINK_OPEN, THINK_CLOSE, "<answer>", "</answer>")
Piece = tuple[str, str]  # ("think" or "answer", text)


class ReplyRouter:
    """Splits a reply, as it streams, into its think part and its answer. The terminal chat, the API server and
    the web demo all render what this produces, so they agree on every reply.

    - `<think>` switches to the think part and `</think>` back to the answer; `<answer>` and `</answer>` are
      dropped. A tag may arrive split across deltas, so text that could begin one is held until the next delta.
    - A reasoning model's reply starts inside the think part, with or without the opening tag (a chat template may
      put `<think>` in the generation prompt); any other reply starts in the answer.
    - Once the reply has a think part (`has_think`), whitespace at both ends of each part is dropped: trailing
      whitespace is held until more text of the same part follows, so the pieces of a whole reply join to
      exactly `split_reasoning(reply)`. A reply without a think part passes through untouched.
    """

    def __init__(self, reasoning: bool):
        self.pending = ""
        self.in_think = reasoning
        self.has_think = reasoning
        self.started = {"think": False, "answer": False}
        self.held_space = {"think": "", "answer": ""}

    def feed(self, delta: str) -> list[Piece]:
        """The pieces this delta completes (possibly none)."""
        self.pending += delta
        routed: list[Piece] = []
        while True:
            found = [(i, tag) for tag in REPLY_TAGS if (i := self.pending.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            self._route(routed, self.pending[:i])
            self.pending = self.pending[i + len(tag):]
            if tag in (THINK_OPEN, THINK_CLOSE):
                self.in_think = tag == THINK_OPEN
        hold = _stop_holdback(self.pending, list(REPLY_TAGS))
        self._route(routed, self.pending[: len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]
        return self._trim(routed)

    def close(self) -> list[Piece]:
        """What was held back, at the end of the reply (trailing whitespace of a reasoning reply is dropped)."""
        routed: list[Piece] = []
        self._route(routed, self.pending)
        self.pending = ""
        return self._trim(routed)

    def _route(self, routed: list[Piece], text: str) -> None:
        if text:
            routed.append(("think" if self.in_think else "answer", text))

    def _trim(self, routed: list[Piece]) -> list[Piece]:
        pieces: list[Piece] = []
        for kind, text in routed:
            self.has_think |= kind == "think"
            if not self.has_think:
                pieces.append((kind, text))
                continue
            if not self.started[kind]:
                text = text.lstrip()
                if not text:
                    continue
                self.started[kind] = True
            body = text.rstrip()
            if body:
                pieces.append((kind, self.held_space[kind] + body))
                self.held_space[kind] = text[len(body):]
            else:
                self.held_space[kind] += text
        return pieces


def split_reasoning(text: str) -> tuple[str, str]:
    """(think part, answer part) of a whole reply, tags removed and whitespace trimmed, by the ReplyRouter.

    Seeing the whole reply, it knows whether the reply began inside the think part: when a `</think>` comes
    (after `<think>` or without it). A reply cut off inside the think part has an empty answer; a reply with no
    think tag is all answer."""
    router = ReplyRouter(reasoning=THINK_CLOSE in text)
    pieces = router.feed(text) + router.close()
    return tuple("".join(t for kind, t in pieces if kind == part).strip() for part in ("think", "answer"))
