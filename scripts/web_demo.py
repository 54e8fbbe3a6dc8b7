"""MiniMind web chat (streamlit): pick a checkpoint, chat with streamed replies, see a reasoning model's thoughts
and, with the Tools switch on, the tools the model calls.

Run (everything after `--` is eval_model.py's model flags; they set the out dir, the default sizes, the device):
    streamlit run scripts/web_demo.py                                    # checkpoints found in out/
    streamlit run scripts/web_demo.py -- --out_dir out --device cpu
    streamlit run scripts/web_demo.py -- --hf_path MiniMind2              # a Hugging Face folder as well
    streamlit run scripts/web_demo.py -- --tools_file facts.json          # the Tools switch adds a lookup in it
    streamlit run scripts/web_demo.py --server.address 0.0.0.0 --browser.gatherUsageStats false -- --out_dir out

The sidebar lists the native weights `{out_dir}/{stage}_{dim}[_moe].pth` (and --weight) and Hugging Face folders
(subfolders of out_dir holding a config.json, and --hf_path), of any MiniMind release: the loader reads each one's
architecture from it (model/loading.py). A `reason` checkpoint's think part is shown in a collapsible block.
The sidebar's Tools switch (off by default) offers the model the built-in tools of model/tools.py (calculator,
current_time, and lookup over --tools_file): each call is shown as a "🔧 name" block with its arguments and result,
fed back to the model, and kept in the history, until the model answers without a call.
Nothing is fetched from the network: icons are emoji. The environment variable MINIMIND_WEB_ARGS (a shell-quoted
flag string) replaces the command-line flags, for streamlit's AppTest, which cannot pass any.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `model` when run as `streamlit run scripts/...`

from model.common import MODEL_MODES, PRETRAIN_MODE, REASON_MODE, InputError, require_file  # noqa: E402
from model.inference import (  # noqa: E402
    GenerationResult,
    ReplyRouter,
    stream_chat,
)
from model.loading import add_model_args, load_model  # noqa: E402
from model.model import MiniMindLM  # noqa: E402
from model.tools import Tool, ToolCall, ToolCallStream, builtin_tools, tool_conversation  # noqa: E402

NATIVE_WEIGHT = re.compile(r"^(?P<stage>[a-z][a-z_]*?)_(?P<dim>\d+)(?P<moe>_moe)?\.pth$")
AVATARS = {"user": "🧑", "assistant": "🤖"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniMind streamlit chat")
    add_model_args(parser)
    tools = parser.add_argument_group("tools (offered to the model when the sidebar's Tools switch is on)")
    tools.add_argument("--tools_file", default=None, help="a JSON object file of facts: adds the lookup tool")
    tools.add_argument("--max_tool_rounds", type=int, default=4, help="replies per message at most, with tools")
    flags = os.environ.get("MINIMIND_WEB_ARGS")
    args = parser.parse_args(shlex.split(flags) if flags is not None else sys.argv[1:])
    if args.max_tool_rounds < 1:
        parser.error("--max_tool_rounds must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Which checkpoints there are


@dataclass(frozen=True)
class ModelChoice:
    label: str
    load: int  # 0: native .pth, 1: Hugging Face folder
    path: str
    model_mode: int


def mode_of_stage(stage: str) -> int:
    """model_mode from a weight's stage name: eval_model.py's stages by name, other *reason* stages think, the rest
    (e.g. full_dist, lora merges) chat like full_sft."""
    by_name = {name: mode for mode, name in MODEL_MODES.items()}
    return by_name.get(stage, REASON_MODE if "reason" in stage else 1)


def find_models(args: argparse.Namespace) -> list[ModelChoice]:
    """Native weights in --out_dir (and --weight), then Hugging Face folders (out_dir subfolders and --hf_path)."""
    choices = []
    out_dir = Path(args.out_dir)
    weights = sorted(out_dir.glob("*.pth")) if out_dir.is_dir() else []
    if args.weight:
        weights.insert(0, Path(args.weight))
    for path in weights:
        match = NATIVE_WEIGHT.match(path.name)
        if match:
            stage, mode = match["stage"], mode_of_stage(match["stage"])
            label = f"{path.name} ({stage}, dim {match['dim']}{', MoE' if match['moe'] else ''})"
        elif path == Path(args.weight or ""):  # an explicit file named otherwise: --model_mode says its stage
            stage, mode = MODEL_MODES[args.model_mode], args.model_mode
            label = f"{path.name} ({stage})"
        else:
            continue
        choices.append(ModelChoice(label, 0, str(path), mode))
    folders = sorted(p for p in out_dir.iterdir() if (p / "config.json").is_file()) if out_dir.is_dir() else []
    if args.hf_path and Path(args.hf_path) not in folders:
        folders.insert(0, Path(args.hf_path))
    for folder in folders:
        if args.hf_path and folder == Path(args.hf_path):  # named on the command line: so is its mode
            mode = args.model_mode
        else:
            mode = REASON_MODE if "reason" in folder.name.lower() else 1
        choices.append(ModelChoice(f"{folder.name}/ (Hugging Face, {MODEL_MODES[mode]})", 1, str(folder), mode))
    return choices


@st.cache_resource(show_spinner="Loading the model ...", max_entries=2)
def load_choice(choice: ModelChoice, flags: str, _args: argparse.Namespace) -> tuple[MiniMindLM, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a choice, cached across reruns and sessions. `flags` (the command line) is part of
    the cache key because _args, which it produced, is not hashed."""
    args = argparse.Namespace(**vars(_args))
    args.load, args.model_mode = choice.load, choice.model_mode
    if choice.load == 0:
        args.weight = choice.path
        if choice.path != _args.weight:  # the size flags describe --weight; every other file says its own size
            args.preset = args.dim = args.n_layers = args.n_kv_heads = args.use_moe = None
    else:
        args.hf_path = choice.path
    return load_model(args)


