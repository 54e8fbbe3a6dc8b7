"""The demo's mini-world (scripts/make_demo_data.py): valid for every stage's dataset, deterministic, true to its
world.json, and with held-out sets that really are held out."""
import difflib
import json
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR, jsonl_lines
from model.dataset import DPODataset, PretrainDataset, SFTDataset
from model.tools import ToolCall, run_tool
from scripts import make_demo_data

SMALL = ["--n_people", "20", "--n_animals", "8", "--n_cities", "4", "--mentions", "6", "--qa_per_fact", "2",
         "--n_reason", "300", "--n_identity", "10", "--dpo_per_fact", "1", "--n_distill", "50", "--n_tool", "48"]
STEP = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--out_dir", str(out), "--seed", "3", *SMALL])
    return out


def rows(path) -> list[dict]:
    return [json.loads(line) for line in jsonl_lines(path)]


def world(demo) -> dict:
    return json.loads((demo / "world.json").read_text(encoding="utf-8"))


def names_in(text: str, names: set[str]) -> set[str]:
    return {word for word in re.findall(r"[A-Za-z]+", text) if word in names}


def questions(record: dict) -> str:
    """The user turns of a chat or pair: they name only the entity asked about (replies name cities as values)."""
    return " ".join(m["content"] for key in ("conversations", "chosen", "rejected") for m in record.get(key, [])
                    if m["role"] == "user")


def test_deterministic_for_a_seed_and_different_across_seeds(demo, tmp_path):
    make_demo_data.main(["--out_dir", str(tmp_path / "same"), "--seed", "3", *SMALL])
    make_demo_data.main(["--out_dir", str(tmp_path / "other"), "--seed", "4", *SMALL])
    for path in sorted(demo.iterdir()):
        assert (tmp_path / "same" / path.name).read_bytes() == path.read_bytes(), path.name
    assert (tmp_path / "other" / "world.json").read_bytes() != (demo / "world.json").read_bytes()


def test_every_file_loads_with_its_stage_dataset(demo):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for name in ("pretrain", "eval_text", "eval_text_false", "tool_text"):
        dataset = PretrainDataset(demo / f"{name}.jsonl", tokenizer, max_length=128)
        assert len(dataset) > 0 and all(dataset[i][2].sum() > 0 for i in range(len(dataset)))
    for name in ("sft", "lora_identity", "distill", "reason", "eval_qa", "eval_reason", "tool_sft", "eval_tools"):
        # a tool chat lists the tools first: ~400 tokens of the shipped tokenizer
        dataset = SFTDataset(demo / f"{name}.jsonl", tokenizer, max_length=512 if "tool" in name else 128)
        assert len(dataset) > 0 and all(dataset[i][2].sum() > 0 for i in range(len(dataset))), name
    for name in ("dpo", "eval_dpo"):
        dataset = DPODataset(demo / f"{name}.jsonl", tokenizer, max_length=128)
        assert len(dataset) > 0 and all(pair[0][2].sum() > 0 for pair in (dataset[i] for i in range(len(dataset))))


