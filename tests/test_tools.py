"""Tool calling: the chat template against hand-written strings, the parser against what the template writes, the
streaming splitter, the safe built-in tools, the SFT loss mask of tool conversations and the tool loop."""
import json

import pytest

from conftest import write_jsonl
from model.dataset import SFTDataset, render_conversation
from model.inference import build_prompt
from model.tools import (
    CALCULATOR, JsonLookup, ToolCall, ToolCallStream, builtin_tools, calculate, parse_tool_calls, run_tool,
    tool_conversation,
)

CALC = CALCULATOR.schema
CALC_JSON = ('{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic '
             'expression exactly", "parameters": {"type": "object", "properties": {"expression": {"type": "string", '
             '"description": "e.g. 1234*5678 or (3+4)/2"}}, "required": ["expression"]}}}')
TOOLS_HEADER = ('# Tools\nTo call one, write <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Available:\n'
                + CALC_JSON)


def call(name: str, arguments, as_string: bool = False) -> dict:
    return {"id": "call_1", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments}}


def render(tokenizer, messages, tools=None, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------------------------------
# The template


def test_tags_are_single_tokens_that_survive_decoding(tokenizer):
    for token_id, tag in enumerate(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"], start=7):
        assert tokenizer.encode(tag, add_special_tokens=False) == [token_id]
        assert tokenizer.decode([token_id], skip_special_tokens=True) == tag
    assert tokenizer.encode("<think></answer>", add_special_tokens=False) == [3, 6]


def test_tools_are_listed_in_the_system_turn(tokenizer):
    with_system = render(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                         tools=[CALC], add_generation_prompt=True)
    assert with_system == (f"<|im_start|>system\nBe brief.\n\n{TOOLS_HEADER}<|im_end|>\n"
                           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    without_system = render(tokenizer, [{"role": "user", "content": "hi"}], tools=[CALC])
    assert without_system == f"<|im_start|>system\n{TOOLS_HEADER}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert render(tokenizer, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_calls_and_results(tokenizer):
    messages = [
        {"role": "user", "content": "12*7 and 3+4?"},
        {"role": "assistant", "content": None, "tool_calls": [call("calculator", {"expression": "12*7"}),
                                                              call("calculator", {"expression": "3+4"}, as_string=True)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
        {"role": "tool", "tool_call_id": "call_2", "content": "7"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("lookup", {"query": "Kalo"})]},
        {"role": "tool", "content": '{"Kalo": "a river"}'},
        {"role": "assistant", "content": "84 and 7."},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\n12*7 and 3+4?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>\n'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3+4"}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>84</tool_response>\n<tool_response>7</tool_response><|im_end|>\n"
        '<|im_start|>assistant\nLet me check.\n<tool_call>{"name": "lookup", "arguments": {"query": "Kalo"}}'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>{"Kalo": "a river"}</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n84 and 7.<|im_end|>\n")


def test_unknown_role_is_a_template_error(tokenizer):
    with pytest.raises(Exception, match="unknown role \"function\""):
        render(tokenizer, [{"role": "function", "content": "x"}])


# ---------------------------------------------------------------------------------------------------------------
# The parser


def test_parser_round_trips_what_the_template_renders(tokenizer):
    calls = [call("calculator", {"expression": "(1+2)*3"}), call("lookup", {"query": "卡洛河", "limit": 2})]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    prompt = render(tokenizer, messages[:1], add_generation_prompt=True)
    full = render(tokenizer, messages)
    reply = full[len(prompt):].removesuffix("<|im_end|>\n")
    content, parsed = parse_tool_calls(reply)
    assert content == "Checking."
    assert [(c.name, c.arguments) for c in parsed] == [("calculator", {"expression": "(1+2)*3"}),
                                                       ("lookup", {"query": "卡洛河", "limit": 2})]
    assert "".join(c.to_text() for c in parsed) == reply.removeprefix("Checking.\n").replace("\n", "")
    assert json.loads(parsed[1].to_openai()["function"]["arguments"]) == {"query": "卡洛河", "limit": 2}


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>',  # unbalanced JSON
    "<tool_call>calculator(1+1)</tool_call>",
    '<tool_call>{"arguments": {"expression": "1+1"}}</tool_call>',  # no name
    '<tool_call>{"name": "calculator", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>["calculator"]</tool_call>',
    '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}',  # never closed
    '<tool_call>' + "[" * 5000 + '</tool_call>',  # too deep for json
])
def test_malformed_calls_are_plain_content(text):
    assert parse_tool_calls(text) == (text.strip(), [])


def test_a_good_call_beside_a_malformed_one():
    good = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2*3\\"}"}</tool_call>'
    content, calls = parse_tool_calls(f"A <tool_call>oops</tool_call> B {good} C")
    assert content == "A <tool_call>oops</tool_call> B  C"
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "2*3"})]


