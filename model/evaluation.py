"""Measuring a trained model: batched greedy replies, the mean loss over a dataset, and per-sequence log-probs.

Everything runs under `torch.inference_mode()` in batches, on whatever device and dtype the model is on:

    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": "Where does Kalo live?"}]])
    loss = mean_loss(model, PretrainDataset("held_out.jsonl", tokenizer, 128))
    chosen, rejected = preference_log_probs(model, DPODataset("pairs.jsonl", tokenizer, 128))
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .dataset import DPOCollator, PadCollator
from .inference import build_prompt
from .model import MiniMindLM
from .tools import Tool, ToolRound, take_turn
from .trainer import sequence_log_probs


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_replies(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
                     max_new_tokens: int = 64, batch_size: int = 64, tools: list[dict] | None = None) -> list[str]:
    """The greedy reply to each conversation (rendered with the chat template and a generation prompt, listing
    `tools` if given), without its end-of-turn token. Prompts are left-padded into batches; each row's positions
    count its real tokens only, so a reply is the same as when generated alone."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    prompt_budget = model.config.max_seq_len - max_new_tokens
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [build_prompt(tokenizer, messages, prompt_budget, tools=tools) for messages in conversations[start:start + batch_size]]
        longest = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(len(prompts), longest, dtype=torch.long)  # (B, T)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt):] = 1
        new_tokens = model.generate(input_ids.to(_device(model)), attention_mask=attention_mask.to(_device(model)),
                                    max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos,
                                    pad_token_id=pad)  # (B, n_new)
        for row in new_tokens.tolist():
            end = row.index(eos) if eos in row else len(row)
            replies.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return replies


def replies_with_tools(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
                       tools: dict[str, Tool], max_new_tokens: int = 64, max_rounds: int = 3) -> list[list[ToolRound]]:
    """The tool loop of model/tools.py run on many conversations at once: each round, every conversation still
    going gets its greedy reply (with the tools listed), its calls are run and fed back; a conversation ends with a
    reply without calls, or after max_rounds replies. Returns each conversation's rounds (the last one is its
    answer); the conversations are extended in place."""
    schemas = [tool.schema for tool in tools.values()]
    rounds: list[list[ToolRound]] = [[] for _ in conversations]
    going = list(range(len(conversations)))
    for round_index in range(max_rounds):
        replies = generate_replies(model, tokenizer, [conversations[i] for i in going], max_new_tokens, tools=schemas)
        for i, reply in zip(going, replies):
            rounds[i].append(take_turn(conversations[i], reply, tools, run_calls=round_index < max_rounds - 1))
        going = [i for i in going if rounds[i][-1].calls]
        if not going:
            break
    return rounds


@torch.inference_mode()
def summed_loss(model: MiniMindLM, dataset: Dataset, batch_size: int = 64, pad_token_id: int = 0,
                progress: bool = False) -> tuple[float, int]:
    """Next-token cross-entropy (nats) summed over every counted token of the dataset (its loss masks), and the
    number of those tokens; `progress` shows a bar over the samples."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=PadCollator(pad_token_id))
    total, count = 0.0, 0.0
    with tqdm(total=len(dataset), desc="loss", unit="doc", disable=not progress) as bar:
        for inputs, labels, loss_mask in loader:
            device = _device(model)
            logits = model(inputs.to(device)).logits.float()  # (B, T, V)
            per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(),
                                                          reduction="none")
            mask = loss_mask.to(device).flatten()
            total += float((per_token * mask).sum())
            count += float(mask.sum())
            bar.update(len(inputs))
    return total, int(count)


def mean_loss(model: MiniMindLM, dataset: Dataset, batch_size: int = 64, pad_token_id: int = 0) -> float:
    """Next-token cross-entropy (nats) averaged over every counted token of the dataset (its loss masks), not over
    batches, so the result does not depend on batch_size."""
    total, count = summed_loss(model, dataset, batch_size, pad_token_id)
    return total / count if count else math.nan


@torch.inference_mode()
def preference_log_probs(model: MiniMindLM, dataset: Dataset, batch_size: int = 32,
                         pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected replies of every pair of a DPODataset:
    two (N,) float tensors on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DPOCollator(pad_token_id))
    chosen, rejected = [], []
    for inputs, labels, loss_mask in loader:  # (2B, T): B chosen rows, then B rejected rows
        device = _device(model)
        log_probs = sequence_log_probs(model(inputs.to(device)).logits, labels.to(device), loss_mask.to(device)).cpu()
        pairs = inputs.shape[0] // 2
        chosen.append(log_probs[:pairs])
        rejected.append(log_probs[pairs:])
    return torch.cat(chosen), torch.cat(rejected)