# ----------------------------------------------------------------------------------------------------------------
# Streaming a reply into the page


class StreamedReply:
    """A reply routed into its think part and its answer as it is generated, for two `st.write_stream` calls.

    `thinking()` yields the leading think text (shown in an expander while it grows), `answering()` the rest of
    the answer; think text after the answer began is kept, not shown live. The pieces come from
    model.inference.ReplyRouter, as in every front end. With split_calls, the answer also goes through
    model.tools.ToolCallStream: `answering()` yields each <tool_call> block as a ToolCall once it is complete (a
    call in the think part stays thought, it is not made).
    """

    def __init__(self, chat: Generator[str, None, GenerationResult], reasoning: bool, split_calls: bool = False):
        self.result: GenerationResult | None = None
        self.think: list[str] = []
        self.answer: list[str] = []
        self.calls: list[ToolCall] = []
        self.pieces = self._route(chat, reasoning, ToolCallStream() if split_calls else None)
        self.upcoming = next(self.pieces, None)

    def _route(self, chat: Generator[str, None, GenerationResult], reasoning: bool,
               splitter: ToolCallStream | None) -> Iterator[tuple[str, str | ToolCall]]:
        router = ReplyRouter(reasoning)
        while True:
            try:
                delta = next(chat)
            except StopIteration as finished:
                self.result = finished.value
                break
            yield from self._split_calls(router.feed(delta), splitter)
        yield from self._split_calls(router.close(), splitter)
        for text in splitter.close() if splitter else []:
            yield "answer", text

    @staticmethod
    def _split_calls(pieces: list[tuple[str, str]],
                     splitter: ToolCallStream | None) -> Iterator[tuple[str, str | ToolCall]]:
        for part in splitter.split(pieces) if splitter else pieces:
            yield ("call", part) if isinstance(part, ToolCall) else part

    def starts_with_thinking(self) -> bool:
        return self.upcoming is not None and self.upcoming[0] == "think"

    def thinking(self) -> Iterator[str]:
        while self.upcoming is not None and self.upcoming[0] == "think":
            self.think.append(self.upcoming[1])
            yield self.upcoming[1]
            self.upcoming = next(self.pieces, None)

    def answering(self) -> Iterator[str | ToolCall]:
        while self.upcoming is not None:
            kind, piece = self.upcoming
            if kind == "think":
                self.think.append(piece)
            else:
                (self.calls if kind == "call" else self.answer).append(piece)
                yield piece
            self.upcoming = next(self.pieces, None)

    def text_with_calls(self) -> str:
        """The answer with its calls written back as blocks: what model.tools.tool_conversation parses."""
        return "".join(self.answer) + "".join(call.to_text() for call in self.calls)


def bubbles(messages: list[dict]) -> Iterator[tuple[int, list[dict]]]:
    """The chat as bubbles, each with the index of its first message: a question alone, a reply whole (assistant
    turns that call tools, the tool results and the answer after them)."""
    start = 0
    for index in range(1, len(messages) + 1):
        if index == len(messages) or messages[index]["role"] == "user" or messages[start]["role"] == "user":
            yield start, messages[start:index]
            start = index


