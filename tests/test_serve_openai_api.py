"""The OpenAI-compatible server, checked with the official `openai` client against independent references.

Replies are compared with `MiniMindLM.generate` on the chat-templated prompt (greedy), not with the server's own
generation path; token counts with the tokenizer; prompts with tools with transformers' `apply_chat_template`;
streamed tool calls with what the official client's ChatCompletionStreamState assembles. Scripted logits (a forward hook forcing chosen tokens) give
exact replies where a random model cannot: eos, reasoning tags, failures, slow generation. Concurrency and
/health-during-generation run against a real uvicorn on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState

from conftest import TINY, TINY_FLAGS
from model import LMConfig, MiniMindLM
from model.inference import ReplyRouter, split_reasoning
from model.loading import add_model_args, load_model
from model.tools import parse_tool_calls
from scripts import chat_openai_api
from scripts.serve_openai_api import ReplyParts, ToolPlan, create_app, reasoning_and_content

API_KEY = "sk-test"
MODEL_FLAGS = [*TINY_FLAGS, "--device", "cpu", "--max_seq_len", "512"]
EOS = 2  # <|im_end|>


# ----------------------------------------------------------------------------------------------------------------
# A tiny checkpoint and references (also used by tests/test_web_demo.py)


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random dim-64 MiniMind saved as a native .pth. Weights are drawn wider than the default init (std 0.2):
    with std 0.02 the tied embedding makes greedy decoding repeat the prompt's last token forever."""
    torch.manual_seed(seed)
    model = MiniMindLM(LMConfig(**TINY, vocab_size=6400))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def load_tiny(out_dir: Path, model_mode: int = 1):
    """The checkpoint in out_dir loaded through the same flags and loader the server's __main__ uses."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return load_model(parser.parse_args(["--out_dir", str(out_dir), "--model_mode", str(model_mode), *MODEL_FLAGS]))


def greedy_reference(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[str, int, int, bool]:
    """(reply text, prompt tokens, completion tokens incl. eos, ended with eos) by plain greedy generate()."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    new = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=EOS)[0].tolist()
    hit_eos = EOS in new
    reply_ids = new[: new.index(EOS)] if hit_eos else new
    return tokenizer.decode(reply_ids), len(prompt), len(reply_ids) + hit_eos, hit_eos


@contextmanager
def scripted_output(model, token_ids: list[int], delay: float = 0.0, fail_at: int | None = None):
    """Make every generation emit token_ids, then eos: each forward pass (one per generated token; the first one,
    without a KV cache, reads the prompt) predicts the next scripted token. delay slows every step; fail_at
    raises in that step of each generation."""
    step = 0

    def force(module, args, kwargs, output):
        nonlocal step
        step = 0 if kwargs.get("past_key_values") is None else step + 1
        if delay:
            time.sleep(delay)
        if fail_at is not None and step == fail_at:
            raise RuntimeError("scripted failure")
        forced = torch.full_like(output.logits, -1e4)
        forced[..., token_ids[step] if step < len(token_ids) else EOS] = 1e4
        return dataclasses.replace(output, logits=forced)

    handle = model.register_forward_hook(force, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def captured_prompt(model):
    """Collects the input_ids (1, T) of every first forward call of a generation (the prompt)."""
    prompts: list[list[int]] = []

    def grab(module, args, kwargs):
        if kwargs.get("past_key_values") is None:
            prompts.append(args[0][0].tolist())

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield prompts
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    write_tiny_checkpoint(out_dir / "full_sft_64.pth")
    return load_tiny(out_dir)


@pytest.fixture(scope="module")
def app(tiny):
    model, tokenizer = tiny
    return create_app(model, tokenizer, model_name="minimind-tiny", api_key=API_KEY)


@pytest.fixture(scope="module")
def http(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def client(http):
    return OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=http, max_retries=0)


def tiny_client(model, tokenizer, **app_kwargs) -> OpenAI:
    app = create_app(model, tokenizer, api_key=API_KEY, **app_kwargs)
    return OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=TestClient(app), max_retries=0)


