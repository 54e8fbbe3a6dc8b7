"""model/benchmarks.py and scripts/eval_bench.py against references computed independently: a stand-in model with
hand-set log-probabilities for both multiple-choice scorers and the accuracy arithmetic, one-sequence-at-a-time
scoring for the batched log-probs, the training loss for perplexity, a uniform model for bits per byte, and
lm-eval itself (slow, when it is installed) on the Hugging Face export."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import runpy
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_FLAGS, one_thread, run, subprocess_env, tiny_model
from model import MiniMindLM, benchmarks
from model.benchmarks import (
    ChoiceData, ChoiceItem, ChoicePrompt, ReportCard, choice_prompts, choose_indices, continuation_log_probs,
    evaluate_choices, evaluate_math, final_number, letter_log_probs, load_choice_data, model_summary, parse_number,
    read_math_jsonl, score_text,
)
from model.common import ConfigError, DataFormatError
from model.dataset import PadCollator, PretrainDataset
from model.model_lora import apply_lora, save_lora
from model.trainer import masked_cross_entropy

# Four hand-built items: subjects of one and two items, 4, 3, 4 and 2 choices (chance 1/4, 1/3, 1/4, 1/2).
ITEMS = [
    ChoiceItem("geography", "中国最长的河流是哪一条？", ("黄河", "长江", "珠江", "淮河"), 1, "hand:1"),
    ChoiceItem("arithmetic", "What is two plus three?", ("four", "six", "five"), 2, "hand:2"),
    ChoiceItem("animals", "Which animal barks?", ("cat", "a domestic dog kept as a loyal pet", "fish", "bird"), 1,
               "hand:3"),
    ChoiceItem("animals", "Which animal meows?", ("cat", "dog"), 0, "hand:4"),
]
INTENDED = [1, 2, 1, 1]  # what the stand-in model is built to pick: right, right, right, wrong (the dog)


class TriggeredLM(torch.nn.Module):
    """A stand-in language model with log-probabilities set by hand: every logit is 0, except that from the
    position where a trigger token appears on, the logits of its target tokens are raised by their boost.
    Left padding (token 0, never a trigger) changes nothing, so the exact log-probabilities are known."""

    def __init__(self, vocab_size: int, boosts: dict[int, dict[int, float]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the scorer reads the device from the parameters
        self.config = SimpleNamespace(max_seq_len=4096)
        self.vocab_size, self.boosts = vocab_size, boosts

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # (B, T, V)
        for trigger, targets in self.boosts.items():
            seen = ((input_ids == trigger).cumsum(dim=1) > 0).float()  # (B, T)
            for target, boost in targets.items():
                logits[:, :, target] += boost * seen
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def triggers(tokenizer, prompts: list[ChoicePrompt]) -> list[int]:
    """For each prompt, a token of its context that no other prompt's context has (its options are in it too)."""
    contexts = [token_ids(tokenizer, p.context) for p in prompts]
    return [next(t for t in mine if all(t not in other for j, other in enumerate(contexts) if j != i))
            for i, mine in enumerate(contexts)]


def hand_prompts(tokenizer, scoring: str) -> list[ChoicePrompt]:
    return choice_prompts(ChoiceData(ITEMS, {}, "jsonl"), tokenizer, 0, scoring)


@pytest.fixture(scope="module")
def letter_model(tokenizer) -> TriggeredLM:
    """Raises the intended letter (" B", " C", " B", " B") by 5 after each item's own prompt."""
    prompts = hand_prompts(tokenizer, "letter")
    letters = [token_ids(tokenizer, " " + "ABCD"[pick]) for pick in INTENDED]
    assert all(len(ids) == 1 for ids in letters)
    return TriggeredLM(len(tokenizer), {t: {ids[0]: 5.0} for t, ids in zip(triggers(tokenizer, prompts), letters)})


