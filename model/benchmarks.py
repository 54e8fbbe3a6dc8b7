"""Benchmarks of a trained MiniMind and the report card of a run: multiple choice (C-Eval, CMMLU, MMLU style),
held-out perplexity and bits per byte, and generative maths. scripts/eval_bench.py is the command line.

    data = load_choice_data("mcq_zh.jsonl")                  # or an official C-Eval / CMMLU folder
    prompts = choice_prompts(data, tokenizer, shots=0, scoring="letter")
    findings = evaluate_choices(model, tokenizer, prompts, "letter")
    print(findings.figures["accuracy"], findings.figures["chance"])

Multiple choice. Each item becomes one plain-text context: the tokenizer's bos token (every pretraining document
starts with it), a one-line header naming the subject, `shots` solved examples of the same subject, then the
question, its options "A. ..." one per line, and the cue "答案：" (Chinese questions) or "Answer:". The model
then scores continuations, each the delimiter " " followed by a choice, as lm-eval's `multiple_choice` does:
- letter scoring: the choices are the option letters; the pick is the letter whose token (" A", " B", ...) has
  the highest log-probability right after the context (lm-eval's `acc` with the letters as choices);
- continuation scoring: the choices are the option texts; the pick has the highest summed log-probability of its
  tokens divided by the text's length in characters (lm-eval's `acc_norm`, which divides by `len(choice)`).
Context and continuation are tokenized the way lm-eval does it: the tokens of context + continuation, split after
as many tokens as the context alone has. `write_lm_eval_task` writes the very same contexts and choices as a local
lm-eval task, so `lm_eval` on the Hugging Face export can check these figures item for item.

Log-probabilities are computed in batches: sequences are sorted by length, left-padded with an attention mask (the
model then gives each sequence the positions and outputs it has alone) and only the last positions' logits are
computed, so a batch costs a few rows of the vocabulary instead of one per token.

Perplexity: the next-token loss over `{"text"}` documents exactly as pretraining counts it ([bos] + text + [eos],
every token after bos predicted, documents cut to the context length), its exponential, and bits per byte: the
same summed loss in bits over the UTF-8 bytes of the text those tokens cover, which does not depend on the
tokenizer (the end-of-document token is predicted too, and carries no bytes).

Maths: greedy chat replies to `{"question", "answer"}` items; a reply is right when the last number of its answer
part (the `<answer>` of a reasoning reply, else the whole reply) equals the expected number exactly.
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpoint import atomic_write_text
from .common import ConfigError, DataFormatError, MissingInputError, require_file
from .dataset import JsonlRecords, PretrainDataset
from .evaluation import generate_replies, summed_loss
from .inference import split_reasoning
from .model import MiniMindLM

LETTERS = string.ascii_uppercase
SCORINGS = ("letter", "continuation")
TOKENS_PER_ROW = 512  # a scoring batch of B rows holds at most B * TOKENS_PER_ROW tokens (see tail_log_probs)
TARGET_DELIMITER = " "  # between a context and each of its continuations (lm-eval's default target_delimiter)
HEADERS = {
    "zh": "以下是关于{subject}的单项选择题，每题后附答案。\n\n",
    "en": "Multiple-choice questions on {subject}, each followed by its answer.\n\n",
}
ANSWER_CUES = {"zh": "答案：", "en": "Answer:"}
HOW_TO_GET_DATA = ("pass --data_path a jsonl of {\"subject\", \"question\", \"choices\", \"answer\"} lines "
                   "(e.g. ../shared/data/eval/mcq_zh.jsonl) or an official C-Eval / CMMLU folder")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def choose_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """Which of `total` items a run scores: all of them, or `limit` of them drawn at random with `seed` (so every
    subject of a file sorted by subject can appear), kept in file order."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: items and the files they come from


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question; `where` is its file and line, for messages and the report."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice
    where: str


@dataclass
class ChoiceData:
    """The items to score, the solved examples few-shot prompts may draw on (by subject), and the file layout."""

    items: list[ChoiceItem]
    examples: dict[str, list[ChoiceItem]]
    layout: str  # "jsonl", "ceval" or "cmmlu"