@pytest.fixture(scope="module")
def live_server(tiny):
    """A real uvicorn on a pre-bound loopback socket (no port race), stopped after the module."""
    model, tokenizer = tiny
    app = create_app(model, tokenizer, model_name="minimind-tiny", api_key=API_KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def run_concurrently(ask, count: int, timeout: float = 90) -> None:
    """ask(0), ..., ask(count - 1), each in its own thread, all at once; every one must finish within timeout."""
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads)


def collect_stream(client: OpenAI, **request) -> tuple[list, str, str]:
    """(all chunks, joined content, joined reasoning_content) of a streamed completion."""
    chunks = list(client.chat.completions.create(stream=True, **request))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks if c.choices)
    return chunks, content, reasoning


HELLO = [{"role": "user", "content": "hello there"}]


# ----------------------------------------------------------------------------------------------------------------
# Replies, chunks, usage


def test_non_streamed_reply_equals_greedy_generate(tiny, client):
    model, tokenizer = tiny
    text, prompt_tokens, completion_tokens, hit_eos = greedy_reference(model, tokenizer, HELLO, 12)
    assert not hit_eos and completion_tokens == 12  # the premise of finish_reason "length"

    reply = client.chat.completions.create(model="my-model", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "my-model"  # echoed
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length"
    assert "reasoning_content" not in (choice.message.model_extra or {})
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)
    same = client.chat.completions.create(model="m", messages=HELLO, max_completion_tokens=12, temperature=0)
    assert same.choices[0].message.content == text and same.usage.completion_tokens == 12


def test_streamed_chunks_order_content_and_usage(tiny, client):
    model, tokenizer = tiny
    text, prompt_tokens, _, _ = greedy_reference(model, tokenizer, HELLO, 12)
    chunks, content, _ = collect_stream(client, model="m", messages=HELLO, max_tokens=12, temperature=0,
                                        stream_options={"include_usage": True})
    assert content == text
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert middle and all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (prompt_tokens, 12)

    no_usage, content_again, _ = collect_stream(client, model="m", messages=HELLO, max_tokens=12, temperature=0)
    assert content_again == text and no_usage[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in no_usage)


