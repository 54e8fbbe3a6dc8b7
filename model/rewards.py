"""Rewards for reinforcement learning: rule-based ones that need no model, and a Hugging Face reward model.

Each reward scores a completion (the assistant reply text) of a sample `{"conversations": [...], "answer": "42"}`
(answer optional), as a float; `--rewards format:0.5,exact:1,length:0.1` combines them with weights:
  * format:  1 if the reply is exactly <think>...</think> then <answer>...</answer> (whitespace between allowed), else 0;
  * exact:   1 if the reply's final answer (the <answer> part when there is one, else the reply) ends with a number
             equal to the sample's "answer" (42, 42.0, 4.2e1, 1,234, and simple Chinese numerals such as 四十二 are
             normalised), or equals its text; else 0;
  * tool:    1 if the reply's tool calls are all well formed and name an offered tool, 0 if a call block is
             malformed or names an unknown tool; 0.5 for no call (neither right nor wrong);
  * length:  -len(reply tokens) / max_new_tokens (a penalty, so shorter replies are preferred at equal merit);
  * model:   the score of a sequence-classification reward model (`--reward_model DIR`) on the conversation.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_calls

FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
CHINESE_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
CHINESE_UNITS = {"十": 10, "百": 100, "千": 1000}
CHINESE_SECTIONS = {"万": 10_000, "亿": 100_000_000}
CHINESE_NUMBER = re.compile(r"负?[零〇一二两三四五六七八九十百千万亿]+(?:点[零〇一二三四五六七八九]+)?")


def chinese_to_number(text: str) -> float | None:
    """The value of a simple Chinese numeral (四十二 -> 42, 一万零五 -> 10005, 三点五 -> 3.5, 负七 -> -7)."""
    if not text or not CHINESE_NUMBER.fullmatch(text):
        return None
    sign = -1 if text.startswith("负") else 1
    text = text.removeprefix("负")
    whole, _, fraction = text.partition("点")
    hundred_millions, ten_thousands, section, digit = 0, 0, 0, None  # the parts closed by 亿, by 万, the open one
    for char in whole:
        if char in CHINESE_DIGITS:
            digit = CHINESE_DIGITS[char]
        elif char in CHINESE_UNITS:
            section += (1 if digit is None else digit) * CHINESE_UNITS[char]
            digit = None
        elif char == "万":
            ten_thousands += (section + (digit or 0)) * CHINESE_SECTIONS[char]
            section, digit = 0, None
        else:  # 亿 closes everything before it
            hundred_millions += (ten_thousands + section + (digit or 0)) * CHINESE_SECTIONS[char]
            ten_thousands, section, digit = 0, 0, None
    value = hundred_millions + ten_thousands + section + (digit or 0)
    if fraction:
        value += float("0." + "".join(str(CHINESE_DIGITS[c]) for c in fraction))
    return sign * value


def to_number(text: str) -> float | None:
    """A number written with digits (commas allowed) or in simple Chinese numerals; None otherwise."""
    text = text.strip()
    if NUMBER.fullmatch(text):
        try:
            return float(text.replace(",", ""))
        except ValueError:
            return None
    return chinese_to_number(text)


def final_answer(reply: str) -> str:
    """The <answer> part of a reasoning reply (the last one), else the whole reply, stripped."""
    parts = ANSWER.findall(reply)
    return (parts[-1] if parts else reply).strip()


def last_number(text: str) -> float | None:
    """The last number in text, digits or Chinese numerals (whichever comes last)."""
    found = [(m.end(), m.group()) for m in NUMBER.finditer(text)] + [(m.end(), m.group()) for m in CHINESE_NUMBER.finditer(text)]
    for _, candidate in sorted(found, reverse=True):
        value = to_number(candidate)
        if value is not None:
            return value
    return None


def answers_match(reply: str, reference: str) -> bool:
    """The reply's final answer equals the reference: as numbers when the reference is one, else as text."""
    answer = final_answer(reply)
    expected = to_number(str(reference))
    if expected is not None:
        got = last_number(answer)
        return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))
    return answer.strip().rstrip("。.!！").strip() == str(reference).strip()


# ----------------------------------------------------------------------------------------------------------------
# Rewards by name