def test_letter_scorer_picks_the_intended_letters_with_exact_log_probs(tokenizer, letter_model):
    prompts = hand_prompts(tokenizer, "letter")
    assert prompts[0].context.endswith("长江\nC. 珠江\nD. 淮河\n答案：") and prompts[1].context.endswith("C. five\nAnswer:")
    findings = evaluate_choices(letter_model, tokenizer, prompts, "letter", batch_size=3)  # padded batches
    assert [item["pick"] for item in findings.items] == ["B", "C", "B", "B"]
    log_z = math.log(len(tokenizer) - 1 + math.exp(5.0))  # one logit of 5, the others 0
    for item, pick in zip(findings.items, INTENDED):
        expected = [(5.0 if i == pick else 0.0) - log_z for i in range(len(item["log_probs"]))]
        assert item["log_probs"] == pytest.approx(expected, abs=1e-4)


def test_continuation_scorer_normalises_by_characters_as_acc_norm(tokenizer):
    """The long right answer to "Which animal barks?" has the higher log-probability per character, the short
    wrong one ("cat") the higher sum: continuation scoring must pick the long one."""
    prompts = hand_prompts(tokenizer, "continuation")
    boosts, found = {}, triggers(tokenizer, prompts)
    for trigger, item, pick in zip(found, ITEMS, INTENDED):
        boosts[trigger] = {t: 12.0 for t in token_ids(tokenizer, " " + item.choices[pick])}
    boosts[found[2]].update({t: 8.0 for t in token_ids(tokenizer, " cat")})
    findings = evaluate_choices(TriggeredLM(len(tokenizer), boosts), tokenizer, prompts, "continuation", batch_size=2)
    assert [item["pick"] for item in findings.items] == ["B", "C", "B", "B"]
    barks = findings.items[2]["log_probs"]  # summed log-probabilities, before normalising
    assert max(range(4), key=barks.__getitem__) == 0  # the raw sum prefers "cat"
    assert barks[1] / len(ITEMS[2].choices[1]) > barks[0] / len("cat")
    assert findings.figures["accuracy"] == 0.75


def test_accuracy_arithmetic(tokenizer, letter_model):
    findings = evaluate_choices(letter_model, tokenizer, hand_prompts(tokenizer, "letter"), "letter")
    figures = findings.figures
    assert (figures["items"], figures["correct"], figures["subjects"]) == (4, 3, 3)
    assert figures["accuracy"] == 3 / 4
    assert figures["subject_mean"] == pytest.approx((1 + 1 + 1 / 2) / 3)  # each subject counts once
    assert figures["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert findings.rows == [["animals", 2, 1, "50.00%", "37.50%"], ["arithmetic", 1, 1, "100.00%", "33.33%"],
                             ["geography", 1, 1, "100.00%", "25.00%"], ["all", 4, 3, "75.00%", "33.33%"]]
    assert [item["correct"] for item in findings.items] == [True, True, True, False]


def test_batched_log_probs_equal_scoring_each_sequence_alone(tokenizer):
    torch.manual_seed(0)
    model = tiny_model()
    texts = ["中国最长的河流是长江。", "Two plus three is five.", "猫", "A longer sentence, to make the padding count."]
    halves = [("<|im_start|>" + text[: len(text) // 2], text[len(text) // 2:]) for text in texts]
    pairs = [(token_ids(tokenizer, context), token_ids(tokenizer, continuation)) for context, continuation in halves]
    letter_ids = [token_ids(tokenizer, " " + letter)[0] for letter in "ABC"]
    batched = continuation_log_probs(model, pairs, batch_size=3)
    letters = letter_log_probs(model, [context for context, _ in pairs], [letter_ids] * len(pairs), batch_size=3)
    with torch.no_grad():
        for (context, continuation), summed, three in zip(pairs, batched, letters):
            log_probs = F.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), dim=-1)
            alone = sum(float(log_probs[len(context) - 1 + k, t]) for k, t in enumerate(continuation))
            assert summed == pytest.approx(alone, abs=1e-4)
            assert three == pytest.approx(log_probs[len(context) - 1, letter_ids].tolist(), abs=1e-4)


def test_random_init_model_scores_near_chance_on_mcq_zh(shared_data, tokenizer):
    data = load_choice_data(shared_data / "eval" / "mcq_zh.jsonl")
    prompts = choice_prompts(data, tokenizer, 0, "letter", choose_indices(len(data.items), 120, seed=0))
    torch.manual_seed(0)
    with one_thread():  # tiny matrices: one thread is faster, and leaves the other core free
        findings = evaluate_choices(tiny_model(), tokenizer, prompts, "letter", batch_size=16)
    assert findings.figures["items"] == 120 and findings.figures["chance"] == pytest.approx(0.25, abs=0.01)
    assert abs(findings.figures["accuracy"] - findings.figures["chance"]) < 0.1, findings.figures


# ---------------------------------------------------------------------------------------------------------------
# Perplexity and bits per byte

TEXTS = ["MiniMind reads a little.", "小模型也能读书。", "Ein kurzer Satz über Bären und Äpfel.",
         "A document long enough to be cut to the context: " + "one two three four five six seven eight " * 6]


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_perplexity_is_exp_of_the_training_loss(tokenizer, tmp_path):
    dataset = PretrainDataset(write_texts(tmp_path / "held_out.jsonl", TEXTS), tokenizer, max_length=48)
    torch.manual_seed(0)
    model = tiny_model()
    batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])  # the whole file at once
    with torch.no_grad():
        training_loss = float(masked_cross_entropy(model(batch.input_ids).logits, batch.labels, batch.loss_mask))
    score = score_text(model, dataset, batch_size=3)
    assert score.loss == pytest.approx(training_loss, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(training_loss), rel=1e-5)
    assert score.tokens == int(batch.loss_mask.sum()) and score.truncated == 1
    kept = tokenizer.decode(token_ids(tokenizer, TEXTS[3])[:47])  # the cut document: 47 text tokens after bos
    assert score.bytes == sum(len(t.encode()) for t in TEXTS[:3]) + len(kept.encode())


