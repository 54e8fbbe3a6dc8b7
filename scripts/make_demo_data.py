"""Generate the bundled demo's training data: a small bilingual corpus built from templates, so a fresh clone can
train and chat without downloading anything.

    python scripts/make_demo_data.py --out_dir dataset

writes `demo_pretrain.jsonl` ({"text"}) and `demo_sft.jsonl` ({"conversations": [...]}) in MiniMind's formats.
The content is simple on purpose (arithmetic, counting, colours, a self-introduction) so a model of a few million
parameters visibly learns it in minutes on a CPU. Real training uses the MiniMind datasets (see README).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ZH_DIGITS = "零一二三四五六七八九"
COLOURS = [("sky", "blue", "天空", "蓝色"), ("grass", "green", "草", "绿色"), ("snow", "white", "雪", "白色"),
           ("sun", "yellow", "太阳", "黄色"), ("coal", "black", "煤", "黑色"), ("blood", "red", "血", "红色")]
INTRO_EN = "I am MiniMind, a small language model trained from scratch. I can chat and do simple arithmetic."
INTRO_ZH = "我是 MiniMind，一个从零训练的小型语言模型。我可以聊天，也会做简单的算术。"
GREETINGS = [("hi", "Hello! " + INTRO_EN), ("hello", "Hi there! " + INTRO_EN), ("你好", "你好！" + INTRO_ZH),
             ("您好", "您好！" + INTRO_ZH), ("Who are you?", INTRO_EN), ("你是谁？", INTRO_ZH),
             ("Introduce yourself.", INTRO_EN), ("请介绍一下你自己。", INTRO_ZH)]


def zh_number(n: int) -> str:
    """Chinese numerals for 0..99."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "" if tens == 1 else ZH_DIGITS[tens]
    return head + "十" + (ZH_DIGITS[ones] if ones else "")


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(English question, Chinese question, answer sentence in both) for a small sum or difference."""
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a}加{b}等于多少？", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a}减{b}等于多少？", f"{a} - {b} = {a - b}."


def pretrain_texts(rng: random.Random, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            texts.append(f"{a} plus {b} equals {a + b}. {a} + {b} = {a + b}. {zh_number(a)}加{zh_number(b)}等于{zh_number(a + b)}。")
        elif kind == 1:
            start = rng.randint(1, 80)
            seq = list(range(start, start + rng.randint(4, 10)))
            texts.append("Counting: " + ", ".join(map(str, seq)) + ". 数数：" + "，".join(zh_number(x) for x in seq) + "。")
        elif kind == 2:
            thing, colour, zh_thing, zh_colour = rng.choice(COLOURS)
            texts.append(f"The {thing} is {colour}. {zh_thing}是{zh_colour}的。")
        else:
            texts.append(rng.choice([INTRO_EN, INTRO_ZH]))
    return texts


def sft_conversations(rng: random.Random, n: int) -> list[list[dict]]:
    conversations = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind <= 1:
            en, zh, answer = arithmetic(rng)
            turns = [(en if kind == 0 else zh, answer)]
        elif kind == 2:
            thing, colour, zh_thing, zh_colour = rng.choice(COLOURS)
            turns = [rng.choice([(f"What colour is the {thing}?", f"The {thing} is {colour}."),
                                 (f"{zh_thing}是什么颜色的？", f"{zh_thing}是{zh_colour}的。")])]
        else:
            turns = [rng.choice(GREETINGS)]
            if rng.random() < 0.5:  # a second turn teaches the model to use the conversation so far
                en, zh, answer = arithmetic(rng)
                turns.append((rng.choice([en, zh]), answer))
        conversations.append([m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])
    return conversations


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="dataset", help="where to write demo_pretrain.jsonl and demo_sft.jsonl")
    parser.add_argument("--n_pretrain", type=int, default=20000, help="number of pretraining texts")
    parser.add_argument("--n_sft", type=int, default=8000, help="number of SFT conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(out / "demo_pretrain.jsonl", [{"text": t} for t in pretrain_texts(rng, args.n_pretrain)])
    write_jsonl(out / "demo_sft.jsonl", [{"conversations": c} for c in sft_conversations(rng, args.n_sft)])
    print(f"wrote {out / 'demo_pretrain.jsonl'} ({args.n_pretrain} texts) and {out / 'demo_sft.jsonl'} ({args.n_sft} conversations)")


if __name__ == "__main__":
    main()