def _answer_index(value: Any, choices: int) -> int:
    letters = LETTERS[:choices]
    if not isinstance(value, str) or value.strip().upper() not in letters:
        raise ValueError(f"field 'answer' must be one of {', '.join(letters)}, got {value!r}")
    return letters.index(value.strip().upper())


def _require_string(record: dict, name: str) -> None:
    if name not in record:
        raise ValueError(f"missing field '{name}'")
    if not isinstance(record[name], str):
        raise ValueError(f"field '{name}' must be a string, got {type(record[name]).__name__}")


def validate_choice_record(record: Any) -> None:
    """A multiple-choice line: {"subject": str, "question": str, "choices": [2 to 26 non-empty strings],
    "answer": "A".."Z" within the choices}."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for name in ("subject", "question"):
        _require_string(record, name)
    choices = record.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"field 'choices' must be a list of 2 to {len(LETTERS)} strings")
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise ValueError(f"field 'choices[{index}]' must be non-empty text, got {choice!r}")
    _answer_index(record.get("answer"), len(choices))


def read_choice_jsonl(path: str | Path) -> list[ChoiceItem]:
    """Every line of a multiple-choice jsonl; a malformed line raises DataFormatError naming file, line and field."""
    records = JsonlRecords(require_file(path, HOW_TO_GET_DATA, "benchmark file"), validate_choice_record)
    items = []
    for index in range(len(records)):
        record = records[index]
        items.append(ChoiceItem(record["subject"], record["question"], tuple(c.strip() for c in record["choices"]),
                                _answer_index(record["answer"], len(record["choices"])),
                                f"{path}:{int(records.line_numbers[index])}"))
    records.close()
    return items


CSV_COLUMNS = ("question", "a", "b", "c", "d", "answer")  # case-insensitive: C-Eval is lower case, CMMLU capitalised


def read_choice_csv(path: Path, subject: str) -> list[ChoiceItem]:
    """One subject's questions in the official C-Eval (id,question,A,B,C,D,answer,explanation) or CMMLU
    (,Question,A,B,C,D,Answer) csv layout."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        missing = [name for name in CSV_COLUMNS if name not in columns]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}: expected the C-Eval "
                                  f"(id,question,A,B,C,D,answer,explanation) or CMMLU (Question,A,B,C,D,Answer) header")
        items = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            question = (row[columns["question"]] or "").strip()
            choices = tuple((row[columns[letter]] or "").strip() for letter in "abcd")
            for letter, choice in zip("ABCD", choices):
                if not choice:
                    raise DataFormatError(f"{where}: column '{columns[letter.lower()]}' is empty")
            if not question:
                raise DataFormatError(f"{where}: column '{columns['question']}' is empty")
            try:
                answer = _answer_index(row[columns["answer"]] or "", len(choices))
            except ValueError as error:
                raise DataFormatError(f"{where}: {error}".replace("field 'answer'", f"column '{columns['answer']}'")) \
                    from error
            items.append(ChoiceItem(subject, question, choices, answer, where))
    return items


def _official_layout(root: Path) -> tuple[str, list[tuple[str, Path]], Callable[[str], Path]]:
    """The layout of an official folder, its (subject, csv) files to score, and where a subject's dev file is.
    C-Eval: dev/{subject}_dev.csv, val/{subject}_val.csv (scored: the test split has no answers), test/...;
    CMMLU: dev/{subject}.csv, test/{subject}.csv (scored)."""
    if (root / "val").is_dir():
        files = [(p.name.removesuffix("_val.csv"), p) for p in sorted((root / "val").glob("*_val.csv"))]
        return "ceval", files, lambda subject: root / "dev" / f"{subject}_dev.csv"
    if (root / "test").is_dir():
        files = [(p.stem, p) for p in sorted((root / "test").glob("*.csv"))]
        return "cmmlu", files, lambda subject: root / "dev" / f"{subject}.csv"
    raise ConfigError(f"{root} is a folder but neither the C-Eval layout (val/{{subject}}_val.csv, "
                      f"dev/{{subject}}_dev.csv) nor the CMMLU layout (test/{{subject}}.csv, dev/{{subject}}.csv)")