@dataclass
class Sample:
    """What a reward sees of one rollout."""
    messages: list[dict]  # the prompt conversation
    reply: str
    reply_tokens: int
    answer: str | None = None  # the sample's reference answer, if it has one
    tools: list[dict] | None = None  # the tools offered in the prompt


def format_reward(sample: Sample, max_new_tokens: int) -> float:
    return float(FORMAT.fullmatch(sample.reply) is not None)


def exact_reward(sample: Sample, max_new_tokens: int) -> float:
    return float(sample.answer is not None and answers_match(sample.reply, sample.answer))


def tool_reward(sample: Sample, max_new_tokens: int) -> float:
    content, calls = parse_tool_calls(sample.reply)
    if TOOL_CALL_OPEN in content or TOOL_CALL_CLOSE in content:  # a block that did not parse
        return 0.0
    if not calls:
        return 0.5
    offered = {tool.get("function", tool).get("name") for tool in sample.tools or []}
    return float(all(call.name in offered for call in calls))


def length_reward(sample: Sample, max_new_tokens: int) -> float:
    return -sample.reply_tokens / max_new_tokens


RULE_REWARDS: dict[str, Callable[[Sample, int], float]] = {
    "format": format_reward, "exact": exact_reward, "tool": tool_reward, "length": length_reward}
REWARD_NAMES = (*RULE_REWARDS, "model")


def parse_reward_weights(spec: str) -> dict[str, float]:
    """'format:0.5,exact:1' -> {"format": 0.5, "exact": 1.0} (a name alone weighs 1). ValueError names a bad part."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        if name not in REWARD_NAMES:
            raise ValueError(f"--rewards: unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight of {name!r} must be a number, got {weight!r}") from None
    if not weights:
        raise ValueError("--rewards: name at least one reward, e.g. exact:1")
    return weights


class RewardModel:
    """A reward model from a local Hugging Face folder (no network) that scores a conversation ending with the
    reply: a sequence-classification model with one output logit (its own tokenizer and chat template render the
    conversation), or a model whose remote code offers `get_score(tokenizer, conversation)` (the InternLM2 reward
    models the MiniMind release uses load as AutoModel with that method)."""

    def __init__(self, path: str | Path, device: torch.device):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        auto_map = getattr(AutoConfig.from_pretrained(path, trust_remote_code=True), "auto_map", None) or {}
        loader = AutoModel if "AutoModel" in auto_map and "AutoModelForSequenceClassification" not in auto_map \
            else AutoModelForSequenceClassification
        self.model = loader.from_pretrained(path, trust_remote_code=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        scores = []
        for sample in samples:
            conversation = sample.messages + [{"role": "assistant", "content": sample.reply}]
            if hasattr(self.model, "get_score"):
                scores.append(float(self.model.get_score(self.tokenizer, conversation)))
            elif self.tokenizer.chat_template:
                scores.append(self._logit(self.tokenizer.apply_chat_template(conversation, tokenize=False)))
            else:
                scores.append(self._logit("\n".join(f"{m['role']}: {m['content']}" for m in conversation)))
        return scores

    def _logit(self, text: str) -> float:
        ids = self.tokenizer(text, return_tensors="pt", truncation=True).to(self.device)
        return float(self.model(**ids).logits[0, 0])


class Rewards:
    """The weighted sum of the chosen rewards, per sample, with each reward's mean kept for logging."""

    def __init__(self, weights: dict[str, float], max_new_tokens: int, reward_model: RewardModel | None = None):
        if "model" in weights and reward_model is None:
            raise ValueError("--rewards model needs --reward_model DIR")
        self.weights, self.max_new_tokens, self.reward_model = weights, max_new_tokens, reward_model

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, dict[str, float]]:
        """(total reward per sample (B,), mean of each named reward)."""
        parts: dict[str, list[float]] = {}
        for name in self.weights:
            if name == "model":
                parts[name] = self.reward_model.score(samples)
            else:
                parts[name] = [RULE_REWARDS[name](s, self.max_new_tokens) for s in samples]
        total = torch.zeros(len(samples), dtype=torch.float32)
        for name, values in parts.items():
            total += self.weights[name] * torch.tensor(values, dtype=torch.float32)
        return total, {f"reward_{name}": sum(v) / len(v) for name, v in parts.items()}
