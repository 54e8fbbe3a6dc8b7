"""The streamlit web demo driven headless by `streamlit.testing.v1.AppTest`, and served by a real `streamlit run`.

Replies are compared with plain greedy `MiniMindLM.generate` on the chat-templated conversation (temperature
slider at 0), so history and sliders are checked by what the model was actually given. For reasoning and tool
calls the model is made to emit scripted replies, and its prompts are compared with the chat template's rendering.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import streamlit as st
from streamlit.testing.v1 import AppTest

import model.loading
from model.inference import GenerationResult, ReplyRouter
from model.hf_minimind import save_hf_folder
from model.tools import ToolCall, builtin_tools
from scripts.web_demo import StreamedReply
from conftest import TINY_FLAGS
from test_eval_model import scripted_replies
from test_serve_openai_api import THOUGHT, greedy_reference, load_tiny, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEB_DEMO = ROOT / "scripts" / "web_demo.py"
TINY_WEB_FLAGS = " ".join([*TINY_FLAGS, "--device", "cpu", "--max_seq_len", "512"])
TOOL_WEB_FLAGS = TINY_WEB_FLAGS + " --max_seq_len 2048"  # room for the tool list (~350 tokens) in the prompt
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>'
CALCULATOR_TURN = {"role": "assistant", "content": "Let me compute.", "tool_calls": [
    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "123*456"}}}],
    "reasoning": "", "truncated": False}


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


@pytest.fixture
def scripted_app(out_dir, monkeypatch):
    """start(replies, flags) -> (app, prompts): the page with a model whose generation i emits replies[i] (the last
    one from then on), loaded by the demo's own loader; prompts are the token ids the model was given."""
    real_load_model = model.loading.load_model
    scripts = []

    def start(replies: list[str], flags: str = TOOL_WEB_FLAGS) -> tuple[AppTest, list[list[int]]]:
        prompts_of_each_load: list[list[list[int]]] = []

        def load_scripted(args):
            tiny_model, tokenizer = real_load_model(args)
            scripts.append(scripted_replies(tiny_model, tokenizer, replies))
            prompts_of_each_load.append(scripts[-1].__enter__())
            return tiny_model, tokenizer

        monkeypatch.setattr(model.loading, "load_model", load_scripted)
        monkeypatch.setenv("MINIMIND_WEB_ARGS", f"--out_dir {out_dir} {flags}")
        st.cache_resource.clear()
        at = AppTest.from_file(str(WEB_DEMO), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        assert len(prompts_of_each_load) == 1  # the first checkpoint, cached from now on
        return at, prompts_of_each_load[0]

    yield start
    for script in scripts:
        script.__exit__(None, None, None)
    st.cache_resource.clear()


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
    assert app.toggle(key="tools").label == "Tools" and app.toggle(key="tools").value is False
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


def test_reasoning_checkpoint_shows_its_thoughts_in_an_expander(scripted_app):
    at, _ = scripted_app([THOUGHT], TINY_WEB_FLAGS)  # the reply forced to a reasoning transcript
    at.selectbox(key="model").select_index(1).run()
    send(at, "why?")
    reply = at.chat_message[1]
    assert reply.expander[0].label == "💭 Thinking"
    assert reply.expander[0].markdown[0].value == "let me think"
    assert [m.value for m in reply.markdown][-1] == "Hi there"
    assert at.session_state["messages"][1] == {
        "role": "assistant", "content": "Hi there", "reasoning": "let me think", "truncated": False}


def test_streamed_reply_yields_pieces_as_they_come():
    """The generators st.write_stream consumes deliver the reply delta by delta, think part first."""
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


def test_streamed_reply_splits_out_calls_once_complete():
    """With split_calls a call comes out whole, in its place in the answer, however the deltas cut its tags; a
    call in the think part is thought, not made."""
    reply_text = f"<think>maybe {CALL}</think>Let me compute.{CALL} ok"
    for size in (1, 3, len(reply_text)):
        deltas = iter([reply_text[i : i + size] for i in range(0, len(reply_text), size)])
        reply = StreamedReply(deltas, reasoning=False, split_calls=True)
        assert "".join(reply.thinking()) == f"maybe {CALL}"
        pieces = list(reply.answering())
        assert "".join(p for p in pieces if isinstance(p, str)) == "Let me compute. ok"
        calls = [(i, p) for i, p in enumerate(pieces) if isinstance(p, ToolCall)]
        assert [(c.name, c.arguments) for _, c in calls] == [("calculator", {"expression": "123*456"})]
        assert "".join(p for p in pieces[: calls[0][0]]) == "Let me compute."
        assert reply.text_with_calls() == "Let me compute. ok" + reply.calls[0].to_text()


# ----------------------------------------------------------------------------------------------------------------
# Tools: the sidebar switch, calls shown with their results, the tool conversation kept in the history


def template_prompt(tokenizer, messages: list[dict], tools: dict | None) -> str:
    """What the model must be given for `messages`: the chat template's rendering (of the keys it reads)."""
    kept = [{k: m[k] for k in ("role", "content", "tool_calls") if k in m} for m in messages]
    return tokenizer.apply_chat_template(kept, tools=[t.schema for t in tools.values()] if tools else None,
                                         tokenize=False, add_generation_prompt=True)


def test_tool_call_is_shown_with_its_result_and_fed_back(scripted_app, tokenizer):
    at, prompts = scripted_app([f"Let me compute.{CALL}", "The product is **56088**."])
    at.toggle(key="tools").set_value(True).run()
    send(at, "What is 123*456?")
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    reply = at.chat_message[1]
    assert [e.label for e in reply.expander] == ["🔧 calculator"]
    assert [c.value for c in reply.expander[0].code] == ['{"expression": "123*456"}', "56088"]
    assert [m.value for m in reply.markdown] == ["Let me compute.", "The product is **56088**."]
    messages = at.session_state["messages"]
    assert messages == [
        {"role": "user", "content": "What is 123*456?"},
        CALCULATOR_TURN,
        {"role": "tool", "content": "56088"},
        {"role": "assistant", "content": "The product is **56088**.", "reasoning": "", "truncated": False},
    ]
    given = [tokenizer.decode(p) for p in prompts]
    assert given == [template_prompt(tokenizer, messages[:n], builtin_tools()) for n in (1, 3)]
    assert "<tool_response>56088</tool_response>" in given[1]


def test_next_message_sees_the_tool_conversation_and_delete_takes_it_whole(scripted_app, tokenizer):
    at, prompts = scripted_app([f"Let me compute.{CALL}", "56088.", "Twice that is 112176."])
    at.toggle(key="tools").set_value(True).run()
    send(at, "What is 123*456?")
    send(at, "And twice that?")
    messages = list(at.session_state["messages"])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    # the history slider's 1 turn is the whole first exchange, its call and result included
    assert tokenizer.decode(prompts[2]) == template_prompt(tokenizer, messages[:5], builtin_tools())
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2
    at.button(key="delete_1").click().run()  # the reply with the call: goes whole, with its question
    assert at.session_state["messages"] == messages[4:]
    assert [m.name for m in at.chat_message] == ["user", "assistant"] and len(at.expander) == 0


def test_with_tools_off_the_same_output_is_text(scripted_app, tokenizer):
    at, prompts = scripted_app([f"Let me compute.{CALL}", "never asked"])
    send(at, "What is 123*456?")
    reply = at.chat_message[1]
    assert len(reply.expander) == 0 and reply.markdown[0].value == f"Let me compute.{CALL}"
    assert at.session_state["messages"][1] == {"role": "assistant", "content": f"Let me compute.{CALL}",
                                                "reasoning": "", "truncated": False}
    question = at.session_state["messages"][:1]
    assert [tokenizer.decode(p) for p in prompts] == [template_prompt(tokenizer, question, None)]
    assert "calculator" not in tokenizer.decode(prompts[0])  # no tool list in the prompt


def test_calls_stop_after_max_tool_rounds(scripted_app):
    at, prompts = scripted_app([CALL], flags=TOOL_WEB_FLAGS + " --max_tool_rounds 2")
    at.toggle(key="tools").set_value(True).run()
    send(at, "What is 123*456?")
    assert len(prompts) == 2  # the second reply's call is not run, and the model is not asked again
    assert [m["role"] for m in at.session_state["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert [e.label for e in at.chat_message[1].expander] == ["🔧 calculator"]


def test_tools_file_adds_the_lookup_tool(scripted_app, tokenizer, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"Kalo": "a river town"}), encoding="utf-8")
    lookup = '<tool_call>{"name": "lookup", "arguments": {"query": "kalo"}}</tool_call>'
    at, prompts = scripted_app([lookup, "A river town."], flags=f"{TOOL_WEB_FLAGS} --tools_file {facts}")
    assert "lookup in facts.json" in at.toggle(key="tools").help
    at.toggle(key="tools").set_value(True).run()
    send(at, "What is Kalo?")
    reply = at.chat_message[1]
    assert [e.label for e in reply.expander] == ["🔧 lookup"]
    assert reply.expander[0].code[1].value == '{"Kalo": "a river town"}'
    question = [{"role": "user", "content": "What is Kalo?"}]
    assert tokenizer.decode(prompts[0]) == template_prompt(tokenizer, question, builtin_tools(facts))


def test_tool_errors_are_shown_not_raised(scripted_app, tmp_path):
    at, _ = scripted_app([CALL], flags=f"{TOOL_WEB_FLAGS} --tools_file {tmp_path / 'missing.json'}")
    at.toggle(key="tools").set_value(True).run()
    assert not at.exception and "tools file" in at.error[0].value and "missing.json not found" in at.error[0].value
    at.toggle(key="tools").set_value(False).run()
    assert len(at.error) == 0 and len(at.chat_input) == 1

    at, prompts = scripted_app([CALL], flags=TINY_WEB_FLAGS)  # 512 tokens of context, 512 of them for the reply
    at.toggle(key="tools").set_value(True).run()
    send(at, "What is 123*456?")
    assert "Cannot answer" in at.error[0].value and "does not fit" in at.error[0].value
    assert prompts == [] and at.session_state["messages"] == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_flags(port: int) -> list[str]:
    """`streamlit run` flags for a headless server on localhost that asks nothing of the network."""
    return ["--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]


@contextmanager
def served(command: list[str], port: int, log: Path) -> Iterator[str]:
    """Run a command that serves streamlit on 127.0.0.1:port (its output to `log`); yields the URL once
    /_stcore/health answers, and stops the server after."""
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_WEB_ARGS"}
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text(errors="replace")[-5000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "streamlit did not start within 90 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


@pytest.mark.slow
def test_headless_streamlit_run_answers_health(out_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(WEB_DEMO), *server_flags(port),
               "--", "--out_dir", str(out_dir), *TINY_WEB_FLAGS.split()]
    with served(command, port, tmp_path / "streamlit.log") as url:
        health = httpx.get(f"{url}/_stcore/health", timeout=5)
        assert health.status_code == 200 and health.text == "ok"
        assert "<title>" in httpx.get(f"{url}/", timeout=5).text
