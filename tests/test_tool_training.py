"""A tiny model learns to call tools from generated data alone. Trained from scratch (tokenizer and model) with
train_full_sft.py on chats that add two-digit numbers with a calculator and look up who lives in a room, plus chats
that need no call, then measured as the demo measures its tools stage (scripts/demo.py, tool_scores) on held-out
prompts: sums and rooms it never saw.

Each tool is asked for in one phrasing and every number has a fixed number of digits, so the arguments stand at
fixed distances from the call. Even so, copying them is learned late and abruptly (the loss leaves a plateau between
steps 500 and 700), and reliably only with ~3,000 steps and a decaying learning rate: with 1,500 steps at a constant
one, 1% and 71% of the calls were right in two runs; with this schedule, 100% with --seed 0 and with --seed 1 (sums
right 100% with the calculator, 3% and 8% without; 6.5 minutes on a 2-core AMD EPYC). About half the steps (7 epochs
at batch 16 or 8, or 8 at twice the learning rate) left 81% of the calls right, or all calls right but only 14-30%
of the sums; two questions in each chat (half the steps) left 39% right, three (a third) 100% in the one run tried:
too erratic to save time on. Naming the resident from a lookup's result is learned later still: 39 of 40 unseen
rooms with --seed 0, 3 with --seed 1, so it is printed, not asserted. The tokenizer keeps each space with the word
after it (--isolate_spaces 0), which makes the chats ~20% shorter. Copying from varied phrasings, as in the demo's
data, needs an induction circuit, which formed after 700-1,400 steps in some of our runs and not at all in others."""
import json
import random
import sys

import pytest
from transformers import AutoTokenizer

from conftest import run, write_jsonl
from model.LMConfig import LMConfig
from model.loading import load_into_model
from model.model import MiniMindLM
from model.tools import JsonLookup, Tool, ToolCall, calculate, run_tool
from scripts import demo, make_demo_data, train_tokenizer

SHAPE = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
EPOCHS = 14  # ~3,050 steps of batch 16, the learning rate decaying to a tenth by the end
# Schemas without descriptions: the tool list is the longest part of every chat, and a short one trains faster
SCHEMAS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {parameter: {"type": "string"}}, "required": [parameter]}}}
    for name, parameter in (("calculator", "expression"), ("lookup", "query"))]
N_NAMES, N_ROOMS, HELD_OUT_ROOMS, HELD_OUT_SUMS = 200, 1000, 40, 100


def sum_chat(a: int, b: int, tools: dict[str, Tool]) -> list[dict]:
    call = ToolCall("calculator", {"expression": f"{a} + {b}"})
    result = run_tool(call, tools)
    return make_demo_data.called_chat(f"What is {a} + {b}?", call, result, f"{a} + {b} = {result}.")


def lookup_chat(room: str, tools: dict[str, Tool]) -> list[dict]:
    call = ToolCall("lookup", {"query": room})
    result = run_tool(call, tools)
    return make_demo_data.called_chat(f"Who lives in room {room}?", call, result,
                                      f"{json.loads(result)[room]} lives in room {room}.")


def greeting_chat(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Say hello to {name}."}, {"role": "assistant", "content": f"Hello, {name}!"}]


def direct_sum_chat(a: int, b: int) -> list[dict]:
    """A sum asked with no tools offered: the model must answer on its own."""
    return [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]


def tool_data(tmp_path) -> tuple[list[dict], list[dict], dict[str, Tool]]:
    """(training records, held-out records in eval_tools.jsonl's shape, the tools). Operands 50-99, so every sum
    has three digits; rooms have four digits, and their residents made-up names (single tokens)."""
    rng = random.Random(0)
    names = make_demo_data.make_names(rng, N_NAMES, set())
    rooms = [str(room) for room in rng.sample(range(1000, 10000), N_ROOMS)]
    residents = {room: rng.choice(names) for room in rooms}
    facts_file = tmp_path / "facts.json"
    facts_file.write_text(json.dumps(residents), encoding="utf-8")
    tools = {"calculator": Tool(SCHEMAS[0], calculate), "lookup": Tool(SCHEMAS[1], JsonLookup(facts_file))}
    pairs = [(a, b) for a in range(50, 100) for b in range(50, 100)]
    rng.shuffle(pairs)
    held_out_pairs, train_pairs = pairs[:HELD_OUT_SUMS], pairs[HELD_OUT_SUMS:]
    held_out_rooms, train_rooms = rooms[:HELD_OUT_ROOMS], rooms[HELD_OUT_ROOMS:]

    def listed(chat: list[dict], **extra) -> dict:
        return {"tools": SCHEMAS, "conversations": chat, **extra}

    train = [listed(sum_chat(*rng.choice(train_pairs), tools)) for _ in range(1500)]
    train += [listed(lookup_chat(rng.choice(train_rooms), tools)) for _ in range(1500)]
    train += [listed(greeting_chat(name)) for name in names]
    train += [{"conversations": direct_sum_chat(*rng.choice(train_pairs))} for _ in range(300)]
    rng.shuffle(train)
    held_out = [listed(sum_chat(a, b, tools), kind="sum", answer=str(a + b)) for a, b in held_out_pairs]
    held_out += [listed(lookup_chat(room, tools), kind="lookup", answer=residents[room], candidates=names)
                 for room in held_out_rooms]
    held_out += [listed(greeting_chat(name), kind="direct", answer=None) for name in names[:20]]
    return train, held_out, tools


@pytest.mark.slow
def test_a_tiny_model_trained_on_generated_tool_chats_makes_the_right_calls(tmp_path):
    train, held_out, tools = tool_data(tmp_path)
    data_file = write_jsonl([json.dumps(record) for record in train], tmp_path / "tool_sft.jsonl")
    text_file = write_jsonl([json.dumps({"text": make_demo_data.chat_as_text(r["conversations"], r.get("tools"))})
                             for r in train], tmp_path / "tool_text.jsonl")
    tokenizer_dir, out = tmp_path / "tokenizer", tmp_path / "out"
    train_tokenizer.main(["--data_path", str(text_file), "--vocab_size", "1024", "--isolate_spaces", "0",
                          "--split_digits", "1", "--out_dir", str(tokenizer_dir)])
    run([sys.executable, "train_full_sft.py", *(f"--{k}={v}" for k, v in SHAPE.items()), "--from_weight", "none",
         "--out_dir", str(out), "--tokenizer_path", str(tokenizer_dir), "--data_path", str(data_file),
         "--max_seq_len", "256", "--batch_size", "16", "--learning_rate", "2e-3", "--warmup_iters", "50",
         "--epochs", str(EPOCHS), "--device", "cpu", "--dtype", "float32", "--num_workers", "0",
         "--seed", "0", "--save_interval", "1000000", "--log_interval", "100"], timeout=1800)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = MiniMindLM(LMConfig(**SHAPE, vocab_size=len(tokenizer), max_seq_len=384))
    load_into_model(model, out / f"full_sft_{SHAPE['dim']}.pth", "train_full_sft.py wrote it above")
    scores, rounds = demo.tool_scores(model.eval(), tokenizer, held_out, tools)
    print(json.dumps(scores, indent=1), demo.tool_transcript(rounds[0]), demo.tool_transcript(rounds[-1]))
    assert scores["call_prompts"] == HELD_OUT_SUMS + HELD_OUT_ROOMS
    assert scores["right_call"] >= 0.8, scores
    assert scores["with_tools"]["sum"] > scores["without_tools"]["sum"] + 0.5, scores
