"""The streamlit web demo driven headless by `streamlit.testing.v1.AppTest`, and served by a real `streamlit run`.

Replies are compared with plain greedy `MiniMindLM.generate` on the chat-templated conversation (temperature
slider at 0), so history and sliders are checked by what the model was actually given.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import streamlit as st
from streamlit.testing.v1 import AppTest

import model.loading
from model.inference import ReplyRouter
from model.hf_minimind import save_hf_folder
from scripts.web_demo import StreamedReply
from conftest import TINY_FLAGS
from test_serve_openai_api import THOUGHT, greedy_reference, load_tiny, scripted_output, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEB_DEMO = ROOT / "scripts" / "web_demo.py"
TINY_WEB_FLAGS = " ".join([*TINY_FLAGS, "--device", "cpu", "--max_seq_len", "512"])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    write_tiny_checkpoint(out / "full_sft_64.pth")
    write_tiny_checkpoint(out / "reason_64.pth", seed=1)
    (out / "rlhf_96.pth").write_bytes(b"an interrupted download")  # cannot load
    (out / "not_a_model.txt").write_text("ignored")
    tiny_model, tokenizer = load_tiny(out)
    save_hf_folder(torch.load(out / "full_sft_64.pth"), tiny_model.config, str(out / "tiny-hf"), tokenizer)
    return out


@pytest.fixture
def app(out_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("MINIMIND_WEB_ARGS", f"--out_dir {out_dir} {TINY_WEB_FLAGS}")
    st.cache_resource.clear()  # a model cached by another test may carry a different hook
    at = AppTest.from_file(str(WEB_DEMO), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def send(at: AppTest, text: str) -> None:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception


def greedy_settings(at: AppTest, max_new_tokens: int = 16, history_turns: int = 1) -> None:
    at.slider(key="temperature").set_value(0.0)
    at.slider(key="max_new_tokens").set_value(max_new_tokens)
    at.slider(key="history_turns").set_value(history_turns)


def test_sidebar_lists_the_checkpoints_and_has_the_sliders(app):
    assert app.selectbox(key="model").options == [
        "full_sft_64.pth (full_sft, dim 64)",
        "reason_64.pth (reason, dim 64)",
        "rlhf_96.pth (rlhf, dim 96)",
        "tiny-hf/ (Hugging Face, full_sft)",
    ]
    assert [s.key for s in app.sidebar.slider] == ["history_turns", "max_new_tokens", "temperature", "top_p"]
    assert app.slider(key="max_new_tokens").max == 512  # bounded by --max_seq_len
    assert "parameters on cpu" in app.sidebar.caption[0].value
    assert len(app.chat_message) == 0


def test_a_message_gets_the_greedy_reply(app, out_dir):
    model, tokenizer = load_tiny(out_dir)
    question = [{"role": "user", "content": "hello there"}]
    text, _, _, hit_eos = greedy_reference(model, tokenizer, question, 16)
    assert not hit_eos and "<" not in text  # premises: cut by the token limit, no reasoning tags

    greedy_settings(app)
    send(app, "hello there")
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.chat_message[0].markdown[0].value == "hello there"
    assert app.chat_message[1].markdown[0].value == text
    assert "cut at the token limit" in app.chat_message[1].caption[0].value
    assert app.session_state["messages"][1]["content"] == text


def test_hugging_face_folder_gives_the_same_reply_as_its_native_weights(app):
    greedy_settings(app)
    send(app, "hello there")
    native = app.session_state["messages"][1]["content"]
    app.button(key="clear").click().run()
    app.selectbox(key="model").select_index(3).run()
    send(app, "hello there")
    assert app.session_state["messages"][1]["content"] == native


def test_a_checkpoint_that_does_not_load_shows_an_error(app):
    app.selectbox(key="model").select_index(2).run()
    assert not app.exception
    assert "rlhf_96.pth" in app.error[0].value and "not a readable PyTorch checkpoint" in app.error[0].value
    assert len(app.chat_input) == 0  # the page stops before the chat


@pytest.mark.parametrize("history_turns", [0, 1])
def test_history_slider_decides_what_the_model_sees(app, out_dir, history_turns):
    model, tokenizer = load_tiny(out_dir)
    greedy_settings(app, max_new_tokens=16, history_turns=history_turns)
    send(app, "hello there")
    send(app, "and then?")
    first = app.session_state["messages"][1]["content"]
    second = [{"role": "user", "content": "and then?"}]
    if history_turns:
        second = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first}] + second
    expected, _, _, _ = greedy_reference(model, tokenizer, second, 16)
    router = ReplyRouter(reasoning=False)  # as the page shows a reply: tags routed, ends trimmed
    shown = "".join(text for part, text in router.feed(expected) + router.close() if part == "answer").strip()
    assert [m.name for m in app.chat_message] == ["user", "assistant"] * 2
    assert app.chat_message[3].markdown[0].value.strip() == shown


def test_max_new_tokens_slider_bounds_the_reply(app, out_dir):
    model, tokenizer = load_tiny(out_dir)
    greedy_settings(app, max_new_tokens=32)
    send(app, "hello there")
    expected, _, completion_tokens, _ = greedy_reference(model, tokenizer, [{"role": "user", "content": "hello there"}], 32)
    assert completion_tokens == 32 and app.session_state["messages"][1]["content"] == expected


def test_delete_and_clear_buttons(app):
    greedy_settings(app, max_new_tokens=16)
    send(app, "first question")
    send(app, "second question")
    app.button(key="delete_1").click().run()  # the first reply: goes with its question
    assert [m["content"] for m in app.session_state["messages"]][0] == "second question"
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    app.button(key="delete_0").click().run()  # a question: goes with its reply
    assert app.session_state["messages"] == [] and len(app.chat_message) == 0
    send(app, "third question")
    assert len(app.chat_message) == 2
    app.button(key="clear").click().run()
    assert app.session_state["messages"] == [] and len(app.chat_message) == 0


def test_reasoning_checkpoint_shows_its_thoughts_in_an_expander(out_dir, monkeypatch):
    real_load_model = model.loading.load_model
    hooks = []

    def load_scripted(args):  # the demo's own loader, with the reply forced to a reasoning transcript
        tiny_model, tokenizer = real_load_model(args)
        hooks.append(scripted_output(tiny_model, tokenizer.encode(THOUGHT, add_special_tokens=False)))
        hooks[-1].__enter__()
        return tiny_model, tokenizer

    monkeypatch.setattr(model.loading, "load_model", load_scripted)
    monkeypatch.setenv("MINIMIND_WEB_ARGS", f"--out_dir {out_dir} {TINY_WEB_FLAGS}")
    st.cache_resource.clear()
    at = AppTest.from_file(str(WEB_DEMO), default_timeout=60)
    at.run()
    at.selectbox(key="model").select_index(1).run()
    send(at, "why?")
    for hook in hooks:
        hook.__exit__(None, None, None)
    st.cache_resource.clear()
    reply = at.chat_message[1]
    assert reply.expander[0].label == "💭 Thinking"
    assert reply.expander[0].markdown[0].value == "let me think"
    assert [m.value for m in reply.markdown][-1] == "Hi there"
    assert at.session_state["messages"][1] == {
        "role": "assistant", "content": "Hi there", "reasoning": "let me think", "truncated": False}


def test_streamed_reply_yields_pieces_as_they_come():
    """The generators st.write_stream consumes deliver the reply delta by delta, think part first."""
    from model.inference import GenerationResult

    def chat():
        for delta in ["<think>", "a", "b", "</think>", "<answer>", "c", "d", "</answer>"]:
            yield delta
        return GenerationResult(text="", finish_reason="stop", prompt_tokens=3, completion_tokens=9)

    reply = StreamedReply(chat(), reasoning=False)
    assert reply.starts_with_thinking()
    assert list(reply.thinking()) == ["a", "b"]
    assert list(reply.answering()) == ["c", "d"]
    assert reply.result.finish_reason == "stop"
    plain = StreamedReply(iter(["x", "y"]), reasoning=False)
    assert not plain.starts_with_thinking() and list(plain.answering()) == ["x", "y"]


@pytest.mark.slow
def test_headless_streamlit_run_answers_health(out_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "streamlit", "run", str(WEB_DEMO), "--server.headless", "true",
               "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
               "--", "--out_dir", str(out_dir), *TINY_WEB_FLAGS.split()]
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_WEB_ARGS"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "streamlit did not start within 90 s"
                time.sleep(0.2)
        assert health.status_code == 200 and health.text == "ok"
        assert "<title>" in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