def load_choice_data(path: str | Path, shots: int = 0, dev_path: str | Path | None = None) -> ChoiceData:
    """The items of a multiple-choice benchmark and, with shots > 0, the solved examples for each subject.

    A jsonl file: every line is scored; the examples come from `dev_path` (a jsonl of the same format) or, without
    it, are the first `shots` items of each subject of the file itself, which are then not scored. An official
    C-Eval folder scores val/ and a CMMLU folder test/; both take their examples from dev/ (the first `shots`)."""
    if shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    path = require_file(path, HOW_TO_GET_DATA, "benchmark data")
    if path.is_dir():
        if dev_path is not None:
            raise ConfigError(f"--dev_path is for jsonl files; {path} is a folder whose dev/ split gives the examples")
        layout, files, dev_file = _official_layout(path)
        if not files:
            expected = "val/*_val.csv" if layout == "ceval" else "test/*.csv"
            raise MissingInputError(f"{path} holds no question files ({expected})")
        items = [item for subject, file in files for item in read_choice_csv(file, subject)]
        examples = {subject: read_choice_csv(require_file(dev_file(subject), "--shots needs the dev split of every "
                                                          "subject (or use --shots 0)", "dev file"), subject)
                    for subject, _ in files} if shots else {}
    else:
        layout, items, examples = "jsonl", read_choice_jsonl(path), {}
        if shots and dev_path is None:
            sizes = Counter(item.subject for item in items)
            for subject, size in sorted(sizes.items()):
                if size <= shots:
                    raise ConfigError(f"--shots {shots}: subject {subject!r} of {path} has {size} item(s), and its "
                                      f"first {shots} would be examples; lower --shots or pass --dev_path")
            scored = []
            for item in items:
                chosen = examples.setdefault(item.subject, [])
                (chosen if len(chosen) < shots else scored).append(item)
            items = scored
        elif shots:
            for item in read_choice_jsonl(dev_path):
                examples.setdefault(item.subject, []).append(item)
    if shots:
        for subject in sorted({item.subject for item in items}):
            found = len(examples.get(subject, []))
            if found < shots:
                raise ConfigError(f"--shots {shots}: subject {subject!r} has {found} solved example(s) in "
                                  f"{dev_path or path}; lower --shots")
    return ChoiceData(items, {subject: chosen[:shots] for subject, chosen in examples.items()}, layout)


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: prompts


def language_of(text: str) -> str:
    """"zh" when the text has a CJK ideograph, else "en": picks the header and the answer cue."""
    return "zh" if re.search(r"[\u3400-\u9fff]", text) else "en"


def question_block(item: ChoiceItem, language: str) -> str:
    """The question, its options one per line ("A. ..."), and the answer cue."""
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question.strip()}{options}\n{ANSWER_CUES[language]}"


def choice_texts(item: ChoiceItem, scoring: str) -> list[str]:
    """What is scored after the delimiter: the option letters, or the option texts."""
    if scoring not in SCORINGS:
        raise ConfigError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    return list(LETTERS[:len(item.choices)]) if scoring == "letter" else list(item.choices)


def choice_context(item: ChoiceItem, examples: Sequence[ChoiceItem], scoring: str, bos_token: str) -> str:
    """The text before the continuations: bos, header, solved examples (each answered the way the item is scored,
    by letter or by text), and the item's question block."""
    language = language_of(item.question)
    solved = "".join(question_block(example, language) + TARGET_DELIMITER
                     + choice_texts(example, scoring)[example.answer] + "\n\n" for example in examples)
    header = HEADERS[language].format(subject=item.subject.replace("_", " "))
    return bos_token + header + solved + question_block(item, language)


@dataclass
class ChoicePrompt:
    """An item as it is scored: the context and the choices that follow it (after the delimiter)."""

    item: ChoiceItem
    context: str
    choices: list[str]