def recent_exchanges(messages: list[dict], turns: int) -> list[dict]:
    """The last `turns` question/answer exchanges, each question with its whole reply."""
    questions = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if turns <= 0:
        return []
    return messages[questions[-turns]:] if len(questions) >= turns else list(messages)


def delete_exchange(index: int) -> None:
    """Remove the message at index together with its partner (the question before a reply, the reply after a
    question; a reply with tool calls goes whole), so the history stays a clean question/reply alternation."""
    messages = st.session_state.messages
    start = index
    if messages[index]["role"] != "user" and index > 0 and messages[index - 1]["role"] == "user":
        start -= 1
    end = start + 1
    while end < len(messages) and messages[end]["role"] != "user":
        end += 1
    del messages[start:end]


def show_call(name: str, arguments: dict, result: str | None = None, expanded: bool = False) -> DeltaGenerator:
    """A tool call as a collapsible "🔧 name" block with its arguments and result. Returns the result's slot:
    without a result yet (the call is live), it says so until the caller fills it."""
    with st.expander(f"🔧 {name}", expanded=expanded):
        st.code(json.dumps(arguments, ensure_ascii=False), language="json")
        slot = st.empty()
        if result is None:
            slot.caption("⏳ running …")
        else:
            slot.code(result, language=None)
    return slot


def show_bubble(index: int, group: list[dict]) -> None:
    """A question, or a reply: per assistant turn its thoughts, its text and its calls with their results (the
    tool messages after the turn, in order), then the truncation note and the delete button."""
    role = group[0]["role"]
    results = iter([message["content"] for message in group if message["role"] == "tool"])
    with st.chat_message(role, avatar=AVATARS[role]):
        for message in (m for m in group if m["role"] != "tool"):
            if message.get("reasoning"):
                with st.expander("💭 Thinking", expanded=False):
                    st.markdown(message["reasoning"])
            if message["content"] or not message.get("tool_calls"):
                st.markdown(message["content"])
            for call in message.get("tool_calls", []):
                show_call(call["function"]["name"], call["function"]["arguments"], next(results, ""))
        if group[-1].get("truncated"):
            st.caption("✂️ cut at the token limit (max new tokens, or the context is full)")
        st.button("🗑", key=f"delete_{index}", help="Delete this exchange", on_click=delete_exchange, args=(index,))


def stream_reply(chat: Generator[str, None, GenerationResult], reasoning: bool,
                 call_slots: list[DeltaGenerator] | None = None) -> StreamedReply:
    """Stream a reply into the current chat message: a leading think part in an open expander, then the answer.
    With call_slots, each tool call is drawn as soon as it is complete, and its result slot appended there."""
    reply = StreamedReply(chat, reasoning, split_calls=call_slots is not None)
    if reply.starts_with_thinking():
        with st.expander("💭 Thinking", expanded=True):
            st.write_stream(reply.thinking())

    def drawn(piece: str | ToolCall) -> str | Callable[[], None]:  # write_stream calls a callable in place
        if isinstance(piece, str):
            return piece
        return lambda: call_slots.append(show_call(piece.name, piece.arguments, expanded=True))

    st.write_stream(drawn(piece) for piece in reply.answering())
    return reply


def assistant_turn(reply: StreamedReply, content: str) -> dict:
    thought = "".join(reply.think).strip()
    truncated = reply.result is not None and reply.result.finish_reason == "length"
    return {"role": "assistant", "content": content.strip() if thought else content, "reasoning": thought,
            "truncated": truncated}


def reply_with_tools(chat: Callable[[list[dict], list[dict]], Generator[str, None, GenerationResult]],
                     conversation: list[dict], tools: dict[str, Tool], reasoning: bool, max_rounds: int) -> list[dict]:
    """Answer the conversation into the current chat message with tools: each reply streams, each call shows as it
    completes, then the calls run and their results show, and model.tools.tool_conversation feeds them back,
    until a reply without calls or max_rounds replies. `chat(messages, schemas)` streams one reply. Returns the
    new messages: assistant turns (with tool_calls, thoughts, truncation) and tool results."""
    schemas = [tool.schema for tool in tools.values()]
    start = len(conversation)
    replies: list[StreamedReply] = []
    slots: list[DeltaGenerator] = []

    def reply(messages: list[dict]) -> str:
        slots.clear()
        replies.append(stream_reply(chat(messages, schemas), reasoning, slots))
        return replies[-1].text_with_calls()

    for round_ in tool_conversation(reply, conversation, tools, max_rounds):
        for index, slot in enumerate(slots):
            if round_.results:
                slot.code(round_.results[index], language=None)
            else:  # the last reply allowed: tool_conversation does not run its calls
                slot.caption(f"not run: at most {max_rounds} replies per message (--max_tool_rounds)")
    new = conversation[start:]
    turns = [message for message in new if message["role"] == "assistant"]
    for turn, streamed in zip(turns, replies):
        turn.update(assistant_turn(streamed, turn["content"]))  # adds the thoughts and the truncation
    return new


