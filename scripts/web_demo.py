"""MiniMind web chat (streamlit): pick a checkpoint, chat with streamed replies, see a reasoning model's thoughts.

Run (everything after `--` is eval_model.py's model flags; they set the out dir, the default sizes, the device):
    streamlit run scripts/web_demo.py                                    # checkpoints found in out/
    streamlit run scripts/web_demo.py -- --out_dir out --device cpu
    streamlit run scripts/web_demo.py -- --hf_path MiniMind2              # a Hugging Face folder as well
    streamlit run scripts/web_demo.py --server.address 0.0.0.0 --browser.gatherUsageStats false -- --out_dir out

The sidebar lists the native weights `{out_dir}/{stage}_{dim}[_moe].pth` (and --weight) and Hugging Face folders
(subfolders of out_dir holding a config.json, and --hf_path), of any MiniMind release: the loader reads each one's
architecture from it (model/loading.py). A `reason` checkpoint's think part is shown in a collapsible block.
Nothing is fetched from the network: icons are emoji. The environment variable MINIMIND_WEB_ARGS (a shell-quoted
flag string) replaces the command-line flags, for streamlit's AppTest, which cannot pass any.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `model` when run as `streamlit run scripts/...`

from model.common import MODEL_MODES, PRETRAIN_MODE, REASON_MODE  # noqa: E402
from model.inference import (  # noqa: E402
    GenerationResult,
    ReplyRouter,
    stream_chat,
)
from model.loading import add_model_args, load_model  # noqa: E402
from model.model import MiniMindLM  # noqa: E402

NATIVE_WEIGHT = re.compile(r"^(?P<stage>[a-z][a-z_]*?)_(?P<dim>\d+)(?P<moe>_moe)?\.pth$")
AVATARS = {"user": "🧑", "assistant": "🤖"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MiniMind streamlit chat")
    add_model_args(parser)
    flags = os.environ.get("MINIMIND_WEB_ARGS")
    return parser.parse_args(shlex.split(flags) if flags is not None else sys.argv[1:])


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
    model.inference.ReplyRouter, as in every front end.
    """

    def __init__(self, chat: Generator[str, None, GenerationResult], reasoning: bool):
        self.result: GenerationResult | None = None
        self.think: list[str] = []
        self.answer: list[str] = []
        self.pieces = self._route(chat, reasoning)
        self.upcoming = next(self.pieces, None)

    def _route(self, chat: Generator[str, None, GenerationResult], reasoning: bool) -> Iterator[tuple[str, str]]:
        router = ReplyRouter(reasoning)
        while True:
            try:
                delta = next(chat)
            except StopIteration as finished:
                self.result = finished.value
                break
            yield from router.feed(delta)
        yield from router.close()

    def starts_with_thinking(self) -> bool:
        return self.upcoming is not None and self.upcoming[0] == "think"

    def thinking(self) -> Iterator[str]:
        while self.upcoming is not None and self.upcoming[0] == "think":
            self.think.append(self.upcoming[1])
            yield self.upcoming[1]
            self.upcoming = next(self.pieces, None)

    def answering(self) -> Iterator[str]:
        while self.upcoming is not None:
            kind, text = self.upcoming
            (self.think if kind == "think" else self.answer).append(text)
            if kind == "answer":
                yield text
            self.upcoming = next(self.pieces, None)


def delete_exchange(index: int) -> None:
    """Remove the message at index together with its partner (the question before a reply, the reply after a
    question), so the history stays a clean user/assistant alternation."""
    messages = st.session_state.messages
    role = messages[index]["role"]
    start, end = index, index + 1
    if role == "assistant" and index > 0 and messages[index - 1]["role"] == "user":
        start -= 1
    if role == "user" and end < len(messages) and messages[end]["role"] == "assistant":
        end += 1
    del messages[start:end]


def show_message(index: int, message: dict) -> None:
    with st.chat_message(message["role"], avatar=AVATARS[message["role"]]):
        if message.get("reasoning"):
            with st.expander("💭 Thinking", expanded=False):
                st.markdown(message["reasoning"])
        st.markdown(message["content"])
        if message.get("truncated"):
            st.caption("✂️ cut at the token limit (max new tokens, or the context is full)")
        st.button("🗑", key=f"delete_{index}", help="Delete this exchange", on_click=delete_exchange, args=(index,))


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
        st.button("Clear chat", key="clear", on_click=lambda: st.session_state.messages.clear())

    try:
        model, tokenizer = load_choice(choice, shlex.join(sys.argv[1:]) + os.environ.get("MINIMIND_WEB_ARGS", ""), args)
    except Exception as err:  # shown, not raised: the sidebar stays usable to pick another checkpoint
        st.error(f"Cannot load {choice.label}: {err}")
        st.stop()
    st.sidebar.caption(f"{model.num_parameters() / 1e6:.2f}M parameters on {next(model.parameters()).device}")

    for index, message in enumerate(st.session_state.messages):
        show_message(index, message)

    prompt = st.chat_input("Message MiniMind")
    if not prompt:
        return
    messages = st.session_state.messages
    history = messages[len(messages) - 2 * history_turns :] if history_turns > 0 else []
    conversation = [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": prompt}]
    messages.append({"role": "user", "content": prompt})
    with st.chat_message("user", avatar=AVATARS["user"]):
        st.markdown(prompt)

    with st.chat_message("assistant", avatar=AVATARS["assistant"]):
        chat = stream_chat(model, tokenizer, conversation, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, max_context=model.config.max_seq_len,
                           continuation=choice.model_mode == PRETRAIN_MODE)
        reply = StreamedReply(chat, reasoning=choice.model_mode == REASON_MODE)
        if reply.starts_with_thinking():
            with st.expander("💭 Thinking", expanded=True):
                st.write_stream(reply.thinking())
        st.write_stream(reply.answering())
    thought = "".join(reply.think).strip()
    answer = "".join(reply.answer)
    truncated = reply.result is not None and reply.result.finish_reason == "length"
    messages.append({"role": "assistant", "content": answer.strip() if thought else answer, "reasoning": thought,
                     "truncated": truncated})
    st.rerun()  # draw the new exchange like the rest of the history, with its delete buttons


if __name__ == "__main__":
    main()