def test_sse_framing(http):
    """Each event is `data: <json>` ending in a blank line; the stream ends with `data: [DONE]`."""
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    events = response.text[: -len("\n\n")].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[len("data: "):])["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"


def test_stop_string_ends_reply_with_finish_reason_stop(tiny, client):
    model, tokenizer = tiny
    text, _, _, _ = greedy_reference(model, tokenizer, HELLO, 12)
    start = next(i for i in range(3, len(text) - 1) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    expected = text[: text.index(stop)]
    request = dict(model="m", messages=HELLO, max_tokens=64, temperature=0, stop=stop)
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks, content, _ = collect_stream(client, **{**request, "stop": [stop, "never appears"]})
    assert content == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_eos_gives_finish_reason_stop_and_counts_the_eos_token(tiny, client):
    model, tokenizer = tiny
    words = tokenizer.encode("Hi there, friend", add_special_tokens=False)
    with scripted_output(model, words):
        reply = client.chat.completions.create(model="m", messages=HELLO, max_tokens=50, temperature=0.7, seed=1)
        _, content, _ = collect_stream(client, model="m", messages=HELLO, max_tokens=50)
    assert reply.choices[0].message.content == content == "Hi there, friend"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(words) + 1


def test_sampling_with_seed_is_reproducible(client):
    request = dict(model="m", messages=HELLO, max_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    first = client.chat.completions.create(**request).choices[0].message.content
    assert client.chat.completions.create(**request).choices[0].message.content == first
    assert collect_stream(client, **request)[1] == first
    others = {client.chat.completions.create(**{**request, "seed": s}).choices[0].message.content for s in (8, 9, 10)}
    assert others != {first}


# ----------------------------------------------------------------------------------------------------------------
# Reasoning replies


THOUGHT = "<think>\nlet me think\n</think>\n<answer>\nHi there\n</answer>"


@pytest.mark.parametrize("model_mode, reply", [(3, THOUGHT), (1, THOUGHT), (3, "I reason here</think>\nthe answer")])
def test_reasoning_content_is_split_from_the_answer(tiny, model_mode, reply):
    model, tokenizer = tiny
    client = tiny_client(model, tokenizer, model_mode=model_mode)
    think, answer = split_reasoning(reply)
    assert think and answer  # the reference split is not trivial
    with scripted_output(model, tokenizer.encode(reply, add_special_tokens=False)):
        message = client.chat.completions.create(model="m", messages=HELLO, max_tokens=40).choices[0].message
        chunks, content, reasoning = collect_stream(client, model="m", messages=HELLO, max_tokens=40)
    assert (message.model_extra["reasoning_content"], message.content) == (think, answer)
    assert (reasoning, content) == (think, answer)
    kinds = [("reasoning" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "content")
             for c in chunks[1:-1]]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # all reasoning deltas come before the answer


def test_reasoning_and_content_are_independent_of_how_the_text_is_cut():
    """Tags and surrounding whitespace split across deltas give the same (reasoning, content) as one whole delta."""
    for reasoning, reply in [(True, THOUGHT), (False, THOUGHT), (True, " a </think> b "), (False, "plain  text \n")]:
        results = []
        for size in (1, 2, 3, len(reply)):
            router = ReplyRouter(reasoning)
            pieces = [p for i in range(0, len(reply), size) for p in router.feed(reply[i : i + size])] + router.close()
            results.append((*reasoning_and_content(pieces), router.has_think))
        assert len(set(results)) == 1
    assert results[0] == ("", "plain  text \n", False)  # no think part: passed through untouched


# ----------------------------------------------------------------------------------------------------------------
# Tools


def function_tool(name: str, description: str, **properties: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {p: {"type": t} for p, t in properties.items()}, "required": list(properties)}}}


TOOLS = [function_tool("get_weather", "The weather in a city", city="string"),
         function_tool("calculator", "Evaluate an arithmetic expression", expression="string")]
WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALCULATOR_CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>'


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def template_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, reply_prefix: str = "") -> list[int]:
    """The prompt transformers' apply_chat_template renders (generation prompt, then reply_prefix), as token ids."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return encode(tokenizer, text + reply_prefix)


def assembled_stream(client: OpenAI, **request):
    """(choice, chunks) of a streamed completion, the choice as the official client's ChatCompletionStreamState
    accumulates the chunks (its documented way to assemble `delta.tool_calls`; the snapshot, since its final
    parse refuses finish_reason "length")."""
    state = ChatCompletionStreamState()
    chunks = list(client.chat.completions.create(stream=True, **request))
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.current_completion_snapshot.choices[0], chunks


def calls_of(message) -> list[tuple[str, str, dict]]:
    """(type, name, parsed arguments) of each tool call of a client message (ids are random)."""
    return [(c.type, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_tool_calls_non_streamed_and_streamed_through_the_official_client(tiny, client):
    model, tokenizer = tiny
    reply_text = f"Let me check.\n{WEATHER_CALL}\n{CALCULATOR_CALL}"
    request = dict(model="m", messages=HELLO, tools=TOOLS, max_tokens=80)
    with scripted_output(model, encode(tokenizer, reply_text)), captured_prompt(model) as prompts:
        reply = client.chat.completions.create(**request)
        streamed, chunks = assembled_stream(client, **request)
    assert prompts == [template_ids(tokenizer, HELLO, TOOLS)] * 2  # the tool list, as the template renders it

    message = reply.choices[0].message
    expected = [("function", "get_weather", {"city": "Paris"}), ("function", "calculator", {"expression": "1+2"})]
    assert calls_of(message) == calls_of(streamed.message) == expected
    assert all(call.id.startswith("call_") for call in message.tool_calls + streamed.message.tool_calls)
    assert len({call.id for call in message.tool_calls}) == 2
    assert message.content == streamed.message.content == "Let me check."
    assert reply.choices[0].finish_reason == streamed.finish_reason == "tool_calls"

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any("tool_call" in (d.content or "") for d in deltas)  # a call's text never goes out as content
    call_deltas = [call for d in deltas for call in d.tool_calls or []]
    assert [call.index for call in call_deltas] == [0, 1]


def test_a_tool_round_trip_feeds_the_result_back(tiny, client):
    """tools -> tool_calls -> the client's own assistant message and the tool results go back -> the final answer;
    the second prompt is what transformers renders for that conversation."""
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Weather in Paris, and 1+2?"}]
    with scripted_output(model, encode(tokenizer, f"{WEATHER_CALL}\n{CALCULATOR_CALL}")):
        first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=80)
    assistant = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and assistant.content is None
    weather, calculator = assistant.tool_calls
    messages += [assistant.model_dump(),  # as the client returns it: content None, arguments a JSON string
                 {"role": "tool", "tool_call_id": weather.id, "content": "18°C, sunny"},
                 {"role": "tool", "tool_call_id": calculator.id, "content": [{"type": "text", "text": "3"}]}]
    answer = "It is 18°C and sunny; 1+2 is 3."
    with scripted_output(model, encode(tokenizer, answer)), captured_prompt(model) as prompts:
        final = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=80)
    assert final.choices[0].message.content == answer and final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"

    reference = [*messages[:-1], {**messages[-1], "content": "3"}]  # the template takes text content
    assert prompts == [template_ids(tokenizer, reference, TOOLS)]
    assert final.usage.prompt_tokens == len(prompts[0])
    seen = tokenizer.decode(prompts[0])
    assert (f"{WEATHER_CALL}\n{CALCULATOR_CALL}<|im_end|>\n"
            "<|im_start|>user\n<tool_response>18°C, sunny</tool_response>\n<tool_response>3</tool_response>") in seen


def test_tool_choice_none_lists_no_tools_and_reads_no_calls(tiny, client):
    model, tokenizer = tiny
    with scripted_output(model, encode(tokenizer, WEATHER_CALL)), captured_prompt(model) as prompts:
        reply = client.chat.completions.create(model="m", messages=HELLO, tools=TOOLS, tool_choice="none",
                                               max_tokens=40)
    assert prompts == [template_ids(tokenizer, HELLO)] and reply.usage.prompt_tokens == len(prompts[0])
    assert len(template_ids(tokenizer, HELLO, TOOLS)) > reply.usage.prompt_tokens
    assert reply.choices[0].message.content == WEATHER_CALL and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("tool_choice, reply_prefix, generated, expected", [
    ({"type": "function", "function": {"name": "get_weather"}}, '<tool_call>{"name": "get_weather", "arguments": ',
     '{"city": "Paris"}}</tool_call>', ("function", "get_weather", {"city": "Paris"})),
    ("required", "<tool_call>", '{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>',
     ("function", "calculator", {"expression": "1+2"})),
])
def test_required_and_named_tool_choice_make_the_reply_start_with_a_call(tiny, client, tool_choice, reply_prefix,
                                                                        generated, expected):
    model, tokenizer = tiny
    request = dict(model="m", messages=HELLO, tools=TOOLS, tool_choice=tool_choice, max_tokens=40)
    with scripted_output(model, encode(tokenizer, generated)), captured_prompt(model) as prompts:
        reply = client.chat.completions.create(**request)
        streamed, _ = assembled_stream(client, **request)
    assert prompts == [template_ids(tokenizer, HELLO, TOOLS, reply_prefix)] * 2  # the model only writes the rest
    assert calls_of(reply.choices[0].message) == calls_of(streamed.message) == [expected]
    assert reply.choices[0].message.content is None and not streamed.message.content
    assert reply.choices[0].finish_reason == streamed.finish_reason == "tool_calls"
    assert reply.usage.completion_tokens == len(encode(tokenizer, generated)) + 1


def test_a_malformed_call_is_plain_content(tiny, client):
    model, tokenizer = tiny
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    request = dict(model="m", messages=HELLO, tools=TOOLS, max_tokens=40)
    with scripted_output(model, encode(tokenizer, broken)):
        reply = client.chat.completions.create(**request)
        streamed, _ = assembled_stream(client, **request)
    for choice in (reply.choices[0], streamed):
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (broken, None, "stop")


def test_reply_parts_equal_parse_tool_calls_however_the_text_is_cut():
    """The streamed split (content pieces, calls) joins to what parse_tool_calls reads from the whole reply."""
    replies = [f"  Sure.\n{WEATHER_CALL}\n{CALCULATOR_CALL}\n", f"a {WEATHER_CALL} b <tool_call>oops</tool_call> c ",
               "<tool_call>unterminated", "no calls  \n", f"<tool_ca{WEATHER_CALL}<tool_call"]
    for reply in replies:
        content, calls = parse_tool_calls(reply)
        expected = (content, [(c.name, c.arguments) for c in calls])
        for prefix_length in (0, 5):
            plan = ToolPlan(TOOLS, reply[:prefix_length], parse_calls=True)
            for size in (1, 2, 7, len(reply)):
                parts = ReplyParts(False, plan)
                rest = reply[prefix_length:]
                routed = [p for i in range(0, len(rest), size) for p in parts.feed(rest[i : i + size])] + parts.close()
                text = "".join(p[1] for p in routed if isinstance(p, tuple))
                assert (text, [(p.name, p.arguments) for p in routed if not isinstance(p, tuple)]) == expected


def test_concurrent_requests_each_get_their_own_tools(tiny, live_server):
    """Four streamed requests, each naming its own single tool, generated together: each prompt holds its own tool
    list and call opening, and each reply equals the one it gets alone (greedy)."""
    _, tokenizer = tiny
    tools = [function_tool(f"tool_{i}", f"tool number {i}", x="integer") for i in range(4)]
    requests = [dict(model="m", messages=[{"role": "user", "content": f"use tool {i}"}], tools=[tools[i]],
                     tool_choice={"type": "function", "function": {"name": f"tool_{i}"}}, max_tokens=12, temperature=0,
                     stream_options={"include_usage": True}) for i in range(4)]
    client = OpenAI(base_url=f"{live_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    solo = [assembled_stream(client, **request)[0] for request in requests]
    results: dict[int, tuple] = {}

    def ask(i: int) -> None:
        choice, chunks = assembled_stream(client, **requests[i])
        usage = chunks[-1].usage
        results[i] = (choice.message.content, calls_of(choice.message), choice.finish_reason, usage.prompt_tokens)

    run_concurrently(ask, 4)
    for i, choice in enumerate(solo):
        prefix = f'<tool_call>{{"name": "tool_{i}", "arguments": '
        prompt_tokens = len(template_ids(tokenizer, requests[i]["messages"], [tools[i]], prefix))
        assert results[i] == (choice.message.content, calls_of(choice.message), choice.finish_reason, prompt_tokens)
        assert choice.message.content.startswith(prefix)  # a random model writes no valid arguments: plain content


def test_bad_tools_and_tool_messages_are_400_naming_the_field(http, client):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    asked = [{"role": "user", "content": "weather?"}]
    def conversation(assistant: dict | None = None, tool: dict | None = None) -> list[dict]:
        return [*asked, {"role": "assistant", "content": None, "tool_calls": [call], **(assistant or {})},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny", **(tool or {})}]

    weather = TOOLS[0]["function"]
    cases = [
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "retrieval", "function": weather}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {**weather, "name": 3}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {**weather, "parameters": "x"}}]}, "tools.0.function.parameters"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": conversation({"tool_calls": [{"type": "function"}]})}, "messages.1.tool_calls"),
        ({"messages": conversation({"tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}]})},
         "messages.1.tool_calls"),
        ({"messages": conversation({"tool_calls": "get_weather"})}, "messages.1.tool_calls"),
        ({"messages": conversation(tool={"tool_call_id": None})}, "messages.2.tool_call_id"),
        ({"messages": conversation(tool={"content": None})}, "messages.2.content"),
    ]
    for body, param in cases:
        response = http.post("/v1/chat/completions", json={"messages": asked, "max_tokens": 2, **body}, headers=auth)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", body
        assert client.chat.completions.create(model="m", messages=conversation(), tools=TOOLS, max_tokens=2).usage
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="m", messages=HELLO, tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert raised.value.param == "tool_choice" and "get_time" in raised.value.message


def test_tools_need_a_chat_model(tiny):
    model, tokenizer = tiny
    http = TestClient(create_app(model, tokenizer, model_mode=0))
    response = http.post("/v1/chat/completions", json={"messages": HELLO, "tools": TOOLS, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    plain = {"messages": HELLO, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=plain).json()["choices"][0]["finish_reason"] == "length"



# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(http, client):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (b'{"messages": [', auth, 400, None),
        (b"[1, 2]", auth, 400, None),
        (json.dumps({"messages": []}).encode(), auth, 400, "messages"),
        (json.dumps({"messages": user, "max_tokens": -5}).encode(), auth, 400, "max_tokens"),
        (json.dumps({"messages": user, "temperature": 3.5}).encode(), auth, 400, "temperature"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), auth, 400, "messages.0.role"),
        (json.dumps({"messages": user, "stop": [""]}).encode(), auth, 400, "stop"),
        (json.dumps({"messages": user}).encode(), {"Authorization": "Bearer wrong"}, 401, None),
        (json.dumps({"messages": user}).encode(), {}, 401, None),
        (b"{not json", {"Authorization": "Bearer wrong"}, 401, None),  # the key is checked first
    ]
    for body, headers, status, param in cases:
        response = http.post("/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"})
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        assert client.chat.completions.create(model="m", messages=user, max_tokens=2).choices[0].finish_reason
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[], max_tokens=2)
    assert http.get("/nowhere").json()["error"]["code"] == "not_found"
    assert http.get("/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in client.models.list()] == ["minimind-tiny"]


def test_a_system_message_longer_than_the_context_is_a_bad_request(tiny):
    model, tokenizer = tiny
    http = TestClient(create_app(model, tokenizer, max_context=32))
    messages = [{"role": "system", "content": "rules " * 40}, {"role": "user", "content": "hi"}]
    for stream in (False, True):
        response = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "stream": stream})
        assert response.status_code == 400
        assert "system message" in response.json()["error"]["message"] and response.json()["error"]["param"] == "messages"
    nulls = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": None, "top_p": None, "n": None}
    assert http.post("/v1/chat/completions", json=nulls).json()["usage"]["completion_tokens"] == 2


def test_failure_during_streaming_sends_an_error_event(tiny, client):
    model, _ = tiny
    with scripted_output(model, [100, 101, 102, 103], fail_at=2):
        stream = client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, stream=True)
        with pytest.raises(openai.APIError, match="generation failed"):
            list(stream)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=HELLO, max_tokens=10)
    assert client.chat.completions.create(model="m", messages=HELLO, max_tokens=3).usage.completion_tokens == 3


# ----------------------------------------------------------------------------------------------------------------
# Context limit


def test_long_prompt_is_cut_from_the_left_keeping_the_system_message(tiny):
    model, tokenizer = tiny
    client = tiny_client(model, tokenizer, max_context=96)
    system = "You are MiniMind, a small and helpful assistant."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "an old question " * 20},
        {"role": "assistant", "content": "an old answer " * 20},
        {"role": "user", "content": "padding words " * 40 + "the final question"},
    ]
    with captured_prompt(model) as prompts:
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    assert len(prompts) == 1
    prompt = tokenizer.decode(prompts[0])
    assert prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
    assert prompt.endswith("the final question<|im_end|>\n<|im_start|>assistant\n")
    assert "old question" not in prompt and "old answer" not in prompt
    assert reply.usage.prompt_tokens == len(prompts[0]) == 96 - 8  # cut to exactly the room left for the reply


# ----------------------------------------------------------------------------------------------------------------
# A real server: concurrency, /health while busy, the terminal client


def test_eight_concurrent_streams_equal_their_solo_runs(tiny, live_server):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": f"question number {i}: {'why ' * i}?"}] for i in range(8)]
    solo = [greedy_reference(model, tokenizer, p, 16) for p in prompts]
    results: dict[int, tuple] = {}

    def ask(i: int) -> None:
        client = OpenAI(base_url=f"{live_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        chunks, content, _ = collect_stream(client, model="m", messages=prompts[i], max_tokens=16, temperature=0,
                                            stream_options={"include_usage": True})
        results[i] = (content, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)

    run_concurrently(ask, 8)
    assert results == {i: (text, p, c) for i, (text, p, c, _) in enumerate(solo)}


@pytest.mark.slow
def test_health_answers_while_a_long_generation_runs(tiny, live_server):
    model, _ = tiny
    first_delta = threading.Event()
    outcome: dict[str, str] = {}

    def long_stream() -> None:
        client = OpenAI(base_url=f"{live_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="m", messages=HELLO, max_tokens=60, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_delta.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome["finish_reason"] = chunk.choices[0].finish_reason

    with scripted_output(model, [205] * 100, delay=0.05):  # 60 steps of >= 50 ms: a generation of >= 3 s
        thread = threading.Thread(target=long_stream)
        thread.start()
        assert first_delta.wait(timeout=30)
        began = time.monotonic()
        health = httpx.get(f"{live_server}/health", timeout=5)
        elapsed = time.monotonic() - began
        still_generating = thread.is_alive()
        thread.join(timeout=60)
    assert health.status_code == 200 and health.json()["pending_requests"] == 1
    assert elapsed < 1.0 and still_generating
    assert outcome == {"finish_reason": "length"}


def test_terminal_client_prints_the_reply(tiny, live_server, capsys):
    model, tokenizer = tiny
    text, _, _, _ = greedy_reference(model, tokenizer, HELLO, 8)
    flags = ["--base_url", f"{live_server}/v1", "--api_key", API_KEY, "--max_tokens", "8", "--temperature", "0"]
    for stream in ("1", "0"):
        chat_openai_api.main([*flags, "--stream", stream, "--prompt", "hello there"])
        assert capsys.readouterr().out == text + "\n"


def test_terminal_client_shows_reasoning_apart_and_keeps_history(tiny):
    model, tokenizer = tiny
    client = tiny_client(model, tokenizer, model_mode=3)
    for stream in (1, 0):
        args = argparse.Namespace(model="m", temperature=0.0, max_tokens=40, stream=stream)
        out = io.StringIO()
        with scripted_output(model, tokenizer.encode(THOUGHT, add_special_tokens=False)):
            reasoning, answer = chat_openai_api.ask(client, HELLO, args, out)
        assert (reasoning, answer) == ("let me think", "Hi there")
        assert "[thinking]" in out.getvalue() and out.getvalue().rstrip().endswith("Hi there")

    history = []
    for i in range(3):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    with_history = argparse.Namespace(history_cnt=1, system="Be brief.")
    assert chat_openai_api.conversation(history, "new", with_history) == [
        {"role": "system", "content": "Be brief."}, *history[-2:], {"role": "user", "content": "new"}]
    without = argparse.Namespace(history_cnt=0, system=None)
    assert chat_openai_api.conversation(history, "new", without) == [{"role": "user", "content": "new"}]


def test_a_client_that_goes_away_stops_its_generation(tiny, live_server):
    model, tokenizer = tiny
    newline = tokenizer.encode("\n", add_special_tokens=False)
    with scripted_output(model, newline * 300, delay=0.02):  # 300 steps: >= 6 s if nobody stopped it
        body = {"messages": HELLO, "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{live_server}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as response:
            next(line for line in response.iter_lines() if '"content": "\\n"' in line)  # generation is under way
        left = time.monotonic()  # >= 5.9 s of generation remain
        while httpx.get(f"{live_server}/health", timeout=5).json()["pending_requests"]:
            assert time.monotonic() - left < 3.0, "the generation went on after its client disconnected"
            time.sleep(0.05)