def test_stream_splitter_agrees_with_the_parser_for_any_chunking():
    reply = ('Sure. <tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
             ' <tool_call>bad</tool_call> <tool_c and <tool_call>{"name": "x", "arguments": {}}</tool_call>'
             ' tail <tool_call>{"name": "open"')
    for size in (1, 2, 3, 7, 1000):
        stream, items = ToolCallStream(), []
        for start in range(0, len(reply), size):
            items += stream.feed(reply[start:start + size])
        items += stream.close()
        text = "".join(i for i in items if isinstance(i, str))
        calls = [i for i in items if isinstance(i, ToolCall)]
        content, parsed = parse_tool_calls(reply)
        assert text.strip() == content
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parsed] == [
            ("calculator", {"expression": "12*7"}), ("x", {})]


# ---------------------------------------------------------------------------------------------------------------
# Built-in tools


@pytest.mark.parametrize("expression, value", [
    ("1234*5678", "7006652"), ("(3+4)/2", "3.5"), ("2**10", "1024"), ("-7 // 2", "-4"), ("17 % 5", "2"),
    ("12 × 3 ÷ 4", "9"), ("98765432123 + 1", "98765432124"), ("0.1 + 0.2", "0.3"),
])
def test_calculator_is_exact(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "open('x')", "a + 1", "(1).__class__", "[1, 2]", "9**9**9", "10**40",
    "1 if 1 else 2", "'a' * 3",
])
def test_calculator_refuses_anything_but_arithmetic(expression):
    result = json.loads(run_tool(ToolCall("calculator", {"expression": expression}), builtin_tools()))
    assert "error" in result


def test_run_tool_reports_errors_as_text(tmp_path):
    tools = builtin_tools()
    assert "ZeroDivisionError" in run_tool(ToolCall("calculator", {"expression": "1/0"}), tools)
    assert "unknown tool 'weather'" in run_tool(ToolCall("weather", {}), tools)
    assert "TypeError" in run_tool(ToolCall("calculator", {"expr": "1"}), tools)
    assert "T" in run_tool(ToolCall("current_time", {"timezone_offset_hours": 8}), tools)


def test_json_lookup(tmp_path):
    table = tmp_path / "world.json"
    table.write_text(json.dumps({"Kalo": "a river town", "Kalo Bridge": "stone", "Mira": "a painter"}))
    lookup = JsonLookup(table)
    assert json.loads(lookup("kalo")) == {"Kalo": "a river town"}  # exact key, any case
    assert json.loads(lookup("bridge")) == {"Kalo Bridge": "stone"}
    assert "error" in json.loads(lookup("Zed"))
    assert builtin_tools(table)["lookup"].run(query="Mira") == '{"Mira": "a painter"}'


# ---------------------------------------------------------------------------------------------------------------
# Training data: the loss covers replies and calls, never tool results


def masked_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


TOOL_CHAT = [
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "12*7"})]},
    {"role": "tool", "content": "84"},
    {"role": "assistant", "content": "12*7 = 84."},
]