def test_splits_partition_the_entities_and_chats_only_name_their_split(demo):
    entities = world(demo)["entities"]
    by_split = {split: {e["name"] for e in entities if e["split"] == split} for split in ("sft", "dpo", "heldout")}
    assert sum(map(len, by_split.values())) == len(entities) == len({e["name"] for e in entities})
    assert all(by_split.values())
    everyone = set().union(*by_split.values())
    sft_chats = [r for r in rows(demo / "sft.jsonl") if "conversations" in r]
    replayed = [r for r in rows(demo / "sft.jsonl") if "text" in r]
    assert sft_chats and replayed  # the SFT file mixes chats and replayed pretraining text
    assert set().union(*(names_in(questions(r), everyone) for r in sft_chats)) <= by_split["sft"]
    assert set().union(*(names_in(questions(r), everyone) for r in rows(demo / "lora_identity.jsonl"))) <= by_split["sft"]
    assert set().union(*(names_in(questions(r), everyone) for r in rows(demo / "dpo.jsonl"))) == by_split["dpo"]
    assert set().union(*(names_in(questions(r), everyone) for r in rows(demo / "eval_dpo.jsonl"))) == by_split["heldout"]
    # QA chats inside the pretraining text are about the SFT split only; biographies cover everyone
    pretrain = [r["text"] for r in rows(demo / "pretrain.jsonl")]
    asked_in_pretraining = " ".join(re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", " ".join(pretrain)))
    assert asked_in_pretraining and names_in(asked_in_pretraining, everyone) <= by_split["sft"]
    assert names_in(" ".join(pretrain), everyone) == everyone


def test_every_fact_is_stated_mentions_times_and_questions_match_world(demo):
    entities = world(demo)["entities"]
    pretrain = " ".join(r["text"] for r in rows(demo / "pretrain.jsonl"))
    counts = Counter(re.findall(r"[A-Za-z]+", pretrain))
    for entity in entities:  # every biography states every fact of its entity once, naming it each time
        assert counts[entity["name"]] >= 6 * len(entity["facts"]), entity
    facts = {e["name"]: e["facts"] for e in entities}
    qa = rows(demo / "eval_qa.jsonl")
    assert {r["split"] for r in qa} == {"sft", "heldout"}
    assert len(qa) == 2 * sum(len(e["facts"]) for e in entities if e["split"] != "dpo")
    for record in qa:
        assert record["answer"] == facts[record["entity"]][record["attribute"]][record["language"]]
        assert record["answer"] in record["candidates"] and len(set(record["candidates"])) == len(record["candidates"])
        assert mentions(record["conversations"][1]["content"], record["answer"])
        assert record["entity"] in record["conversations"][0]["content"]


def mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", text) is not None


def test_preference_pairs_prefer_the_true_fact(demo):
    facts = {e["name"]: e["facts"] for e in world(demo)["entities"]}
    for pair in rows(demo / "dpo.jsonl") + rows(demo / "eval_dpo.jsonl"):
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen[0] == rejected[0]  # the same question
        name = re.search(r"[A-Z][a-z]+", chosen[0]["content"]).group(0)
        name = name if name in facts else re.findall(r"[A-Z][a-z]+", chosen[0]["content"])[-1]
        language = "zh" if re.search(r"[\u4e00-\u9fff]", chosen[0]["content"]) else "en"
        true_values = [f[language] for f in facts[name].values()]
        assert any(mentions(chosen[1]["content"], v) for v in true_values)
        assert not any(mentions(rejected[1]["content"], v) for v in true_values)


def test_identity_data_and_held_out_questions(demo):
    lora = rows(demo / "lora_identity.jsonl")
    held_out = {r["question"] for r in rows(demo / "eval_identity.jsonl")}
    lora_name, base_name = make_demo_data.LORA_NAME, make_demo_data.BASE_NAME
    asked = {r["conversations"][0]["content"] for r in lora}
    assert held_out and not held_out & asked
    assert any(lora_name in r["conversations"][1]["content"] for r in lora)
    assert lora_name not in (demo / "pretrain.jsonl").read_text(encoding="utf-8")
    assert lora_name not in (demo / "sft.jsonl").read_text(encoding="utf-8")
    assert base_name in (demo / "sft.jsonl").read_text(encoding="utf-8")


def test_reasoning_steps_are_right_and_held_out_problems_unseen(demo):
    def problem(question: str) -> str:
        return re.search(r"\d+(?:[+-]\d+)+", question).group(0)

    train = rows(demo / "reason.jsonl")
    held_out = rows(demo / "eval_reason.jsonl")
    for record in train + held_out:
        reply = record["conversations"][1]["content"]
        think, answer = re.fullmatch(r"<think>\n(.*)\n</think>\n<answer>\n(\d+)\n</answer>", reply, re.S).groups()
        steps = [STEP.fullmatch(line).groups() for line in think.split("\n")]
        assert 2 <= len(steps) <= 3
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and 0 <= int(c) <= 99
        assert steps[0][0] + "".join(op + b for _, op, b, _ in steps) == problem(record["conversations"][0]["content"])
        assert answer == steps[-1][3]
    assert all(record["answer"] == int(record["conversations"][1]["content"].split("<answer>\n")[1].split("\n")[0])
               for record in held_out)
    seen = {problem(r["conversations"][0]["content"]) for r in train}
    pretrain = (demo / "pretrain.jsonl").read_text(encoding="utf-8")
    for record in held_out:
        expression = problem(record["conversations"][0]["content"])
        assert expression not in seen
        assert not re.search(rf"(?<![\d+-]){re.escape(expression)}(?![\d+-])", pretrain)


def test_held_out_text_and_its_false_twin_differ_only_in_facts(demo):
    true_lines = [r["text"] for r in rows(demo / "eval_text.jsonl")]
    false_lines = [r["text"] for r in rows(demo / "eval_text_false.jsonl")]
    assert len(true_lines) == len(false_lines) > 0
    assert not set(true_lines) & {r["text"] for r in rows(demo / "pretrain.jsonl")}
    entities = world(demo)["entities"]
    values = {v.replace(" ", "") for e in entities for fact in e["facts"].values() for v in fact.values()}
    values |= {v.replace(" ", "") for attribute in (make_demo_data.COLOURS, make_demo_data.JOBS, make_demo_data.SPECIES,
                                                    make_demo_data.FOODS, make_demo_data.TERRAINS,
                                                    make_demo_data.FAMOUS_FOR, make_demo_data.AGES)
               for pair in attribute for v in pair}
    values |= {e["name"] for e in entities if e["kind"] == "city"}

    def tokens(text: str) -> list[str]:
        return re.findall(r"[A-Za-z]+|\d+|[\u4e00-\u9fff]|\S", text)

    def sentences(line: str) -> list[str]:
        return [part for part in re.split(r"(?<=[。.])\s*", line) if part]

    for true, false in zip(true_lines, false_lines):
        assert len(sentences(true)) == len(sentences(false))
        for true_sentence, false_sentence in zip(sentences(true), sentences(false)):
            # the same sentence with one value swapped: what differs is (part of) a value, never a name or template
            true_tokens, false_tokens = tokens(true_sentence), tokens(false_sentence)
            changed = [op for op in difflib.SequenceMatcher(None, true_tokens, false_tokens, autojunk=False).get_opcodes()
                       if op[0] != "equal"]
            assert changed, true_sentence
            for _, i1, i2, j1, j2 in changed:
                for segment in ("".join(true_tokens[i1:i2]), "".join(false_tokens[j1:j2])):
                    assert not segment or any(segment in value for value in values), (segment, true_sentence)


# ----------------------------------------------------------------------------------------------------------------
# Tool use


def tool_chats(demo) -> list[dict]:
    """The tool set's training chats: the lines of tool_sft.jsonl that do not replay an SFT line."""
    sft = set(jsonl_lines(demo / "sft.jsonl"))
    return [json.loads(line) for line in jsonl_lines(demo / "tool_sft.jsonl") if line not in sft]


def called(record: dict) -> ToolCall | None:
    calls = record["conversations"][1].get("tool_calls")
    assert calls is None or len(calls) == 1
    return ToolCall(calls[0]["function"]["name"], calls[0]["function"]["arguments"]) if calls else None


ARITHMETIC = re.compile(r"(\d+) (?:([+×-])|plus|minus|times|加|减|乘以) (\d+)")


def asked_problem(question: str) -> tuple[int, str, int]:
    match = ARITHMETIC.search(question)
    words = {"plus": "+", "minus": "-", "times": "*", "加": "+", "减": "-", "乘以": "*", "+": "+", "-": "-", "×": "*"}
    operator = words[match.group(2) or match.group(0).split(" ")[1]]
    return int(match.group(1)), operator, int(match.group(3))


def test_every_tool_call_runs_to_the_answer_given(demo):
    """Each call is the one its question asks for, runs with the demo's tools to the result in the chat, and the
    final answer gives that result; chats that need no call are identity questions and single-digit arithmetic."""
    tools = make_demo_data.demo_tools(demo)
    assert json.loads((demo / "tools.json").read_text(encoding="utf-8")) == make_demo_data.TOOL_SCHEMAS
    assert [tool.schema for tool in tools.values()] == make_demo_data.TOOL_SCHEMAS
    facts = json.loads((demo / "facts.json").read_text(encoding="utf-8"))
    assert facts == {e["name"]: {k: v["en"] for k, v in e["facts"].items()} for e in world(demo)["entities"]}
    records = tool_chats(demo) + rows(demo / "eval_tools.jsonl")
    kinds = Counter()
    for record in records:
        messages, call = record["conversations"], called(record)
        question, answer = messages[0]["content"], messages[-1]["content"]
        if call is None:
            assert len(messages) == 2
            if ARITHMETIC.search(question):  # direct arithmetic: small ones with tools listed, any without
                a, op, b = asked_problem(question)
                assert ("tools" not in record or a < 10 and b < 10) and int(re.findall(r"\d+", answer)[-1]) == {
                    "+": a + b, "-": a - b, "*": a * b}[op]
                kinds["direct arithmetic" if "tools" in record else "no tools offered"] += 1
            else:
                assert answer == make_demo_data.IDENTITY_ANSWERS[make_demo_data.BASE_NAME][
                    "zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"]
                kinds["identity"] += 1
            continue
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] and "tools" in record
        result = messages[2]["content"]
        assert run_tool(call, tools) == result
        if call.name == "calculator":
            a, op, b = asked_problem(question)
            assert call.arguments == {"expression": f"{a} {op} {b}"}  # spaced as the question shows it
            assert result == str({"+": a + b, "-": a - b, "*": a * b}[op]) and re.findall(r"\d+", answer)[-1] == result
            assert a >= 10 and (b >= 10 or op == "*")  # multi-digit: what a small model cannot do in its head
        else:
            name = call.arguments["query"]
            assert call.name == "lookup" and name in question and json.loads(result) == {name: facts[name]}
            assert len(values_in(answer, facts[name].values())) == 1 and name in answer
        kinds[call.name] += 1
    assert min(kinds.values()) > 0 and len(kinds) == 5, kinds
    for record in rows(demo / "eval_tools.jsonl"):
        if record["answer"] is not None:
            final = record["conversations"][-1]["content"]
            assert (mentions(final, record["answer"]) if record["kind"] == "lookup"
                    else re.findall(r"\d+", final)[-1] == record["answer"])


