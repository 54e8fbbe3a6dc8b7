"""Chat with a trained MiniMind checkpoint in the terminal; replies stream token by token.

Run:
    python eval_model.py                                   # out/full_sft_512.pth, asks: test prompts or free input
    python eval_model.py --model_mode 0 --auto             # pretrained model continues the built-in openings
    python eval_model.py --model_mode 3 --prompt "9.11和9.9哪个大？"   # answer once and exit (reasoning model)
    python eval_model.py --history_cnt 4 --temperature 0.7 # multi-turn: keep the last 4 messages as context
    python eval_model.py --lora_name lora_medical          # base weights + out/lora/lora_medical_512.pth
    python eval_model.py --load 1 --hf_path MiniMind2-Small # a Hugging Face folder (scripts/convert_model.py)
    python eval_model.py --tools --tools_file facts.json    # the model may call a calculator, the time, a lookup

Model modes: 0 pretrain (raw text continuation), 1 full_sft, 2 rlhf (DPO), 3 reason (think part shown apart).
Interactive commands: `/clear` forgets the history, `exit` (or Ctrl-D) quits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from model import MiniMindLM
from model.common import PRETRAIN_MODE, REASON_MODE, exit_on_input_error, require_file
from model.inference import (
    GenerationResult,
    ReplyRouter,
    split_reasoning,
    stream_chat,
)
from model.loading import add_model_args, load_model, model_source
from model.tools import Tool, ToolCallStream, builtin_tools, tool_conversation
TEST_PROMPTS = {  # a few Chinese and English prompts per kind of model
    "pretrain": [
        "马克思主义基本原理",
        "人类大脑的主要功能是",
        "万有引力原理是",
        "世界上最高的山峰是",
        "The largest animal on Earth is",
    ],
    "chat": [
        "你有什么特长？",
        "为什么天空是蓝色的？",
        "请用Python写一个计算斐波那契数列的函数",
        "比较一下猫和狗作为宠物的优缺点",
        "Introduce yourself in English.",
        "What is the difference between weather and climate?",
    ],
    "reason": [
        "9.11和9.9哪个大？",
        "一个班有30名学生，男生比女生多4人，男生有多少人？",
        "鸡兔同笼，共有35个头，94只脚，鸡和兔各有多少只？",
        "A train travels 120 km in 1.5 hours. What is its average speed?",
    ],
}


def test_prompts_for(model_mode: int) -> list[str]:
    if model_mode == PRETRAIN_MODE:
        return TEST_PROMPTS["pretrain"]
    return TEST_PROMPTS["reason" if model_mode == REASON_MODE else "chat"]


class ReplyPrinter:
    """Writes a reply as it streams. A reasoning model's reply is rendered from the ReplyRouter's pieces: the think
    part in a labelled (and, on a terminal, dimmed) [think] block before the [answer]; other replies are written
    exactly as they come."""

    def __init__(self, out: TextIO, reasoning: bool):
        self.out = out
        self.router = ReplyRouter(reasoning=True) if reasoning else None
        self.dim, self.reset = ("\033[2m", "\033[0m") if out.isatty() else ("", "")
        self.section: str | None = None  # "think" or "answer" while a reasoning reply streams
        self.at_line_start = False  # the reply starts after the "🤖: " label

    def write(self, delta: str) -> None:
        for kind, text in self.router.feed(delta) if self.router else [("answer", delta)]:
            self._write_piece(kind, text)
        self.out.flush()

    def close(self) -> None:
        """End the reply: finish a pending think block and the line."""
        for kind, text in self.router.close() if self.router else []:
            self._write_piece(kind, text)
        if self.section == "think":
            self.out.write(self.reset)
        if not self.at_line_start:
            self.out.write("\n")
        self.out.flush()

    def _write_piece(self, kind: str, text: str) -> None:
        if self.router is not None and self.router.has_think and kind != self.section:
            if kind == "think":
                self.out.write(f"{self.dim}[think]\n")
            elif self.section == "think":
                self.out.write(self.reset + ("" if self.at_line_start else "\n") + "[answer]\n")
            self.section = kind
        if text:
            self.out.write(text)
            self.at_line_start = text.endswith("\n")


def stream_reply(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, messages: list[dict], args: argparse.Namespace,
                 out: TextIO, tools: dict[str, Tool] | None = None) -> GenerationResult:
    """Stream one reply to `messages` to `out` (tool-call blocks are not printed: the caller shows the calls)."""
    printer = ReplyPrinter(out, reasoning=args.model_mode == REASON_MODE)
    splitter = ToolCallStream() if tools else None
    start = time.perf_counter()
    stream = stream_chat(model, tokenizer, messages, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         repetition_penalty=args.repetition_penalty, seed=args.seed,
                         continuation=args.model_mode == PRETRAIN_MODE,
                         tools=[tool.schema for tool in tools.values()] if tools else None)
    while True:
        try:
            delta = next(stream)
        except StopIteration as done:
            result: GenerationResult = done.value
            break
        for piece in splitter.feed(delta) if splitter else [delta]:
            if isinstance(piece, str):
                printer.write(piece)
    for piece in splitter.close() if splitter else []:
        printer.write(piece)
    printer.close()
    if args.show_speed:
        seconds = time.perf_counter() - start
        out.write(f"[{result.completion_tokens} tokens in {seconds:.1f}s, "
                  f"{result.completion_tokens / max(seconds, 1e-9):.1f} tokens/s, finish: {result.finish_reason}]\n")
    return result


def answer(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, prompt: str, history: list[dict],
           args: argparse.Namespace, out: TextIO, tools: dict[str, Tool] | None = None) -> GenerationResult:
    """Stream the reply to `prompt` (with the kept history) to `out` and return the result. With `tools`, each
    call the model makes is run and shown (🔧 name(arguments) → result) and its result fed back, until the model
    answers without calling (at most --max_tool_rounds replies)."""
    if args.model_mode == PRETRAIN_MODE:
        out.write(f"🤖: {prompt}")
        result = stream_reply(model, tokenizer, [{"role": "user", "content": prompt}], args, out)
        out.write("\n")
        return result
    kept = history[-args.history_cnt :] if args.history_cnt > 0 else []
    messages = kept + [{"role": "user", "content": prompt}]
    out.write("🤖: ")
    results: list[GenerationResult] = []

    def reply(conversation: list[dict]) -> str:
        results.append(stream_reply(model, tokenizer, conversation, args, out, tools))
        return results[-1].text

    if tools:
        for round_ in tool_conversation(reply, messages, tools, max_rounds=args.max_tool_rounds):
            for call, output in zip(round_.calls, round_.results):
                out.write(f"🔧 {call.name}({json.dumps(call.arguments, ensure_ascii=False)}) → {output}\n")
            if round_.calls:
                out.write("🤖: ")
    else:
        # A reasoning model's think part is not fed back: the history keeps the answers only.
        text = reply(messages)
        messages.append({"role": "assistant", "content": split_reasoning(text)[1] if args.model_mode == REASON_MODE else text})
    history += messages[len(kept):]
    out.write("\n")
    return results[-1]


def free_input(stdin: TextIO, out: TextIO) -> Iterator[str]:
    """Prompts typed by the user, until `exit` or end of input; `/clear` is passed through."""
    while True:
        out.write("👶: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a MiniMind checkpoint")
    add_model_args(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    gen.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling threshold (1 = off)")
    gen.add_argument("--top_k", type=int, default=0, help="sample among the k best tokens (0 = off)")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    gen.add_argument("--max_new_tokens", type=int, default=1024, help="reply length limit in tokens")
    gen.add_argument("--history_cnt", type=int, default=0,
                     help="past messages kept as context (0 = every prompt is a new conversation)")
    gen.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    run = parser.add_argument_group("what to run")
    run.add_argument("--prompt", default=None, help="answer this prompt once and exit")
    run.add_argument("--auto", action="store_true", help="run the built-in test prompts without asking")
    run.add_argument("--show_speed", action="store_true", help="print tokens/s after each reply")
    tools = parser.add_argument_group("tools")
    tools.add_argument("--tools", action="store_true",
                       help="offer the built-in tools (a calculator, the current time, and a lookup with --tools_file); "
                            "calls are run and their results fed back until the model answers")
    tools.add_argument("--tools_file", default=None, help="a JSON object file the lookup tool searches by key")
    tools.add_argument("--max_tool_rounds", type=int, default=4, help="replies per prompt at most, with --tools")
    args = parser.parse_args(argv)
    if args.history_cnt < 0 or args.max_new_tokens < 1 or args.max_tool_rounds < 1:
        parser.error("--history_cnt must be >= 0, --max_new_tokens and --max_tool_rounds >= 1")
    if (args.tools or args.tools_file) and args.model_mode == PRETRAIN_MODE:
        parser.error("--tools needs a chat model: a pretrained one (--model_mode 0) only continues text")
    return args


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Run the chat; argv, stdin and out default to the command line and the terminal (tests pass their own)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    args = parse_args(argv)
    tools = builtin_tools(require_file(args.tools_file, "pass a JSON object file of facts to --tools_file", "tools file")
                          if args.tools_file else None) if args.tools or args.tools_file else None
    model, tokenizer = load_model(args)
    device = next(model.parameters()).device
    source = model_source(args)
    out.write(f"MiniMind ({source}): {model.num_parameters() / 1e6:.2f}M parameters on {device}\n\n")

    history: list[dict] = []
    echo = True  # built-in prompts are printed as if typed; typed and --prompt ones are already visible
    if args.prompt is not None:
        prompts, echo = [args.prompt], False
    elif args.auto:
        prompts = test_prompts_for(args.model_mode)
    else:
        out.write("[0] built-in test prompts  [1] type your own\n> ")
        out.flush()
        if stdin.readline().strip() == "0":
            prompts = test_prompts_for(args.model_mode)
        else:
            prompts, echo = free_input(stdin, out), False
    for prompt in prompts:
        if prompt == "/clear":
            history.clear()
            out.write("(history cleared)\n\n")
            continue
        if echo:
            out.write(f"👶: {prompt}\n")
        answer(model, tokenizer, prompt, history, args, out, tools)


if __name__ == "__main__":
    try:
        exit_on_input_error(main)
    except KeyboardInterrupt:
        print()
