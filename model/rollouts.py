"""Rollouts for the RL stages (train_grpo.py, train_ppo.py): prompts in; sampled completions, their rewards and
their log-probabilities out; kept for the several updates one batch of rollouts gets.

Data: jsonl lines `{"conversations": [...], "answer": "42", "tools": [...]}` ("answer" and "tools" optional). The
prompt is the conversation up to its last user (or tool) turn; a trailing assistant turn (SFT data reused) is
left out. The chat template renders it with the generation prompt, cut from the left to --max_seq_len tokens.

A batch of B prompts becomes N = B * G completions (G = --num_generations, the copies of a prompt consecutive),
sampled by the KV-cache batched generator with a seed drawn from (--seed, rank, rollouts made so far), so a
resumed run samples exactly what the uninterrupted one did. A completion is its tokens through the first eos
(which is counted: the model learns when to stop), at most --max_gen_len.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .dataset import JsonlDataset, conversation_and_tools, validate_messages
from .inference import build_prompt
from .model import MiniMindLM
from .rewards import REWARD_NAMES, RewardModel, Rewards, Sample, parse_reward_weights
from .rl import token_log_probs

# ----------------------------------------------------------------------------------------------------------------
# Prompts


def validate_prompt_record(record: Any) -> None:
    """An RL line: `{"conversations": [...]}` ending with a user or tool turn (or an assistant turn, dropped),
    optionally `"answer"` (a string or number) and `"tools"`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError("missing field 'conversations'")
    messages = record["conversations"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'conversations' must be a non-empty list of messages")
    prompt = prompt_messages(messages)
    if not prompt or prompt[-1].get("role") not in ("user", "tool"):
        raise ValueError("field 'conversations' must end with a user turn (optionally followed by the reference reply)")
    validate_messages(prompt + [{"role": "assistant", "content": ""}], "conversations")
    if "answer" in record and not isinstance(record["answer"], (str, int, float)):
        raise ValueError(f"field 'answer' must be a string or a number, got {type(record['answer']).__name__}")


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation without a trailing assistant turn."""
    return messages[:-1] if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant" else messages


class PromptDataset(JsonlDataset):
    """Item i: (i, prompt token ids). `sample(i, reply, tokens)` makes the Sample a reward scores."""

    validate = staticmethod(validate_prompt_record)

    def prompt(self, index: int) -> tuple[list[dict], list[dict] | None]:
        record = self.records[index]
        messages, tools = conversation_and_tools({**record, "conversations": prompt_messages(record["conversations"])})
        return messages, tools

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        messages, tools = self.prompt(index)
        return index, build_prompt(self.tokenizer, messages, self.max_length, tools=tools)

    def sample(self, index: int, reply: str, reply_tokens: int) -> Sample:
        messages, tools = self.prompt(index)
        answer = self.records[index].get("answer")
        return Sample(messages, reply, reply_tokens, None if answer is None else str(answer), tools)


@dataclass
class PromptBatch:
    """B prompts, left-padded. The engine reads input_ids' width and useful_tokens (set to the tokens a step
    processes once its rollouts exist)."""

    input_ids: torch.Tensor  # (B, P) long
    attention_mask: torch.Tensor  # (B, P) long, 0 on the left padding
    index: torch.Tensor  # (B,) long: the dataset items
    useful_tokens: int = 0

    def to(self, device: torch.device) -> PromptBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class PromptCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[int, list[int]]]) -> PromptBatch:
        width = max(len(ids) for _, ids in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        return PromptBatch(input_ids, attention_mask, torch.tensor([i for i, _ in items]),
                           useful_tokens=int(attention_mask.sum()))


# ----------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities


def unwrap(model: nn.Module) -> MiniMindLM:
    """The policy MiniMindLM inside DDP / DeepSpeed / torch.compile wrappers and an actor-critic pair (for
    generation, which needs no wrapper)."""
    while not isinstance(model, MiniMindLM):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "policy")
    return model


@dataclass
class Rollout:
    """One micro-batch of prompts with its N = B * G completions and what the updates need of them."""

    sequences: torch.Tensor  # (N, P + C) prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # (N, P + C) 0 on the prompts' left padding
    completion_mask: torch.Tensor  # (N, C) float, 1 on completion tokens (through the first eos)
    rewards: torch.Tensor  # (N,) float
    old_logp: torch.Tensor  # (N, C) log-probs under the policy that sampled (the first update's weights)
    ref_logp: torch.Tensor  # (N, C) log-probs under the frozen reference
    extra: dict[str, torch.Tensor]  # what a stage adds: advantages, values, returns, ...
    uses: int = 0  # updates made with it so far

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.completion_mask.shape[1]

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@torch.no_grad()
def sample_completions(policy: MiniMindLM, batch: PromptBatch, group_size: int, max_new_tokens: int,
                       temperature: float, top_p: float, eos_token_id: int, pad_token_id: int,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences (N, P + C), attention_mask (N, P + C), completion_mask (N, C)) for G samples of each prompt.
    The policy samples in eval mode (no dropout) and is put back in the mode it was in."""
    was_training = policy.training
    policy.eval()
    prompts = batch.input_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, dim=0)
    completions = policy.generate(prompts, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id, seed=seed).clone()  # clone: leave inference mode
    policy.train(was_training)
    is_eos = completions == eos_token_id
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # positions past a row's first eos
    completion_mask = (~after_eos).float()
    sequences = torch.cat([prompts, completions], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completions)], dim=1)
    return sequences, attention_mask, completion_mask


