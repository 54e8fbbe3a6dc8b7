"""Terminal chat with an OpenAI-compatible server (scripts/serve_openai_api.py, or any other) via the `openai` package.

Run:
    python scripts/serve_openai_api.py --model_mode 1 &                 # in another terminal
    python scripts/chat_openai_api.py                                  # interactive; `exit` or Ctrl-D quits
    python scripts/chat_openai_api.py --history_cnt 2 --stream 0 --temperature 0.7
    python scripts/chat_openai_api.py --prompt "你好" --max_tokens 64    # answer once and exit

The reasoning part of a reply (`reasoning_content`, sent by reasoning models) is printed dimmed and apart from
the answer, and is not sent back as history: only the answers are.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from openai import OpenAI

DIM, RESET = "\033[2m", "\033[0m"


def reasoning_of(obj) -> str:
    """`reasoning_content` of a message or stream delta: not in the openai package's types, so an extra field."""
    return (obj.model_extra or {}).get("reasoning_content") or ""


def ask(client: OpenAI, messages: list[dict[str, str]], args: argparse.Namespace, out: TextIO | None = None) -> tuple[str, str]:
    """Send the conversation, print the reply to `out` (default stdout) as it arrives, return (reasoning, answer)."""
    out = out or sys.stdout
    request = dict(model=args.model, messages=messages, temperature=args.temperature, max_tokens=args.max_tokens)
    if not args.stream:
        message = client.chat.completions.create(**request).choices[0].message
        reasoning, answer = reasoning_of(message), message.content or ""
        if reasoning:
            out.write(f"{DIM}[thinking]\n{reasoning}\n[/thinking]{RESET}\n")
        out.write(answer + "\n")
        return reasoning, answer

    reasoning, answer = [], []
    for chunk in client.chat.completions.create(**request, stream=True):
        if not chunk.choices:  # the usage chunk, if the server sends one
            continue
        delta = chunk.choices[0].delta
        if think := reasoning_of(delta):
            if not reasoning:
                out.write(f"{DIM}[thinking]\n")
            reasoning.append(think)
            out.write(think)
        if delta.content:
            if reasoning and not answer:
                out.write(f"\n[/thinking]{RESET}\n")
            answer.append(delta.content)
            out.write(delta.content)
        out.flush()
    if reasoning and not answer:
        out.write(f"\n[/thinking]{RESET}")
    out.write("\n")
    return "".join(reasoning), "".join(answer)


def conversation(history: list[dict[str, str]], prompt: str, args: argparse.Namespace) -> list[dict[str, str]]:
    """The messages to send: the system prompt, the last history_cnt exchanges, the new user message."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    recent = history[len(history) - 2 * args.history_cnt :] if args.history_cnt > 0 else []
    return system + recent + [{"role": "user", "content": prompt}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chat with an OpenAI-compatible server from the terminal")
    parser.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    parser.add_argument("--api_key", default="none", help="the server's --api_key, if it has one")
    parser.add_argument("--model", default="minimind", help="model id sent with each request")
    parser.add_argument("--stream", type=int, default=1, choices=(0, 1), help="1: print tokens as they arrive")
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--max_tokens", type=int, default=512)
    parser.add_argument("--history_cnt", type=int, default=0, help="previous exchanges sent with each question")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--prompt", default=None, help="ask this once, print the answer and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a reply")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
    if args.prompt is not None:
        ask(client, conversation([], args.prompt, args), args)
        return
    history: list[dict[str, str]] = []
    while True:
        try:
            prompt = input("👶: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt in ("exit", "quit"):
            return
        if not prompt:
            continue
        print("🤖️: ", end="", flush=True)
        _, answer = ask(client, conversation(history, prompt, args), args)
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


if __name__ == "__main__":
    main()