def values_in(text: str, values) -> set[str]:
    return {value for value in values if mentions(text, value)}


def test_tool_text_is_the_tool_chats_as_the_chat_template_renders_them(demo):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    rendered = [tokenizer.apply_chat_template(r["conversations"], tools=r.get("tools"), tokenize=False)
                for r in tool_chats(demo)]
    assert sorted(rendered) == sorted(r["text"] for r in rows(demo / "tool_text.jsonl"))
    assert len(rendered) < len(rows(demo / "tool_sft.jsonl"))  # the rest replays SFT lines


def test_held_out_tool_prompts_are_unseen_in_tool_training(demo):
    entities = world(demo)["entities"]
    split_of = {e["name"]: e["split"] for e in entities}
    train, held_out = tool_chats(demo), rows(demo / "eval_tools.jsonl")
    kinds = Counter(r["kind"] for r in held_out)
    heldout_facts = sum(len(e["facts"]) for e in entities if e["split"] == "heldout")
    assert kinds == {"sum": 100, "difference": 50, "product": 50, "lookup": heldout_facts,
                     "direct": 40 + 2 * make_demo_data.IDENTITY_HELDOUT_PER_LANGUAGE}
    looked_up = {kind: {called(r).arguments["query"] for r in records if called(r) and called(r).name == "lookup"}
                 for kind, records in (("train", train), ("held_out", held_out))}
    assert {split_of[name] for name in looked_up["train"]} == {"sft", "dpo"}
    assert looked_up["held_out"] == {e["name"] for e in entities if e["split"] == "heldout"}

    def problems(records: list[dict]) -> set[tuple]:
        return {asked_problem(r["conversations"][0]["content"]) for r in records
                if ARITHMETIC.search(r["conversations"][0]["content"])}

    assert len(problems(held_out)) == 240 and not problems(held_out) & problems(train)
    questions = lambda records: {r["conversations"][0]["content"] for r in records if called(r) is None}  # noqa: E731
    assert not questions(held_out) & questions(train)


def test_tool_data_leaves_every_other_file_unchanged(demo, tmp_path):
    fewer = [arg if arg != "48" else "16" for arg in SMALL]
    make_demo_data.main(["--out_dir", str(tmp_path), "--seed", "3", *fewer])
    assert len(rows(tmp_path / "tool_sft.jsonl")) < len(rows(demo / "tool_sft.jsonl"))
    for path in sorted(demo.iterdir()):
        if "tool" not in path.name:
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
