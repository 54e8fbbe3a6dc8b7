"""model/evaluation.py against independent references: batched greedy replies against one-at-a-time streaming,
the dataset loss against a per-sample sum, preference log-probs against scoring each reply alone."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from model import LMConfig, MiniMindLM
from model.dataset import DPODataset, SFTDataset
from model.evaluation import generate_replies, mean_loss, preference_log_probs
from model.inference import stream_chat

QUESTIONS = ["你好", "What is the capital of a made-up country with a long name?", "1+1=?", "讲个很长很长很长的故事吧"]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**TINY, vocab_size=len(tokenizer), max_seq_len=128))
    with torch.no_grad():  # larger weights than the init's, so greedy picks are far from ties and eos gets chosen
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_batched_replies_equal_replies_generated_alone(model, tokenizer):
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batched = generate_replies(model, tokenizer, chats, max_new_tokens=20, batch_size=3)  # two batches, padded
    alone = []
    for chat in chats:
        stream = stream_chat(model, tokenizer, chat, max_new_tokens=20, temperature=0.0, max_context=128)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                alone.append(done.value.text)
                break
    assert batched == alone
    assert len({len(tokenizer.encode(reply)) for reply in batched}) > 1  # replies of different lengths were batched


def test_mean_loss_averages_over_counted_tokens_not_batches(model, tokenizer, tmp_path):
    rows = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "好的" * (i + 1)}]}
            for i, q in enumerate(QUESTIONS)]
    dataset = SFTDataset(write_jsonl(tmp_path / "chats.jsonl", rows), tokenizer, max_length=64)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for x, y, mask in (dataset[i] for i in range(len(dataset))):  # one sample at a time, no padding
            per_token = F.cross_entropy(model(x[None]).logits[0], y, reduction="none")
            total += float((per_token * mask).sum())
            count += float(mask.sum())
    expected = total / count
    for batch_size in (1, 3, 8):
        assert mean_loss(model, dataset, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(mean_loss(model, []))


def test_preference_log_probs_score_each_reply_alone(model, tokenizer, tmp_path):
    pairs = [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "对。"}],
              "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "不对，完全不是这样。"}]}
             for q in QUESTIONS]
    dataset = DPODataset(write_jsonl(tmp_path / "pairs.jsonl", pairs), tokenizer, max_length=64)
    chosen, rejected = preference_log_probs(model, dataset, batch_size=3)

    def reply_log_prob(triple) -> float:
        x, y, mask = triple
        with torch.no_grad():
            log_probs = F.log_softmax(model(x[None]).logits[0].float(), dim=-1)
        return float(sum(log_probs[t, y[t]] for t in range(len(y)) if mask[t]))

    expected_chosen = [reply_log_prob(dataset[i][0]) for i in range(len(pairs))]
    expected_rejected = [reply_log_prob(dataset[i][1]) for i in range(len(pairs))]
    assert chosen.tolist() == pytest.approx(expected_chosen, rel=1e-5)
    assert rejected.tolist() == pytest.approx(expected_rejected, rel=1e-5)