def test_loss_covers_calls_and_answers_not_results(tokenizer):
    ids, mask = render_conversation(tokenizer, TOOL_CHAT, tools=[CALC])
    assert masked_text(tokenizer, ids, mask) == (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call><|im_end|>'
        "12*7 = 84.<|im_end|>")
    assert tokenizer.decode(ids) == render(tokenizer, TOOL_CHAT, tools=[CALC])


def test_sft_dataset_reads_the_openai_and_the_minimind_shapes(tokenizer, tmp_path):
    openai_shape = {"tools": [CALC], "conversations": TOOL_CHAT}
    minimind_shape = {"conversations": [
        {"role": "system", "content": "", "functions": json.dumps([CALC])},
        TOOL_CHAT[0],
        {"role": "assistant", "content": "",
         "tool_calls": json.dumps([{"type": "function", "function": {"name": "calculator",
                                                                      "arguments": '{"expression": "12*7"}'}}])},
        *TOOL_CHAT[2:]]}
    path = write_jsonl([json.dumps(openai_shape), json.dumps(minimind_shape)], tmp_path / "tools.jsonl")
    dataset = SFTDataset(path, tokenizer, max_length=512)
    (ids_a, mask_a), (ids_b, mask_b) = dataset.document(0), dataset.document(1)
    assert masked_text(tokenizer, ids_a, mask_a) == masked_text(tokenizer, ids_b, mask_b)
    assert "<tool_call>" in masked_text(tokenizer, ids_a, mask_a) and "84</tool_response>" not in masked_text(
        tokenizer, ids_a, mask_a)
    assert "# Tools" in tokenizer.decode(ids_b) and "Available:" in tokenizer.decode(ids_a)


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], r"conversations\[1\].content"),
    ([{"role": "user", "content": "q", "tool_calls": []}, {"role": "assistant", "content": "a"}],
     r"conversations\[0\].tool_calls': only an assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     r"conversations\[1\].tool_calls': tool_calls\[0\] must be"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                         "tool_calls": [call("f", "{bad", as_string=False)]}],
     r"arguments is not valid JSON"),
])
def test_bad_tool_data_names_the_field(tokenizer, tmp_path, conversation, message):
    path = write_jsonl([json.dumps({"conversations": conversation})], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=message):
        SFTDataset(path, tokenizer)[0]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the loop


def test_a_long_history_keeps_the_tools(tokenizer):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "what is 2+2?"}]
    ids = build_prompt(tokenizer, messages, max_prompt_tokens=300, tools=[CALC])
    text = tokenizer.decode(ids)
    assert len(ids) <= 300 and text.startswith(f"<|im_start|>system\n{TOOLS_HEADER}<|im_end|>\n")
    assert text.endswith("what is 2+2?<|im_end|>\n<|im_start|>assistant\n") and "word" not in text


def test_tool_loop_runs_calls_until_an_answer(tmp_path):
    replies = iter(['<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>',
                    "123*456 = 56088."])
    seen = []

    def reply(messages):
        seen.append([m["role"] for m in messages])
        return next(replies)

    messages = [{"role": "user", "content": "123*456?"}]
    rounds = list(tool_conversation(reply, messages, builtin_tools()))
    assert [(r.content, [c.name for c in r.calls], r.results) for r in rounds] == [
        ("", ["calculator"], ["56088"]), ("123*456 = 56088.", [], [])]
    assert seen == [["user"], ["user", "assistant", "tool"]]
    assert messages[-1] == {"role": "assistant", "content": "123*456 = 56088."}


def test_tool_loop_stops_after_max_rounds():
    looping = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    messages = [{"role": "user", "content": "?"}]
    rounds = list(tool_conversation(lambda m: looping, messages, builtin_tools(), max_rounds=3))
    assert [len(r.calls) for r in rounds] == [1, 1, 0] and len(messages) == 1 + 2 * 2 + 1
