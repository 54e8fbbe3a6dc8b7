"""Tool calling: the format the chat template writes, the parser that reads calls back out of a reply, a few safe
built-in tools, and the loop that runs them.

In a conversation (see the chat template in scripts/train_tokenizer.py):
  * the tools (OpenAI function schemas, `{"type": "function", "function": {"name", "description", "parameters"}}`)
    are listed in the system turn;
  * the assistant calls a tool by writing, after any text, one block per call:
        <tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>
  * each result comes back as a `{"role": "tool", "content": ...}` message, rendered in a user-side turn as
    <tool_response>84</tool_response>, and the assistant goes on until it answers without a call.
The four tags are single tokens of the tokenizer. `parse_tool_calls` never raises: a block that is not a JSON
object with a string "name" and an object of "arguments" stays in the text as plain content.
"""
from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .common import DataFormatError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------
# Calls: text <-> structure


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        """The OpenAI `tool_calls` entry (arguments as a JSON string, as the API gives them)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def to_text(self) -> str:
        """The block the chat template writes for this call."""
        return TOOL_CALL_OPEN + json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


def call_from_json(body: str) -> ToolCall | None:
    """The call a block's body describes, or None if it is not `{"name": str, "arguments": {...}}` (the arguments
    may also be a JSON string holding an object, as OpenAI clients send them)."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"].strip(), arguments)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a reply: every well-formed <tool_call> block becomes a call and leaves the text; a
    malformed or unterminated one stays in the content as it was written. The content is stripped."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    cursor = 0
    for match in TOOL_CALL_BLOCK.finditer(text):
        call = call_from_json(match.group(1))
        if call is None:
            continue
        kept.append(text[cursor:match.start()])
        calls.append(call)
        cursor = match.end()
    kept.append(text[cursor:])
    return "".join(kept).strip(), calls


def openai_tool_calls_to_template(tool_calls: list) -> list[dict]:
    """OpenAI message `tool_calls` as the chat template takes them ({"function": {"name", "arguments"}}, arguments
    an object). Raises ValueError naming the entry that is malformed (for a server's 400)."""
    out = []
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool_calls[{index}] must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"tool_calls[{index}].function.arguments is not valid JSON: {error.msg}") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"tool_calls[{index}].function.arguments must be a JSON object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


class ToolCallStream:
    """Splits a streamed reply into plain text and finished calls: text that may be the start of a <tool_call>
    block is held back until the block closes (then it becomes a call, or, if malformed, text again) or turns
    out to be plain text. `feed` and `close` return a list of str (text) and ToolCall items, in reply order."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, delta: str) -> list[str | ToolCall]:
        self.pending += delta
        out: list[str | ToolCall] = []
        while True:
            start = self.pending.find(TOOL_CALL_OPEN)
            if start < 0:
                hold = _partial_suffix(self.pending, TOOL_CALL_OPEN)
                if len(self.pending) > hold:
                    out.append(self.pending[: len(self.pending) - hold])
                    self.pending = self.pending[len(self.pending) - hold:]
                return out
            if start:
                out.append(self.pending[:start])
                self.pending = self.pending[start:]
            end = self.pending.find(TOOL_CALL_CLOSE)
            if end < 0:
                return out
            block = self.pending[: end + len(TOOL_CALL_CLOSE)]
            self.pending = self.pending[len(block):]
            call = call_from_json(block[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
            out.append(call if call is not None else block)

    def split(self, pieces: list[tuple[str, str]]) -> list[tuple[str, str] | ToolCall]:
        """A reply's routed pieces (ReplyRouter's ("think" | "answer", text)) with the calls taken out of the answer:
        think pieces pass unchanged (a call in a thought is not made), answer text comes back as ("answer", text)
        pieces and ToolCall items, in reply order."""
        out: list[tuple[str, str] | ToolCall] = []
        for kind, text in pieces:
            if kind == "think":
                out.append((kind, text))
                continue
            out += [item if isinstance(item, ToolCall) else ("answer", item) for item in self.feed(text)]
        return out

    def close(self) -> list[str | ToolCall]:
        """What is held at the end of the reply (an unterminated block is text)."""
        rest, self.pending = self.pending, ""
        return [rest] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Built-in tools: safe to run on anything a model writes

MAX_EXPONENT, MAX_MAGNITUDE = 64, 1e30
BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression: numbers, + - * / // % ** and parentheses, nothing else (the syntax
    tree is walked; no eval). Integers stay exact; exponents above 64 and results beyond 1e30 are refused."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be a string of at most 200 characters")
    tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
            return UNARY_OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
            result = BINARY_OPERATORS[type(node.op)](left, right)
            if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
                raise ValueError("the result is out of range")
            return result
        raise ValueError(f"unsupported syntax: {ast.dump(node)[:40]}")

    result = value(tree)
    if isinstance(result, float) and result.is_integer() and not math.isinf(result):
        return str(int(result)) if abs(result) < 1e15 else repr(result)
    return str(round(result, 10)) if isinstance(result, float) else str(result)


def current_time(timezone_offset_hours: float = 0) -> str:
    """The current date and time at a UTC offset in hours, ISO 8601 with the weekday."""
    if not -14 <= float(timezone_offset_hours) <= 14:
        raise ValueError("timezone_offset_hours must be between -14 and 14")
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=float(timezone_offset_hours))))
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')})"


class JsonLookup:
    """Look a key up in a local JSON object file ({"key": value, ...}): the exact key (any case), else every key
    containing the query; the file is read once, when the tool is made."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open(encoding="utf-8") as f:
                table = json.load(f)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{self.path}: invalid JSON at line {error.lineno}: {error.msg}") from None
        if not isinstance(table, dict):
            raise DataFormatError(f"{self.path}: a lookup table must be a JSON object of key -> value")
        self.table = {str(k): v for k, v in table.items()}

    def __call__(self, query: str) -> str:
        query = str(query).strip()
        exact = [k for k in self.table if k.lower() == query.lower()]
        matches = exact or [k for k in self.table if query and query.lower() in k.lower()]
        if not matches:
            return json.dumps({"error": f"no entry for {query!r}"}, ensure_ascii=False)
        return json.dumps({k: self.table[k] for k in matches[:5]}, ensure_ascii=False)