def choice_prompts(data: ChoiceData, tokenizer: PreTrainedTokenizerBase, shots: int, scoring: str,
                   indices: Sequence[int] | None = None) -> list[ChoicePrompt]:
    """The prompts of data.items (or of those at `indices`)."""
    bos = tokenizer.bos_token or ""
    chosen = data.items if indices is None else [data.items[i] for i in indices]
    return [ChoicePrompt(item, choice_context(item, data.examples.get(item.subject, [])[:shots], scoring, bos),
                         choice_texts(item, scoring)) for item in chosen]


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: ChoicePrompt) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each continuation's (delimiter + choice), split as lm-eval splits a pair: the
    continuation is what follows the context's own token count in the tokens of context + continuation, so a
    continuation that merges with the end of the context is scored as the model reads it."""
    context_ids = tokenizer.encode(prompt.context, add_special_tokens=False)
    wholes = tokenizer([prompt.context + TARGET_DELIMITER + choice for choice in prompt.choices],
                       add_special_tokens=False)["input_ids"]
    return context_ids, [list(whole[len(context_ids):]) for whole in wholes]


# ----------------------------------------------------------------------------------------------------------------
# Batched log-probabilities


@torch.inference_mode()
def tail_log_probs(model: MiniMindLM, rows: Sequence[Sequence[int]], tails: Sequence[int], pad_token_id: int = 0,
                   batch_size: int = 16, progress: bool = False, desc: str = "scoring",
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """For each row of token ids, the log-softmax over the vocabulary at its last tails[i] positions, yielded as
    (row index, (tails[i], V) float tensor) in batches of similar lengths (not in row order).

    A batch holds at most batch_size rows and batch_size * TOKENS_PER_ROW tokens with its padding, so long rows
    go in smaller batches (the attention mask of a padded batch grows with rows x length^2). It is left-padded
    with an attention mask, so each row's positions and outputs are those it has alone, and only the last
    max(tails) positions of the batch get logits."""
    device = _device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches, start = [], 0
    while start < len(order):  # the first row of each batch is its longest
        size = max(1, min(batch_size, batch_size * TOKENS_PER_ROW // len(rows[order[start]])))
        batches.append(order[start:start + size])
        start += size
    with tqdm(total=len(rows), desc=desc, unit="seq", disable=not progress) as bar:
        for batch in batches:
            longest, keep = len(rows[batch[0]]), max(tails[i] for i in batch)
            input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros(len(batch), longest, dtype=torch.long)  # (B, T)
            for b, i in enumerate(batch):
                input_ids[b, longest - len(rows[i]):] = torch.tensor(rows[i], dtype=torch.long)
                attention_mask[b, longest - len(rows[i]):] = 1
            mask = None if bool(attention_mask.all()) else attention_mask.to(device)  # no padding: plain causal
            logits = model(input_ids.to(device), attention_mask=mask, logits_to_keep=keep).logits  # (B, keep, V)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            for b, i in enumerate(batch):
                yield i, log_probs[b, keep - tails[i]:]
            bar.update(len(batch))


def continuation_log_probs(model: MiniMindLM, pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int = 0,
                           batch_size: int = 16, progress: bool = False) -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval's loglikelihood). A pair longer
    than the model's context keeps its last max_seq_len + 1 tokens, as lm-eval does."""
    room = model.config.max_seq_len + 1
    rows, tails = [], []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("an empty continuation has no log-probability")
        tokens = (list(context) + list(continuation))[-room:]
        rows.append(tokens[:-1])
        tails.append(len(continuation))
    summed = [0.0] * len(pairs)
    for i, log_probs in tail_log_probs(model, rows, tails, pad_token_id, batch_size, progress, "continuations"):
        targets = torch.tensor(pairs[i][1], device=log_probs.device)  # (tail,)
        summed[i] = float(log_probs.gather(-1, targets[:, None]).sum())
    return summed