def completion_log_probs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_len: int) -> tuple[torch.Tensor, Any]:
    """(log-probs (N, C) of the completion tokens under `model`, the forward's output)."""
    out = model(sequences, attention_mask=attention_mask)
    logits = out.logits[:, prompt_len - 1:-1]  # position t predicts token t + 1
    return token_log_probs(logits, sequences[:, prompt_len:]), out


# ----------------------------------------------------------------------------------------------------------------
# The flags and the pieces every RL stage shares


def add_rl_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rollouts and rewards")
    group.add_argument("--num_generations", type=int, default=4, help="completions sampled per prompt (G)")
    group.add_argument("--max_gen_len", type=int, default=256, help="completion length limit in tokens")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    group.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts (1 = off)")
    group.add_argument("--rewards", default="exact:1",
                       help=f"rewards and weights, e.g. format:0.5,exact:1,length:0.1 (from {', '.join(REWARD_NAMES)})")
    group.add_argument("--reward_model", default=None,
                       help="a Hugging Face sequence-classification reward model folder (for the 'model' reward)")
    group.add_argument("--beta", type=float, default=0.04, help="KL penalty weight against the frozen reference")
    group.add_argument("--epsilon", type=float, default=0.2, help="clip range of the policy ratio: [1 - eps, 1 + eps_high]")
    group.add_argument("--epsilon_high", type=float, default=None, help="upper clip (default: --epsilon)")
    group.add_argument("--updates_per_batch", type=int, default=1,
                       help="optimizer steps on each batch of rollouts, reusing their stored log-probs")


def check_rl_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_generations", "max_gen_len", "updates_per_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.beta < 0 or args.epsilon <= 0 or args.temperature <= 0:
        parser.error("--beta must be >= 0, --epsilon and --temperature > 0")
    try:
        args.reward_weights = parse_reward_weights(args.rewards)
    except ValueError as error:
        parser.error(str(error))
    if "model" in args.reward_weights and not args.reward_model:
        parser.error("--rewards model needs --reward_model DIR")


def build_rewards(args: argparse.Namespace, device: torch.device) -> Rewards:
    model = RewardModel(args.reward_model, device) if "model" in args.reward_weights else None
    return Rewards(args.reward_weights, args.max_gen_len, model)


class RolloutStage:
    """What GRPO and PPO share: for each micro-batch of prompts, make the rollout once (`make_rollout`, which a
    stage extends with its own `extra` through `complete`) and hand it to the next updates_per_batch calls; the
    rollouts in use and the count of rollouts made (the sampling seed) are the state of a resumed run."""

    def __init__(self, args: argparse.Namespace, rank: int, tokenizer: PreTrainedTokenizerBase,
                 dataset: PromptDataset, reference: nn.Module, rewards: Rewards):
        self.args, self.rank, self.tokenizer, self.dataset = args, rank, tokenizer, dataset
        self.reference, self.rewards = reference, rewards
        self.rollouts: dict[tuple[int, ...], Rollout] = {}
        self.made = 0

    def rollout_for(self, model: nn.Module, batch: PromptBatch) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """The batch's rollout (made now, or kept from the previous update on the same data) and its metrics."""
        key = tuple(batch.index.tolist())
        rollout = self.rollouts.get(key)
        if rollout is None:
            rollout = self.make_rollout(model, batch)
            self.rollouts[key] = rollout
        rollout.uses += 1
        if rollout.uses == self.args.updates_per_batch:
            del self.rollouts[key]
        batch.useful_tokens = int(rollout.attention_mask.sum())
        mask = rollout.completion_mask
        metrics = {"reward": rollout.rewards.mean(), "reward_std": rollout.rewards.std(unbiased=False),
                   "length": mask.sum(dim=1).mean(), **{k: v for k, v in rollout.extra.items() if k.startswith("reward_")}}
        return rollout, metrics

    def make_rollout(self, model: nn.Module, batch: PromptBatch) -> Rollout:
        args, tokenizer = self.args, self.tokenizer
        seed = args.seed * 1_000_003 + self.rank * 7919 + self.made
        self.made += 1
        sequences, attention_mask, completion_mask = sample_completions(
            unwrap(model), batch, args.num_generations, args.max_gen_len, args.temperature, args.top_p,
            tokenizer.eos_token_id, tokenizer.pad_token_id or 0, seed)
        prompt_len = batch.input_ids.shape[1]
        samples = []
        for row, index in enumerate(batch.index.repeat_interleave(args.num_generations).tolist()):
            tokens = sequences[row, prompt_len:][completion_mask[row].bool()].tolist()
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=False)
            samples.append(self.dataset.sample(index, text, len(tokens)))
        rewards, reward_means = self.rewards(samples)
        with torch.no_grad():
            ref_logp, _ = completion_log_probs(self.reference, sequences, attention_mask, prompt_len)
            old_logp, old_out = completion_log_probs(model, sequences, attention_mask, prompt_len)
        rollout = Rollout(sequences, attention_mask, completion_mask, rewards.to(sequences.device), old_logp, ref_logp,
                          {k: torch.tensor(v) for k, v in reward_means.items()})
        self.complete(rollout, old_out)
        return rollout

    def complete(self, rollout: Rollout, out: Any) -> None:
        """A stage adds what its updates need to rollout.extra (GRPO: advantages; PPO: values, returns, ...)."""

    def state_dict(self) -> dict:
        return {"made": self.made, "rollouts": [(list(k), r.state_dict()) for k, r in self.rollouts.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.made = state["made"]
        self.rollouts = {tuple(k): Rollout(**r) for k, r in state["rollouts"]}