def function_schema(name: str, description: str, parameters: dict[str, tuple[str, str]],
                    required: list[str] | None = None) -> dict:
    """An OpenAI function tool schema; parameters: name -> (JSON type, description)."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {p: {"type": t, "description": d} for p, (t, d) in parameters.items()},
                       "required": list(parameters) if required is None else required}}}


@dataclass
class Tool:
    schema: dict
    run: Callable[..., str]

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


CALCULATOR = Tool(function_schema("calculator", "Evaluate an arithmetic expression exactly",
                                  {"expression": ("string", "e.g. 1234*5678 or (3+4)/2")}), calculate)
CURRENT_TIME = Tool(function_schema("current_time", "The current date and time",
                                    {"timezone_offset_hours": ("number", "UTC offset, e.g. 8 for Beijing")}, []),
                    current_time)


def lookup_tool(path: str | Path) -> Tool:
    return Tool(function_schema("lookup", f"Look up facts in {Path(path).name}",
                                {"query": ("string", "the name to look up")}), JsonLookup(path))


def builtin_tools(lookup_file: str | Path | None = None) -> dict[str, Tool]:
    """The built-in tools by name: calculator, current_time, and lookup when a JSON file is given."""
    tools = [CALCULATOR, CURRENT_TIME] + ([lookup_tool(lookup_file)] if lookup_file else [])
    return {tool.name: tool for tool in tools}


def run_tool(call: ToolCall, tools: dict[str, Tool]) -> str:
    """A call's result as text; an unknown tool, bad arguments or a failing tool give an error text, never raise."""
    tool = tools.get(call.name)
    if tool is None:
        return json.dumps({"error": f"unknown tool {call.name!r}; available: {sorted(tools)}"}, ensure_ascii=False)
    try:
        return str(tool.run(**call.arguments))
    except (TypeError, ValueError, SyntaxError, ZeroDivisionError, OverflowError, ArithmeticError) as error:
        return json.dumps({"error": f"{type(error).__name__}: {error}"}, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# The loop: reply, run the calls, feed the results back, until the model answers


@dataclass
class ToolRound:
    """One reply of the model and what its calls returned."""
    content: str
    calls: list[ToolCall]
    results: list[str]


def tool_conversation(reply: Callable[[list[dict]], str], messages: list[dict], tools: dict[str, Tool],
                      max_rounds: int = 4) -> Iterator[ToolRound]:
    """Run the tool loop: `reply(messages)` is the model's reply text to a conversation (the tools are the
    caller's to list in the prompt). Each reply's calls are run and the assistant turn and the results are
    appended to `messages` (in place), and the round is yielded; the loop ends with a reply without calls, or
    after max_rounds replies (the last one's calls are then not run)."""
    for round_index in range(max_rounds):
        turn = take_turn(messages, reply(messages), tools, run_calls=round_index < max_rounds - 1)
        yield turn
        if not turn.calls:
            return


def take_turn(messages: list[dict], reply: str, tools: dict[str, Tool], run_calls: bool = True) -> ToolRound:
    """One round of the loop: the assistant's reply text is parsed, its calls run (unless run_calls is False, or it
    made none: then it is the final answer), and the assistant turn and the results are appended to `messages`."""
    content, calls = parse_tool_calls(reply)
    if not calls or not run_calls:
        messages.append({"role": "assistant", "content": content})
        return ToolRound(content, [], [])
    results = [run_tool(call, tools) for call in calls]
    messages.append({"role": "assistant", "content": content,
                     "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                    for c in calls]})
    messages.extend({"role": "tool", "content": result} for result in results)
    return ToolRound(content, calls, results)