def letter_log_probs(model: MiniMindLM, contexts: Sequence[list[int]], letters: Sequence[list[int]],
                     pad_token_id: int = 0, batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """For each context, the next-token log-probability of each of its letter tokens: one forward pass scores all
    the options of a question. A context longer than the model's keeps its last max_seq_len tokens."""
    room = model.config.max_seq_len
    rows = [list(context)[-room:] for context in contexts]
    scores: list[list[float]] = [[] for _ in contexts]
    for i, log_probs in tail_log_probs(model, rows, [1] * len(rows), pad_token_id, batch_size, progress, "questions"):
        scores[i] = log_probs[0, letters[i]].tolist()
    return scores


def letter_tokens(tokenizer: PreTrainedTokenizerBase, prompt: ChoicePrompt) -> tuple[list[int], list[int]]:
    """The context tokens and the one token of each letter continuation (" A", " B", ...) after it. A tokenizer
    that splits a letter continuation into several tokens cannot be scored by letter: ConfigError."""
    context_ids, continuations = prompt_tokens(tokenizer, prompt)
    for letter, continuation in zip(prompt.choices, continuations):
        if len(continuation) != 1:
            raise ConfigError(f"{prompt.item.where}: after this prompt the tokenizer makes "
                              f"{TARGET_DELIMITER + letter!r} {len(continuation)} tokens, so letters cannot be "
                              f"scored as one next token: use --scoring continuation")
    return context_ids, [continuation[0] for continuation in continuations]


# ----------------------------------------------------------------------------------------------------------------
# Tallies and findings


@dataclass
class Tally:
    """Right answers among items, and how many a uniform random guess would get right on average."""

    items: int = 0
    correct: int = 0
    expected_by_chance: float = 0.0

    def add(self, correct: bool, chance: float = 0.0) -> None:
        self.items += 1
        self.correct += int(correct)
        self.expected_by_chance += chance

    @property
    def accuracy(self) -> float:
        return self.correct / self.items if self.items else float("nan")

    @property
    def chance(self) -> float:
        return self.expected_by_chance / self.items if self.items else float("nan")


def tally_by_group(groups: Sequence[str], correct: Sequence[bool], chances: Sequence[float] | None = None,
                   ) -> tuple[dict[str, Tally], Tally]:
    """Tallies per group (sorted by name) and over all items; `chances` is each item's probability of a right
    random guess (1 / number of choices)."""
    chances = chances if chances is not None else [0.0] * len(groups)
    per_group: dict[str, Tally] = {}
    overall = Tally()
    for group, right, chance in zip(groups, correct, chances, strict=True):
        per_group.setdefault(group, Tally()).add(right, chance)
        overall.add(right, chance)
    return dict(sorted(per_group.items())), overall


@dataclass
class Findings:
    """What a benchmark found: headline figures, a table (columns and rows) and one record per item."""

    figures: dict[str, float | int]
    columns: list[str]
    rows: list[list[Any]]
    items: list[dict] = field(default_factory=list)


PERCENT_FIGURES = ("accuracy", "subject_mean", "chance")


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _figure(key: str, value: float | int) -> str:
    """A headline figure as the markdown card shows it: shares in percent, other reals to 4 decimals."""
    if key in PERCENT_FIGURES:
        return _percent(value)
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


# ----------------------------------------------------------------------------------------------------------------
# The three benchmarks


def evaluate_choices(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[ChoicePrompt],
                     scoring: str, batch_size: int = 16, progress: bool = False) -> Findings:
    """Score every prompt's choices and tally accuracy per subject and overall against the chance level.

    `accuracy` counts every item alike; `subject_mean` is the mean of the subjects' accuracies (C-Eval's average)."""
    pad = tokenizer.pad_token_id or 0
    if scoring == "letter":
        tokens = [letter_tokens(tokenizer, prompt) for prompt in prompts]
        log_probs = letter_log_probs(model, [context for context, _ in tokens], [ids for _, ids in tokens], pad,
                                     batch_size, progress)
        scores = log_probs
    elif scoring == "continuation":
        pairs = []
        for prompt in prompts:
            context, continuations = prompt_tokens(tokenizer, prompt)
            pairs += [(context, continuation) for continuation in continuations]
        flat = continuation_log_probs(model, pairs, pad, batch_size, progress)
        log_probs, start = [], 0
        for prompt in prompts:
            log_probs.append(flat[start:start + len(prompt.choices)])
            start += len(prompt.choices)
        scores = [[lp / len(choice) for lp, choice in zip(row, prompt.choices)]
                  for row, prompt in zip(log_probs, prompts)]
    else:
        raise ConfigError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    picks = [max(range(len(row)), key=row.__getitem__) for row in scores]
    correct = [pick == prompt.item.answer for pick, prompt in zip(picks, prompts)]
    per_subject, overall = tally_by_group([p.item.subject for p in prompts], correct,
                                          [1 / len(p.item.choices) for p in prompts])
    subject_mean = sum(t.accuracy for t in per_subject.values()) / len(per_subject) if per_subject else float("nan")
    rows = [[subject, t.items, t.correct, _percent(t.accuracy), _percent(t.chance)]
            for subject, t in per_subject.items()]
    rows.append(["all", overall.items, overall.correct, _percent(overall.accuracy), _percent(overall.chance)])
    items = [{"where": p.item.where, "subject": p.item.subject, "answer": LETTERS[p.item.answer],
              "pick": LETTERS[pick], "correct": right, "log_probs": [round(v, 5) for v in row]}
             for p, pick, right, row in zip(prompts, picks, correct, log_probs)]
    figures = {"accuracy": overall.accuracy, "subject_mean": subject_mean, "chance": overall.chance,
               "items": overall.items, "correct": overall.correct, "subjects": len(per_subject)}
    return Findings(figures, ["subject", "items", "correct", "accuracy", "chance"], rows, items)


@dataclass
class TextScore:
    """The summed next-token loss of some documents and what it is counted over."""

    documents: int
    tokens: int  # predicted tokens: each document's tokens after bos, its eos included
    bytes: int  # UTF-8 bytes of the text those tokens cover
    nats: float
    truncated: int  # documents longer than the context, scored on their first max_length tokens

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes


def scored_bytes(dataset: PretrainDataset, index: int) -> tuple[int, bool]:
    """UTF-8 bytes of the text a document's scored tokens cover, and whether the document was cut to
    dataset.max_length tokens (then the bytes of the kept text tokens, without a character they cut in half)."""
    ids, _ = dataset.document(index)
    text = dataset.records[index]["text"]
    if len(ids) <= dataset.max_length:
        return len(text.encode("utf-8")), False
    kept = dataset.tokenizer.decode(ids[1:dataset.max_length], skip_special_tokens=True).rstrip("\ufffd")
    return len(kept.encode("utf-8")), True


def score_text(model: MiniMindLM, dataset: PretrainDataset, indices: Sequence[int] | None = None,
               batch_size: int = 16, progress: bool = False) -> TextScore:
    """The next-token loss of the documents (all, or those at `indices`) as pretraining computes it, with the
    token and byte counts perplexity and bits per byte divide by."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    nats, tokens = summed_loss(model, Subset(dataset, indices), batch_size, dataset.tokenizer.pad_token_id or 0,
                               progress)
    counted = [scored_bytes(dataset, i) for i in indices]
    return TextScore(len(indices), tokens, sum(b for b, _ in counted), nats, sum(cut for _, cut in counted))


def evaluate_text(model: MiniMindLM, dataset: PretrainDataset, indices: Sequence[int] | None = None,
                  batch_size: int = 16, progress: bool = False) -> Findings:
    """Held-out loss, perplexity and bits per byte of pretraining-format documents."""
    score = score_text(model, dataset, indices, batch_size, progress)
    figures = {"loss": score.loss, "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte,
               "documents": score.documents, "tokens": score.tokens, "bytes": score.bytes,
               "truncated_documents": score.truncated}
    rows = [["loss (nats per token)", f"{score.loss:.4f}"], ["perplexity", f"{score.perplexity:.2f}"],
            ["bits per byte", f"{score.bits_per_byte:.4f}"], ["documents", f"{score.documents:,}"],
            ["tokens scored", f"{score.tokens:,}"], ["bytes of text", f"{score.bytes:,}"],
            ["documents cut to the context", f"{score.truncated:,}"]]
    return Findings(figures, ["figure", "value"], rows)


# Maths: numbers in replies

_FULL_WIDTH = str.maketrans({**{chr(0xFF10 + d): str(d) for d in range(10)},  # full-width digits, minus, dot, slash
                             "\u2212": "-", "\uff0e": ".", "\uff0f": "/"})
_DECIMAL = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"  # "1,234.5": commas only between thousands
_NUMBER = re.compile(rf"(?<![0-9.]){_DECIMAL}(?:\s*/\s*{_DECIMAL})?")  # a decimal, or a fraction "2/7"
_SIGN_BREAKERS = set(string.ascii_letters + string.digits + ")]")  # "5-3", "x-3", ")-3": a minus, not a sign


def _to_fraction(number: str) -> Fraction | None:
    """An exact value of a _NUMBER match (None for a zero denominator)."""
    numerator, _, denominator = number.replace(",", "").replace(" ", "").partition("/")
    if denominator and Fraction(denominator) == 0:
        return None
    return Fraction(numerator) / (Fraction(denominator) if denominator else 1)


def numbers_in(text: str) -> list[Fraction]:
    """The numbers of a text in order, as exact fractions: thousands separators ("1,234"), decimals ("3.50"),
    fractions ("2/7"), full-width digits; a "-" is a sign only where it cannot be a minus (not after a letter,
    digit or bracket: "x = -3" is -3, "5-3" is 5 and 3)."""
    text = text.translate(_FULL_WIDTH)
    found = []
    for match in _NUMBER.finditer(text):
        value = _to_fraction(match.group())
        if value is None:
            continue
        start = match.start()
        if start and text[start - 1] == "-" and (start < 2 or text[start - 2] not in _SIGN_BREAKERS):
            value = -value
        found.append(value)
    return found


def parse_number(text: str) -> Fraction | None:
    """The number `text` is, all of it ("18", "-2.5", "1,000", "2/7"), or None. A percentage is its number
    ("12%" is 12), as numbers_in reads "12%" in a reply."""
    text = text.translate(_FULL_WIDTH).strip().removesuffix("%")
    body = text.removeprefix("-")
    if not _NUMBER.fullmatch(body):
        return None
    value = _to_fraction(body)
    return None if value is None else -value if body != text else value


def final_number(reply: str) -> Fraction | None:
    """The last number of a reply's answer part (split_reasoning: the `<answer>` of a reasoning reply, the whole
    reply when it has no think part, nothing when it was cut off while thinking), or None."""
    found = numbers_in(split_reasoning(reply)[1])
    return found[-1] if found else None


@dataclass(frozen=True)
class MathItem:
    question: str
    answer: Fraction
    answer_text: str
    source: str  # the group the report tallies it under (e.g. gsm8k, cmath)
    where: str


def validate_math_record(record: Any) -> None:
    """A maths line: {"question": str, "answer": a number as a string or JSON number, "source": optional str}."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    _require_string(record, "question")
    if "answer" not in record:
        raise ValueError("missing field 'answer'")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or parse_number(str(answer)) is None:
        raise ValueError(f"field 'answer' must be a number such as 18, -2.5, 1,000, 2/7 or 12%, got {answer!r}")
    if "source" in record and not isinstance(record["source"], str):
        raise ValueError(f"field 'source' must be a string, got {type(record['source']).__name__}")


