"""scripts/demo.py: the quick run end to end (every stage through its real script), results.json holding every
figure, finished stages reused; and the answer matching its QA accuracy is scored with."""
import json
import math

import pytest

from scripts import demo

FIGURES = {
    "pretrain": ["parameters", "heldout_text_loss", "false_fact_text_loss", "uniform_loss", "heldout_qa_accuracy"],
    "lora": ["questions", "new_name_with_adapter", "base_name_without_adapter", "base_file_unchanged",
             "heldout_qa_accuracy_with_adapter", "adapter_bytes", "replies"],
    "dpo": ["pairs", "reward_accuracy_before", "reward_accuracy_after", "reward_margin_after",
            "preference_accuracy_before", "preference_accuracy_after", "log_prob_margin_before",
            "log_prob_margin_after", "heldout_qa_accuracy_after"],
}
STAGES = ["data", "tokenizer", "pretrain", "sft", "lora", "dpo", "distill", "reason", "tools"]


def test_values_named_matches_whole_values_only():
    assert demo.values_named("Kalo lives in Pelmora.", ["Pelmora", "Yarpel"]) == {"Pelmora"}
    assert demo.values_named("Kalo is a fisher.", ["fish", "apples"]) == set()
    assert demo.values_named("Kalo 今年 34 岁。", ["34", "3", "4", "43"]) == {"34"}
    assert demo.values_named("Kalo 爱吃 草。", ["草", "蜂蜜"]) == {"草"}
    assert demo.values_named("Kalo lies by the sea, not by a river.", ["by the sea", "by a river", "in a forest"]) == {
        "by the sea", "by a river"}


def test_answered_reads_the_last_number_or_the_named_value():
    sum_record = {"kind": "sum", "answer": "106"}
    assert demo.answered("63 + 43 = 106.", sum_record)
    assert not demo.answered("63 + 43 = 107.", sum_record) and not demo.answered("106 is 63 + 43", sum_record)
    assert not demo.answered("no idea", sum_record) and not demo.answered("63 + 43 = 1060.", sum_record)
    lookup = {"kind": "lookup", "answer": "Pelmora", "candidates": ["Pelmora", "Yarpel"]}
    assert demo.answered("Kalo lives in Pelmora.", lookup)
    assert not demo.answered("Kalo lives in Pelmora or Yarpel.", lookup) and not demo.answered("Kalo lives.", lookup)


def finite_numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in finite_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in finite_numbers(v)]
    return []


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_every_figure(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    argv = ["--quick", "--seed", "5", "--device", "cpu", "--out_dir", str(out), "--data_dir", str(data)]
    results = demo.main(argv)

    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved == results
    assert list(saved["stages"]) == STAGES and not any(entry["reused"] for entry in saved["stages"].values())
    assert saved["train_seconds_total"] == pytest.approx(sum(e["seconds"] for e in saved["stages"].values()))
    assert all(math.isfinite(n) for n in finite_numbers(saved))
    for section, keys in FIGURES.items():
        assert set(keys) <= set(saved[section]), section
    for key in ("heldout_qa_accuracy", "seen_qa_accuracy", "chance_level"):
        assert 0.0 <= saved[key] <= 1.0
    # the chance level, recomputed from the held-out questions: the mean of 1 / number of candidate values
    questions = [json.loads(line) for line in (data / "eval_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    heldout = [q for q in questions if q["split"] == "heldout"]
    assert saved["chance_level"] == pytest.approx(sum(1 / len(q["candidates"]) for q in heldout) / len(heldout))
    assert saved["sft"]["heldout"]["questions"] == len(heldout)
    assert saved["pretrain"]["uniform_loss"] == pytest.approx(math.log(saved["tokenizer"]["vocab_size"]))
    assert saved["lora"]["base_file_unchanged"] is True
    for run in ("with_teacher", "without_teacher", "teacher"):
        assert {"parameters", "heldout_text_loss", "heldout_qa_loss"} <= set(saved["distill"][run])
    assert saved["distill"]["with_teacher"]["parameters"] < saved["distill"]["teacher"]["parameters"]
    for when in ("before", "after"):
        assert {"well_formed", "accuracy"} <= set(saved["reason"][when])
    tools = saved["tools"]
    records = [json.loads(line) for line in (data / "eval_tools.jsonl").read_text(encoding="utf-8").splitlines()]
    for when in ("before", "after"):
        assert tools[when]["call_prompts"] == sum(r["kind"] != "direct" for r in records)
        assert tools[when]["no_call_prompts"] == sum(r["kind"] == "direct" for r in records)
        assert 0 <= tools[when]["right_call"] <= tools[when]["right_tool"] <= 1
        assert set(tools[when]["with_tools"]) == set(tools[when]["without_tools"]) == {"sum", "difference", "product", "lookup"}
    assert (out / "demo_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses every finished stage and measures the same checkpoints to the same figures
    again = demo.main(argv)
    assert all(entry["reused"] for entry in again["stages"].values())
    assert again["train_seconds_total"] == pytest.approx(saved["train_seconds_total"])
    for key in ("heldout_qa_accuracy", "seen_qa_accuracy", "pretrain", "dpo", "distill", "reason", "tools"):
        assert again[key] == saved[key], key
