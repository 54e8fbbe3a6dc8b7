"""train_distill_reason.py: the tag-weighted mask and loss against hand-computed values, a short run on
r1_mini.jsonl after which the model opens and closes its think block on unseen questions, bit-exact resume,
torchrun with two processes, and the message when the default starting weights (DPO) are missing.

Training runs call the script's main(argv) in this process (one thread: tiny matrices are fastest that way, and
the other core stays free); the torchrun run is a subprocess, as users launch it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train_distill_reason
from conftest import (
    CPU_FP32, TINY_FLAGS, TOKENIZER_DIR, TORCHRUN_2, jsonl_lines, one_thread, run, same_weights, tiny_model, write_jsonl,
)
from model.common import MissingInputError
from model.dataset import PadCollator, SFTDataset, render_conversation
from model.model import MiniMindLM
from model.train_log import read_metrics

THINK, END_THINK, ANSWER, END_ANSWER = 3, 4, 5, 6  # the tag ids of the shipped tokenizer


# ----------------------------------------------------------------------------------------------------------------
# The weighting and the loss


def test_tag_weights_on_a_rendered_conversation(tokenizer, tmp_path):
    """Two replies with tags, a tag inside the user prompt, and a shorter padded second item."""
    assert train_distill_reason.tag_token_ids(tokenizer, str(TOKENIZER_DIR)) == [THINK, END_THINK, ANSWER, END_ANSWER]
    conversation = [
        {"role": "user", "content": "Why <think>?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n<answer>\n2\n</answer>"},
        {"role": "user", "content": "Ok"},
        {"role": "assistant", "content": "<answer>\nyes\n</answer>"},
    ]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<answer>\nhi\n</answer>"}]
    data = write_jsonl([json.dumps({"conversations": c}) for c in (conversation, short)], tmp_path / "tags.jsonl")
    dataset = SFTDataset(data, tokenizer, max_length=128)
    _, labels, loss_mask = PadCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])  # (2, 50) each
    weights = train_distill_reason.tag_weighted_mask(labels, loss_mask, torch.tensor([3, 4, 5, 6]), 10.0)

    # Labels of row 0, by hand: "user\nWhy <think>?<|im_end|>\n<|im_start|>assistant\n" (15 labels, the prompt),
    # the first reply (13), "\n<|im_start|>user\nOk<|im_end|>\n<|im_start|>assistant\n" (14), the second reply (7),
    # and the final "\n".
    first_reply = [10, 1, 1, 1, 1, 10, 1, 10, 1, 1, 1, 10, 1]  # <think> \n ad d \n </think> \n <answer> \n 2 \n </answer> <|im_end|>
    second_reply = [10, 1, 1, 1, 1, 10, 1]  # <answer> \n y es \n </answer> <|im_end|>
    expected = [0] * 15 + first_reply + [0] * 14 + second_reply + [0]
    assert labels.shape == (2, 50) and weights[0].tolist() == expected
    assert int(labels[0, 6]) == THINK and float(weights[0, 6]) == 0.0  # the tag inside the prompt is not counted
    assert [int(labels[0, i]) for i in range(50) if expected[i] == 10] == [THINK, END_THINK, ANSWER, END_ANSWER, ANSWER, END_ANSWER]
    # Row 1 (20 labels, then padding whose label is the pad id 0): a 12-label prompt, the reply, the final "\n".
    row_1 = [0] * 12 + [10, 1, 1, 1, 1, 10, 1] + [0]  # <answer> \n h i \n </answer> <|im_end|>
    assert weights[1].tolist() == row_1 + [0] * 30

    # --tag_weight 1 gives back the plain SFT mask.
    assert torch.equal(train_distill_reason.tag_weighted_mask(labels, loss_mask, torch.tensor([3, 4, 5, 6]), 1.0), loss_mask)


def test_loss_is_the_weighted_mean_over_the_reply():
    """One sequence over a 4-token vocabulary, the tag id being 3; cross-entropies known in closed form."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],  # uniform: CE = ln 4 whatever the label
                            [math.log(3.0), 0.0, 0.0, 0.0],  # p(0) = 3/6: CE of label 0 = ln 2
                            [5.0, -1.0, 2.0, 0.5]]])  # masked out: must not matter
    labels = torch.tensor([[3, 0, 2]])
    loss_mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = train_distill_reason.tag_weighted_loss(logits, labels, loss_mask, torch.tensor([3]), 10.0)
    # weights 10 (tag), 1, 0: (10 ln 4 + ln 2) / 11 = 21 ln 2 / 11
    assert float(loss) == pytest.approx(21 * math.log(2) / 11, rel=1e-6)
    plain = train_distill_reason.tag_weighted_loss(logits, labels, loss_mask, torch.tensor([3]), 1.0)
    assert float(plain) == pytest.approx((2 * math.log(2) + math.log(2)) / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# A short run learns the format


def short_r1_conversations(tokenizer, shared_data: Path, count: int) -> list[str]:
    """The first `count` records of r1_mini.jsonl that fit in 128 tokens whole (so every one shows the closing
    tags), taken from its first 2,000 lines."""
    kept = []
    for line in jsonl_lines(shared_data / "r1_mini.jsonl")[:2000]:
        if len(render_conversation(tokenizer, json.loads(line)["conversations"])[0]) <= 128:
            kept.append(line)
        if len(kept) == count:
            return kept
    raise AssertionError(f"only {len(kept)} short conversations in the first 2,000 lines")


def train_from_scratch(data: Path, out: Path) -> MiniMindLM:
    """100 steps (2 epochs of 400 conversations) from random weights with the default --tag_weight (10)."""
    with one_thread():
        trainer = train_distill_reason.main([
            *CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(out), "--from_weight", "none",
            "--max_seq_len", "128", "--batch_size", "8", "--epochs", "2", "--learning_rate", "5e-3",
            "--warmup_iters", "5", "--log_interval", "10", "--num_workers", "0"])
    assert trainer.step == 100
    return tiny_model(torch.load(out / "reason_64.pth", weights_only=True))


@torch.no_grad()
def tag_accuracy(model: MiniMindLM, tokenizer, lines: list[str]) -> dict[int, float]:
    """Teacher-forced: for each tag, the fraction of its reply positions where the model's top prediction is it."""
    hits = {tag: [0, 0] for tag in (THINK, END_THINK, ANSWER, END_ANSWER)}
    for line in lines:
        ids, mask = render_conversation(tokenizer, json.loads(line)["conversations"], max_length=256)
        predicted = model(torch.tensor([ids[:-1]])).logits[0].argmax(dim=-1)  # (T,)
        for position, (label, counted) in enumerate(zip(ids[1:], mask[1:])):
            if counted and label in hits:
                hits[label][0] += int(predicted[position] == label)
                hits[label][1] += 1
    return {tag: right / total for tag, (right, total) in hits.items()}


@pytest.mark.slow
def test_short_run_learns_to_think_then_answer(tmp_path, shared_data, tokenizer, capsys):
    data = write_jsonl(short_r1_conversations(tokenizer, shared_data, 400), tmp_path / "r1_train.jsonl")
    model = train_from_scratch(data, tmp_path / "out")
    assert "tag weight 10, 1 process(es) on cpu" in capsys.readouterr().out
    held_out = jsonl_lines(shared_data / "r1_mini.jsonl")[8000:8040]

    # Free-running on twenty unseen questions, greedy, in one left-padded batch. (The text between the tags is
    # what a 0.5M-parameter model writes after 20 seconds of training; the format is what is checked.)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([json.loads(line)["conversations"][0]], tokenize=False,
                                                              add_generation_prompt=True), add_special_tokens=False)
               for line in held_out[:20]]
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # (20, longest)
    attention_mask = (torch.arange(longest)[None, :] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    with one_thread():
        replies = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=120, temperature=0,
                                 eos_token_id=tokenizer.eos_token_id).tolist()
    formatted = [r[0] == THINK and END_THINK in r and ANSWER in r[r.index(END_THINK):] for r in replies]
    assert sum(formatted) >= 15, [tokenizer.decode(r) for r in replies]

    # Teacher-forced on forty unseen conversations: the model puts each tag where the reference reply has it.
    weighted = tag_accuracy(model, tokenizer, held_out)
    assert all(accuracy >= 0.6 for accuracy in weighted.values()), weighted
    assert weighted[END_THINK] >= 0.8, weighted  # measured once with --tag_weight 1 instead: 0 of 34