def read_math_jsonl(path: str | Path) -> list[MathItem]:
    """Every line of a maths jsonl; a malformed line raises DataFormatError naming file, line and field."""
    how = "pass --data_path a jsonl of {\"question\", \"answer\"} lines (e.g. ../shared/data/eval/gen_math.jsonl)"
    records = JsonlRecords(require_file(path, how, "benchmark file"), validate_math_record)
    items = []
    for index in range(len(records)):
        record = records[index]
        answer = str(record["answer"])
        items.append(MathItem(record["question"], parse_number(answer), answer, record.get("source", "all"),
                              f"{path}:{int(records.line_numbers[index])}"))
    records.close()
    return items


def evaluate_math(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, items: Sequence[MathItem],
                  max_new_tokens: int = 256, batch_size: int = 16, progress: bool = False) -> Findings:
    """Greedy chat replies to every question (chat template with the generation prompt), exact match of the final
    number, per source and overall; `answered` counts replies that hold a number at all."""
    replies: list[str] = []
    with tqdm(total=len(items), desc="replies", unit="question", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            replies += generate_replies(model, tokenizer, [[{"role": "user", "content": item.question}]
                                                           for item in chunk], max_new_tokens, len(chunk))
            bar.update(len(chunk))
    extracted = [final_number(reply) for reply in replies]
    correct = [value is not None and value == item.answer for value, item in zip(extracted, items)]
    per_source, overall = tally_by_group([item.source for item in items], correct)
    answered = sum(value is not None for value in extracted)
    rows = [[source, t.items, t.correct, _percent(t.accuracy)] for source, t in per_source.items()]
    rows.append(["all", overall.items, overall.correct, _percent(overall.accuracy)])
    records = [{"where": item.where, "source": item.source, "expected": item.answer_text,
                "extracted": None if value is None else str(value), "correct": right, "reply": reply}
               for item, value, right, reply in zip(items, extracted, correct, replies)]
    figures = {"accuracy": overall.accuracy, "items": overall.items, "correct": overall.correct,
               "answered": answered}
    return Findings(figures, ["source", "items", "correct", "accuracy"], rows, records)


# ----------------------------------------------------------------------------------------------------------------
# lm-eval: the same prompts as a local task


def lm_eval_task_name(name: str) -> str:
    """A task name lm-eval accepts (letters, digits, underscores) made from a report name."""
    return "minimind_" + re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def write_lm_eval_task(prompts: Sequence[ChoicePrompt], scoring: str, folder: str | Path, task: str) -> Path:
    """Write `prompts` as a local lm-eval multiple-choice task, `{folder}/{task}.yaml` reading `{task}.jsonl`
    (context, choices, gold), and return the YAML's path. Run it on the Hugging Face export with
    `lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --include_path FOLDER --tasks TASK`; its `acc`
    (letter scoring) or `acc_norm` (continuation scoring) is the accuracy this module computes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / f"{task}.jsonl"
    atomic_write_text(docs, "".join(json.dumps({"context": p.context, "choices": p.choices, "gold": p.item.answer,
                                                "subject": p.item.subject}, ensure_ascii=False) + "\n"
                                    for p in prompts))
    metric = "acc" if scoring == "letter" else "acc_norm"
    yaml = "\n".join([
        f"# Written by scripts/eval_bench.py ({scoring} scoring): lm-eval's {metric} equals its accuracy.",
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(docs.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        f"target_delimiter: {json.dumps(TARGET_DELIMITER)}",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])
    path = folder / f"{task}.yaml"
    atomic_write_text(path, yaml)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The report card


def model_summary(model: MiniMindLM, source: str, lora: str | None = None) -> dict:
    """What a report card says about the model: where its weights came from, its shape and its size."""
    config = model.config
    shape = {name: getattr(config, name) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                      "use_moe", "max_seq_len")}
    return {"source": source, "lora": lora, "parameters": model.num_parameters(), "config": shape}


@dataclass
class ReportCard:
    """Everything a benchmark run measured and what it measured it on, as JSON and as markdown."""

    task: str
    model: dict  # source, adapter, architecture, parameters
    data: dict  # path, layout, items in the file and scored
    settings: dict  # limit, seed, shots, scoring, batch size, ...
    findings: Findings
    device: str
    precision: str
    seconds: float

    def to_json(self) -> str:
        card = {key: value for key, value in asdict(self).items() if key != "findings"}
        card["figures"] = self.findings.figures
        card["table"] = [dict(zip(self.findings.columns, row)) for row in self.findings.rows]
        card["items"] = self.findings.items
        return json.dumps(card, ensure_ascii=False, indent=1) + "\n"

    def table(self) -> str:
        lines = ["| " + " | ".join(self.findings.columns) + " |",
                 "|" + "|".join("---" for _ in self.findings.columns) + "|"]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in self.findings.rows]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        model, data = self.model, self.data
        architecture = ", ".join(f"{key} {value}" for key, value in model["config"].items())
        settings = ", ".join(f"{key} {value}" for key, value in self.settings.items())
        headline = ", ".join(f"{key} {_figure(key, value)}" for key, value in self.findings.figures.items())
        return "\n".join([
            f"# {self.task} report card",
            "",
            f"- model: `{model['source']}`" + (f" + LoRA `{model['lora']}`" if model.get("lora") else "")
            + f", {model['parameters']:,} parameters ({architecture})",
            f"- data: `{data['path']}` ({data['layout']}), {data['scored']:,} of {data['items']:,} items scored",
            f"- settings: {settings}",
            f"- figures: {headline}",
            f"- time: {self.seconds:.1f} s on {self.device}, {self.precision}",
            "",
            self.table(),
            "",
        ])

    def write(self, folder: str | Path, name: str) -> tuple[Path, Path]:
        """`{folder}/{name}.json` and `{folder}/{name}.md`, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = folder / f"{name}.json", folder / f"{name}.md"
        atomic_write_text(json_path, self.to_json())
        atomic_write_text(markdown_path, self.to_markdown())
        return json_path, markdown_path