def main() -> None:
    st.set_page_config(page_title="MiniMind", page_icon="🤖")
    args = parse_args()
    st.session_state.setdefault("messages", [])

    with st.sidebar:
        st.title("🤖 MiniMind")
        choices = find_models(args)
        if not choices:
            st.warning(f"No checkpoints in {args.out_dir}/: train one (e.g. train_full_sft.py) or pass --out_dir / --hf_path.")
            st.stop()
        choice = st.selectbox("Model", choices, format_func=lambda c: c.label, key="model")
        history_turns = st.slider("History turns", 0, 10, 1, key="history_turns",
                                  help="previous question/answer pairs sent with the new question")
        max_new_tokens = st.slider("Max new tokens", 16, max(16, min(args.max_seq_len, 8192)), min(512, args.max_seq_len),
                                   step=16, key="max_new_tokens")
        temperature = st.slider("Temperature", 0.0, 1.5, 0.85, step=0.05, key="temperature", help="0: greedy")
        top_p = st.slider("Top-p", 0.05, 1.0, 0.85, step=0.05, key="top_p")
        chat_model = choice.model_mode != PRETRAIN_MODE
        use_tools = st.toggle("Tools", value=False, key="tools", disabled=not chat_model,
                              help="offer the model a calculator, the current time"
                                   + (f" and a lookup in {Path(args.tools_file).name}" if args.tools_file else "")
                                   + "; needs a chat model") and chat_model
        st.button("Clear chat", key="clear", on_click=lambda: st.session_state.messages.clear())

    tools = None
    if use_tools:
        try:
            tools = builtin_tools(require_file(args.tools_file, "pass a JSON object file of facts to --tools_file",
                                               "tools file") if args.tools_file else None)
        except (InputError, OSError) as err:  # shown, not raised: the switch can be turned off again
            st.error(f"Cannot offer the tools: {err}")
            st.stop()
    try:
        model, tokenizer = load_choice(choice, shlex.join(sys.argv[1:]) + os.environ.get("MINIMIND_WEB_ARGS", ""), args)
    except Exception as err:  # shown, not raised: the sidebar stays usable to pick another checkpoint
        st.error(f"Cannot load {choice.label}: {err}")
        st.stop()
    st.sidebar.caption(f"{model.num_parameters() / 1e6:.2f}M parameters on {next(model.parameters()).device}")

    for index, group in bubbles(st.session_state.messages):
        show_bubble(index, group)

    prompt = st.chat_input("Message MiniMind")
    if not prompt:
        return
    messages = st.session_state.messages
    conversation = [{key: m[key] for key in ("role", "content", "tool_calls") if key in m}
                    for m in recent_exchanges(messages, history_turns)] + [{"role": "user", "content": prompt}]
    with st.chat_message("user", avatar=AVATARS["user"]):
        st.markdown(prompt)

    def chat(turns: list[dict], schemas: list[dict] | None = None) -> Generator[str, None, GenerationResult]:
        return stream_chat(model, tokenizer, turns, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, max_context=model.config.max_seq_len, continuation=not chat_model,
                           tools=schemas)

    reasoning = choice.model_mode == REASON_MODE
    with st.chat_message("assistant", avatar=AVATARS["assistant"]):
        try:
            if tools:
                reply = reply_with_tools(chat, conversation, tools, reasoning, args.max_tool_rounds)
            else:
                streamed = stream_reply(chat(conversation), reasoning)
                reply = [assistant_turn(streamed, "".join(streamed.answer))]
        except ValueError as err:  # the prompt cannot fit the context, e.g. the tool list alone is too long
            st.error(f"Cannot answer: {err}")
            st.stop()
    messages += [{"role": "user", "content": prompt}, *reply]
    st.rerun()  # draw the new exchange like the rest of the history, with its delete buttons


if __name__ == "__main__":
    main()