# ----------------------------------------------------------------------------------------------------------------
# Exact resume, torchrun, missing starting weights

# 40 conversations, 4 per micro-batch x 2 accumulation = 8 per step: 5 steps per epoch, 10 over 2 epochs. The
# interrupted run stops at step 4 and resumes to 8, across the epoch boundary; dropout makes the RNG state matter.
RESUME_RUN = [*CPU_FP32, *TINY_FLAGS, "--from_weight", "none", "--max_seq_len", "64", "--batch_size", "4",
              "--accumulation_steps", "2", "--epochs", "2", "--dropout", "0.1", "--learning_rate", "2e-3",
              "--log_interval", "1", "--save_interval", "3", "--num_workers", "0"]


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(tmp_path, shared_data):
    data = write_jsonl(jsonl_lines(shared_data / "r1_mini.jsonl")[:40], tmp_path / "r1_40.jsonl")
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    with one_thread():
        train_distill_reason.main([*RESUME_RUN, "--data_path", str(data), "--out_dir", str(reference), "--max_steps", "8"])
        train_distill_reason.main([*RESUME_RUN, "--data_path", str(data), "--out_dir", str(interrupted), "--max_steps", "4"])
        first = torch.load(interrupted / "reason_64_resume.pth", weights_only=True)
        assert (first["step"], first["epoch"], first["epoch_samples"]) == (4, 0, 32)
        resumed = train_distill_reason.main([*RESUME_RUN, "--data_path", str(data), "--out_dir", str(interrupted),
                                             "--max_steps", "8", "--resume", "1"])
    assert (resumed.step, resumed.epoch) == (8, 1)
    final = torch.load(interrupted / "reason_64.pth", weights_only=True)
    assert same_weights(final, torch.load(reference / "reason_64.pth", weights_only=True))
    assert not torch.equal(final["norm.weight"], first["model"]["norm.weight"])  # the second half did train
    ours, theirs = read_metrics(interrupted / "reason_64_metrics.jsonl"), read_metrics(reference / "reason_64_metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, 9))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, shared_data):
    data = write_jsonl(jsonl_lines(shared_data / "r1_mini.jsonl")[:40], tmp_path / "r1_40.jsonl")
    out = tmp_path / "ddp"
    stdout = run([*TORCHRUN_2, "train_distill_reason.py", *RESUME_RUN, "--data_path", str(data), "--out_dir", str(out),
                  "--batch_size", "2", "--max_steps", "3"])
    assert "2 process(es) on cpu" in stdout and "replicas in sync across 2 ranks" in stdout
    assert stdout.count("step 3/3") == 1  # only rank 0 logs
    state = torch.load(out / "reason_64_resume.pth", weights_only=True)
    assert (state["step"], state["world_size"]) == (3, 2)
    tiny_model(torch.load(out / "reason_64.pth", weights_only=True))  # a complete state dict (strict load)


def test_default_start_needs_the_dpo_weights(tmp_path, shared_data):
    data = write_jsonl(jsonl_lines(shared_data / "r1_mini.jsonl")[:8], tmp_path / "r1_8.jsonl")
    with pytest.raises(MissingInputError, match=r"rlhf_64\.pth not found: run train_dpo\.py first"):
        train_distill_reason.main([*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(tmp_path / "empty")])