def test_bits_per_byte_of_a_uniform_model(tokenizer, tmp_path):
    dataset = PretrainDataset(write_texts(tmp_path / "held_out.jsonl", TEXTS[:3]), tokenizer, max_length=256)
    model = tiny_model()
    torch.nn.init.zeros_(model.output.weight)  # tied to the embedding: every logit is 0, every token 1/V
    score = score_text(model, dataset, batch_size=2)
    vocab = model.config.vocab_size
    tokens = sum(len(token_ids(tokenizer, t)) + 1 for t in TEXTS[:3])  # every text token, then eos
    text_bytes = sum(len(t.encode("utf-8")) for t in TEXTS[:3])
    assert (score.tokens, score.bytes) == (tokens, text_bytes)
    assert score.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert score.bits_per_byte == pytest.approx(math.log2(vocab) * tokens / text_bytes, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Maths


@pytest.mark.parametrize("reply, expected", [
    ("The answer is 18.", Fraction(18)),
    ("<think>\n3+4=7\n7*2=14\n</think>\n<answer>\n14\n</answer>", Fraction(14)),
    ("<think>\nShe had 12 apples\n</think>\nShe has 5 left, not 12-7=6.", Fraction(6)),
    ("<think>\n5+8=13", None),  # cut off while thinking: no answer part
    ("<answer>42</answer>", Fraction(42)),
    ("He paid $1,234.50 in total.", Fraction("1234.5")),
    ("There are 1,000,000 stars; 3 are red.", Fraction(3)),
    ("1,2,3", Fraction(3)),  # a list, not a thousands separator
    ("温度是-3度", Fraction(-3)),
    ("x = -3", Fraction(-3)),
    ("12-5", Fraction(5)),  # a minus, not a sign
    ("It is 2/7.", Fraction(2, 7)),
    ("答案是２／７也就是２/７。", Fraction(2, 7)),  # full-width digits and slash
    ("The price rose by 50%.", Fraction(50)),
    ("3.0", Fraction(3)),
    ("no number here", None),
])
def test_final_number(reply, expected):
    assert final_number(reply) == expected


@pytest.mark.parametrize("text, expected", [
    ("18", Fraction(18)), ("-2.5", Fraction(-5, 2)), ("1,000", Fraction(1000)), ("2/6", Fraction(1, 3)),
    (" 0.5 ", Fraction(1, 2)), ("12%", Fraction(12)), ("1/0", None), ("18 apples", None), ("abc", None),
    ("1,00", None), ("--3", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_evaluate_math_tallies_exact_matches_per_source(tmp_path, monkeypatch, tokenizer):
    rows = [{"question": "1+1?", "answer": "2", "source": "gsm8k"},
            {"question": "Half of one?", "answer": "0.5", "source": "cmath"},
            {"question": "2/6 in lowest terms?", "answer": "1/3", "source": "cmath"},
            {"question": "3*3?", "answer": 9, "source": "gsm8k"}]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    replies = {"1+1?": "1+1=2, so the answer is 2.", "Half of one?": "<think>\n1/2\n</think>\n<answer>\n1/2\n</answer>",
               "2/6 in lowest terms?": "It is 2/6.", "3*3?": "I do not know."}
    asked = []

    def canned(model, tokenizer, conversations, max_new_tokens, batch_size):
        asked.extend(conversations)
        return [replies[c[0]["content"]] for c in conversations]

    monkeypatch.setattr(benchmarks, "generate_replies", canned)
    findings = evaluate_math(None, tokenizer, read_math_jsonl(path), batch_size=3)
    assert asked == [[{"role": "user", "content": r["question"]}] for r in rows]
    assert [item["correct"] for item in findings.items] == [True, True, True, False]
    assert findings.figures == {"accuracy": 0.75, "items": 4, "correct": 3, "answered": 3}
    assert findings.rows == [["cmath", 2, 2, "100.00%"], ["gsm8k", 2, 1, "50.00%"], ["all", 4, 3, "75.00%"]]


# ---------------------------------------------------------------------------------------------------------------
# Files: the unified jsonl, the official C-Eval and CMMLU folders, few-shot prompts, bad lines


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def mcq_row(subject: str, question: str, answer: str = "B", choices: tuple = ("1", "2", "3", "4")) -> dict:
    return {"subject": subject, "question": question, "choices": list(choices), "answer": answer}


def test_few_shot_prompt_takes_the_first_items_of_each_subject(tokenizer, tmp_path):
    poems = [mcq_row("语文", "“春眠不觉晓”的下一句是？", "A", ("处处闻啼鸟", "夜来风雨声", "花落知多少", "举头望明月")),
             mcq_row("语文", "“床前明月光”的下一句是？", "C", ("处处闻啼鸟", "低头思故乡", "疑是地上霜", "举头望明月"))]
    path = write_jsonl(tmp_path / "mcq.jsonl", [mcq_row("high_school_math", "What is 1+1?"),
                                                mcq_row("high_school_math", "What is 2+2?", "D"), *poems])
    data = load_choice_data(path, shots=1)
    assert [item.question for item in data.items] == ["What is 2+2?", "“床前明月光”的下一句是？"]
    letter = choice_prompts(data, tokenizer, 1, "letter")
    assert letter[0].context == ("<|im_start|>Multiple-choice questions on high school math, each followed by its "
                                 "answer.\n\nWhat is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                                 "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert letter[0].choices == ["A", "B", "C", "D"]
    text = choice_prompts(data, tokenizer, 1, "continuation")
    assert text[1].context == ("<|im_start|>以下是关于语文的单项选择题，每题后附答案。\n\n“春眠不觉晓”的下一句是？\n"
                               "A. 处处闻啼鸟\nB. 夜来风雨声\nC. 花落知多少\nD. 举头望明月\n答案： 处处闻啼鸟\n\n"
                               "“床前明月光”的下一句是？\nA. 处处闻啼鸟\nB. 低头思故乡\nC. 疑是地上霜\nD. 举头望明月\n答案：")
    assert text[1].choices == ["处处闻啼鸟", "低头思故乡", "疑是地上霜", "举头望明月"]
    with pytest.raises(ConfigError, match=r"subject 'high_school_math' of .* has 2 item\(s\)"):
        load_choice_data(path, shots=2)  # both items of each subject would be examples, none left to score


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def test_official_c_eval_and_cmmlu_folders(tokenizer, tmp_path):
    ceval = tmp_path / "ceval-exam"
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(ceval / "dev" / "computer_network_dev.csv", header, [["0", "示例题", "甲", "乙", "丙", "丁", "C", "因为"]])
    write_csv(ceval / "val" / "computer_network_val.csv", header[:7], [["0", "第一题", "甲", "乙", "丙", "丁", "A"],
                                                                      ["1", "第二题\n有两行", "甲", "乙", "丙", "丁", "D"]])
    write_csv(ceval / "test" / "computer_network_test.csv", header[:7], [["0", "无答案", "甲", "乙", "丙", "丁", ""]])
    data = load_choice_data(ceval, shots=1)
    assert data.layout == "ceval" and [(i.subject, i.question, i.answer) for i in data.items] == [
        ("computer_network", "第一题", 0), ("computer_network", "第二题\n有两行", 3)]
    assert data.items[1].where.endswith("computer_network_val.csv:4")  # the record ends on line 4
    assert "示例题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： C\n\n第一题" in choice_prompts(data, tokenizer, 1, "letter")[0].context

    cmmlu = tmp_path / "cmmlu"
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(cmmlu / "dev" / "agronomy.csv", header, [["0", "示例", "土", "水", "火", "木", "B"]])
    write_csv(cmmlu / "test" / "agronomy.csv", header, [["0", "农业问题", "土", "水", "火", "木", "A"]])
    data = load_choice_data(cmmlu, shots=1)
    assert data.layout == "cmmlu" and data.items == [ChoiceItem("agronomy", "农业问题", ("土", "水", "火", "木"), 0,
                                                                f"{cmmlu / 'test' / 'agronomy.csv'}:2")]
    assert data.examples["agronomy"][0].question == "示例"
    write_csv(cmmlu / "test" / "bad.csv", ["Question", "A", "B", "C", "D"], [["q", "1", "2", "3", "4"]])
    with pytest.raises(DataFormatError, match=r"bad\.csv: missing column\(s\) answer"):
        load_choice_data(cmmlu)


@pytest.mark.parametrize("line, message", [
    ('{"subject": "s", "question": "q", "choices": ["1", "2"], "answer": "C"}', "field 'answer' must be one of A, B"),
    ('{"subject": "s", "question": "q", "choices": ["1", ""], "answer": "A"}', "field 'choices[1]' must be non-empty"),
    ('{"subject": "s", "choices": ["1", "2"], "answer": "A"}', "missing field 'question'"),
    ('{"subject": "s", "question": "q", "choices": "1, 2", "answer": "A"}', "field 'choices' must be a list"),
    ("not json", "invalid JSON"),
])
def test_bad_multiple_choice_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "mcq.jsonl", [mcq_row("s", "q"), line])
    with pytest.raises(DataFormatError, match=f"mcq.jsonl:2: .*{re.escape(message)}"):
        load_choice_data(path)


def test_script_reports_a_bad_line_in_one_line(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save(tiny_model().state_dict(), tmp_path / "tiny.pth")
    path = write_jsonl(tmp_path / "math.jsonl", [{"question": "1+1?", "answer": "2"},
                                                 {"question": "2+2?", "answer": "four"}])
    argv = ["--task", "math", "--data_path", str(path), "--weight", str(tmp_path / "tiny.pth"), *TINY_FLAGS,
            "--device", "cpu", "--out_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["eval_bench.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "eval_bench.py"), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}:2: field 'answer' must be a number"), lines


def test_choose_indices():
    assert choose_indices(5, None, 0) == choose_indices(5, 9, 0) == [0, 1, 2, 3, 4]
    picked = choose_indices(100, 10, seed=1)
    assert picked == sorted(set(picked)) and len(picked) == 10 and picked == choose_indices(100, 10, seed=1)
    assert picked != choose_indices(100, 10, seed=2)
    with pytest.raises(ConfigError, match="--limit must be >= 1"):
        choose_indices(100, 0, seed=1)


def test_report_card_json_and_markdown(tokenizer, letter_model, tmp_path):
    findings = evaluate_choices(letter_model, tokenizer, hand_prompts(tokenizer, "letter"), "letter")
    model = tiny_model()
    card = ReportCard("mcq", model_summary(model, "out/tiny.pth"), {"path": "hand.jsonl", "layout": "jsonl",
                                                                    "items": 4, "scored": 4},
                      {"limit": None, "seed": 0, "shots": 0, "scoring": "letter"}, findings, "cpu", "float32", 1.25)
    json_path, markdown_path = card.write(tmp_path / "reports", "tiny-mcq-hand")
    saved = json.loads(json_path.read_text(encoding="utf-8"))
    assert saved["model"]["parameters"] == model.num_parameters() and saved["model"]["config"]["dim"] == 64
    assert saved["figures"]["accuracy"] == 0.75 and saved["settings"]["scoring"] == "letter"
    assert saved["table"][-1] == {"subject": "all", "items": 4, "correct": 3, "accuracy": "75.00%", "chance": "33.33%"}
    assert (saved["seconds"], saved["device"], saved["precision"]) == (1.25, "cpu", "float32")
    assert len(saved["items"]) == 4
    markdown = markdown_path.read_text(encoding="utf-8")
    table = ["| subject | items | correct | accuracy | chance |", "|---|---|---|---|---|",
             "| animals | 2 | 1 | 50.00% | 37.50% |"]
    assert "\n".join(table) in markdown
    assert "accuracy 75.00%" in markdown and "chance 33.33%" in markdown and "1.2 s on cpu, float32" in markdown


# ---------------------------------------------------------------------------------------------------------------
# The script end to end, and lm-eval on the Hugging Face export (slow)

HAND_ROWS = [mcq_row(item.subject, item.question, "ABCD"[item.answer], item.choices) for item in ITEMS] + [
    mcq_row("arithmetic", "What is ten minus four?", "A", ("six", "four", "fourteen", "forty")),
    mcq_row("geography", "日本的首都是哪座城市？", "D", ("大阪", "京都", "札幌", "东京")),
    mcq_row("animals", "Which animal gives wool?", "C", ("horse", "pig", "sheep", "hen")),
    mcq_row("geography", "法国的首都是？", "B", ("里昂", "巴黎", "马赛", "尼斯")),
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, MiniMindLM]:
    """A tiny model with weights large enough that its choices are far from ties, saved as out/tiny_64.pth."""
    out = tmp_path_factory.mktemp("out")
    torch.manual_seed(3)
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    torch.save(model.state_dict(), out / "tiny_64.pth")
    return out / "tiny_64.pth", model


def bench(args: list[str], out: Path, name: str = "card") -> dict:
    """Run scripts/eval_bench.py with its report card in `out` (also its --out_dir); returns the JSON card."""
    stdout = run([sys.executable, "scripts/eval_bench.py", *args, "--device", "cpu", "--out_dir", str(out),
                  "--name", name])
    assert f"wrote {out / name}.json" in stdout
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def log_probs(items: list[dict]) -> list[float]:
    """Every choice's summed log-probability of a card's item records, in one flat list."""
    return [value for item in items for value in item["log_probs"]]


@pytest.mark.slow
def test_script_scores_native_hf_and_lora_models(tiny_checkpoint, tokenizer, tmp_path):
    weight, model = tiny_checkpoint
    data = write_jsonl(tmp_path / "hand.jsonl", HAND_ROWS)
    hf = tmp_path / "hf"
    run([sys.executable, "scripts/convert_model.py", "torch2hf", "--weight", str(weight), "--hf_path", str(hf),
         *TINY_FLAGS, "--max_seq_len", "1024"])
    native = bench(["--task", "mcq", "--data_path", str(data), "--weight", str(weight), *TINY_FLAGS], tmp_path)
    exported = bench(["--task", "mcq", "--data_path", str(data), "--load", "1", "--hf_path", str(hf)], tmp_path)
    expected = evaluate_choices(model, tokenizer, choice_prompts(load_choice_data(data), tokenizer, 0, "letter"),
                                "letter")
    for card in (native, exported):
        assert card["figures"] == pytest.approx(expected.figures)
        assert log_probs(card["items"]) == pytest.approx(log_probs(expected.items), abs=1e-3)
    assert native["model"]["parameters"] == model.num_parameters() and native["data"]["scored"] == len(HAND_ROWS)

    out = tmp_path / "with_lora"
    with_lora = tiny_model(model.state_dict())
    apply_lora(with_lora, rank=4, targets=("wq", "wo"))
    with torch.no_grad():
        for name, p in with_lora.named_parameters():
            if name.endswith("lora.B.weight"):
                p.normal_(std=0.5)
    (out / "lora").mkdir(parents=True)
    save_lora(with_lora, str(out / "lora" / "probe_64.pth"))
    adapted = bench(["--task", "mcq", "--data_path", str(data), "--weight", str(weight), *TINY_FLAGS,
                     "--lora_name", "probe", "--scoring", "continuation"], out)
    expected = evaluate_choices(with_lora.eval(), tokenizer,
                                choice_prompts(load_choice_data(data), tokenizer, 0, "continuation"), "continuation")
    assert adapted["model"]["lora"] == "probe" and adapted["settings"]["scoring"] == "continuation"
    assert log_probs(adapted["items"]) == pytest.approx(log_probs(expected.items), abs=1e-3)
    assert log_probs(adapted["items"]) != pytest.approx(log_probs(native["items"]), abs=0.1)


@pytest.mark.slow
def test_script_perplexity_and_maths_cards(tiny_checkpoint, tokenizer, tmp_path):
    weight, model = tiny_checkpoint
    texts = write_texts(tmp_path / "held_out.jsonl", TEXTS)
    card = bench(["--task", "ppl", "--data_path", str(texts), "--weight", str(weight), *TINY_FLAGS,
                  "--limit", "3", "--seed", "1"], tmp_path)
    dataset = PretrainDataset(texts, tokenizer, max_length=8192)
    expected = score_text(model, dataset, choose_indices(len(TEXTS), 3, seed=1))
    assert card["figures"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)
    assert card["figures"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-4)
    assert card["data"] == {"path": str(texts), "layout": "jsonl", "items": 4, "scored": 3}

    problems = write_jsonl(tmp_path / "math.jsonl", [{"question": "1+1?", "answer": "2", "source": "toy"},
                                                     {"question": "2+3?", "answer": "5", "source": "toy"}])
    card = bench(["--task", "math", "--data_path", str(problems), "--weight", str(weight), *TINY_FLAGS,
                  "--max_new_tokens", "8"], tmp_path)
    assert card["figures"]["items"] == 2 and len(card["items"]) == 2 and "reply" in card["items"][0]
    assert card["settings"]["max_new_tokens"] == 8
    markdown = (tmp_path / "card.md").read_text(encoding="utf-8")
    assert "| source | items | correct | accuracy |" in markdown and "| toy | 2 |" in markdown


LM_EVAL_MISSING = "lm-eval is not installed (pip install -r requirements-eval.txt); CI installs requirements.txt only"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason=LM_EVAL_MISSING)
def test_lm_eval_accuracy_equals_eval_bench(tiny_checkpoint, tmp_path):
    """lm_eval's multiple_choice on the dense Hugging Face export, on the task eval_bench.py writes, gives the
    same accuracy (acc for letter scoring, acc_norm for continuation scoring) and the same log-likelihoods."""
    weight, _ = tiny_checkpoint
    data = write_jsonl(tmp_path / "hand.jsonl", HAND_ROWS)
    hf = tmp_path / "hf"
    run([sys.executable, "scripts/convert_model.py", "torch2hf", "--weight", str(weight), "--hf_path", str(hf),
         *TINY_FLAGS, "--max_seq_len", "1024"])
    tasks = tmp_path / "tasks"
    ours = {}
    for scoring in ("letter", "continuation"):
        ours[scoring] = bench(["--task", "mcq", "--data_path", str(data), "--load", "1", "--hf_path", str(hf),
                               "--scoring", scoring, "--lm_eval_task", str(tasks)], tmp_path, f"hand_{scoring}")
    run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
         "--tasks", "minimind_hand_letter,minimind_hand_continuation", "--include_path", str(tasks),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
        env=subprocess_env(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets")), timeout=600)
    results = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())["results"]
    for scoring, metric in (("letter", "acc"), ("continuation", "acc_norm")):
        assert results[f"minimind_hand_{scoring}"][f"{metric},none"] == ours[scoring]["figures"]["accuracy"], results
        samples = next((tmp_path / "lm_eval").rglob(f"samples_minimind_hand_{scoring}_*.jsonl"))
        theirs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
        assert [bool(sample[metric]) for sample in theirs] == [item["correct"] for item in ours[scoring]["items"]]
        lm_eval_log_probs = [float(response[0]) for sample in theirs for response in sample["filtered_resps"]]
        assert lm_eval_log_probs == pytest.approx(log_probs(ours[scoring]["items"]), abs=1e-3)
