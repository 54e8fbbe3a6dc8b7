"""train_grpo.py and train_ppo.py end to end on a task a tiny model learns in a minute: repeat the number in the prompt.

A tiny model is fine-tuned on noisy replies (half of them a wrong number), so it repeats the number only part of
the time when sampling; rewarded for exact answers on 70 of the 100 numbers, RL must raise how often it repeats
the 30 numbers it never saw in RL (a general skill, not memorised answers). Also: the first update of a rollout
has ratio 1 and KL 0, a run stopped between two updates of one batch of rollouts resumes bit-identically, and both
stages run under torchrun with 2 processes.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import train_grpo
import train_ppo
from conftest import CPU_FP32, TORCHRUN_2, one_thread, run, same_weights
from model import LMConfig, MiniMindLM
from model.dataset import PadCollator, SFTDataset
from model.distributed import DistContext
from model.inference import build_prompt
from model.loading import load_pretrained
from model.rewards import answers_match
from model.train_log import read_metrics
from model.trainer import Trainer, TrainSettings, causal_lm_loss

SHAPE = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]


def write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    """(folder, SFT weights, RL prompts, held-out prompts): the SFT model repeats a number with probability ~0.2
    when sampling (greedy ~0.8)."""
    folder = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    numbers = list(range(100))
    rng.shuffle(numbers)
    held_out, trained = numbers[:30], numbers[30:]
    sft = []
    for _ in range(6000):
        n = rng.choice(numbers)
        reply = n if rng.random() < 0.5 else rng.choice([m for m in range(100) if m != n])
        sft.append({"conversations": [{"role": "user", "content": str(n)}, {"role": "assistant", "content": str(reply)}]})
    prompt = lambda n: {"conversations": [{"role": "user", "content": str(n)}], "answer": str(n)}  # noqa: E731
    rl, held = write(folder / "rl.jsonl", [prompt(n) for n in trained]), write(folder / "held.jsonl", [prompt(n) for n in held_out])
    settings = TrainSettings(dtype="float32", batch_size=32, epochs=5, max_steps=700, learning_rate=1e-2,
                             log_interval=700, save_interval=10**6)
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    with one_thread():
        Trainer(settings, DistContext(0, 0, 1, torch.device("cpu")), model,
                SFTDataset(write(folder / "sft.jsonl", sft), tokenizer, max_length=64), PadCollator(0), causal_lm_loss,
                weights_file=folder / "full_sft_64.pth").fit()
    return folder, folder / "full_sft_64.pth", rl, held


def sampled_accuracy(weights: Path, prompts: Path, tokenizer, samples: int = 16) -> float:
    """Share of exact answers among `samples` completions (temperature 1, fixed seeds) of every prompt."""
    model = load_pretrained(weights, n_heads=4)
    hits = total = 0
    for i, line in enumerate(prompts.read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        ids = torch.tensor([build_prompt(tokenizer, record["conversations"], 64)] * samples)
        with one_thread():
            out = model.generate(ids, max_new_tokens=4, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                                 seed=1000 + i)
        for row in out.tolist():
            row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            hits += answers_match(tokenizer.decode(row), record["answer"])
            total += 1
    return hits / total


def rl_flags(task, out: Path, **extra) -> list[str]:
    folder, sft, rl, _ = task
    flags = {"data_path": rl, "out_dir": out, "from_weight": sft, "max_gen_len": 4, "batch_size": 4,
             "num_generations": 8, "learning_rate": 1e-3, "rewards": "exact:1", "num_workers": 0, "log_interval": 1,
             "epochs": 100, **extra}
    return [*CPU_FP32, *SHAPE, *[arg for k, v in flags.items() for arg in (f"--{k}", str(v))]]


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_and_ppo_the_mean_reward(task, tmp_path, tokenizer):
    _, sft, rl, held = task
    before_held, before_rl = sampled_accuracy(sft, held, tokenizer), sampled_accuracy(sft, rl, tokenizer)
    with one_thread():
        train_grpo.main(rl_flags(task, tmp_path / "grpo", max_steps=60, beta=0.04))
        train_ppo.main(rl_flags(task, tmp_path / "ppo", max_steps=60, beta=0.04, learning_rate=1e-3))
    after_held = sampled_accuracy(tmp_path / "grpo" / "grpo_64.pth", held, tokenizer)
    assert after_held >= before_held + 0.08, (before_held, after_held)  # 480 samples each
    ppo_rl = sampled_accuracy(tmp_path / "ppo" / "ppo_64.pth", rl, tokenizer)
    assert ppo_rl >= before_rl + 0.08, (before_rl, ppo_rl)  # the mean reward (exact:1) on the RL prompts
    rows = read_metrics(tmp_path / "ppo" / "ppo_64_metrics.jsonl")
    assert {"value_loss", "explained_variance", "kl", "clip_fraction", "reward", "reward_std", "length"} <= set(rows[0])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_first_update_has_ratio_one_and_no_kl(task, tmp_path, stage):
    module = train_grpo if stage == "grpo" else train_ppo
    with one_thread():
        module.main(rl_flags(task, tmp_path, max_steps=1, beta=0.0, updates_per_batch=1))
    row = read_metrics(tmp_path / f"{stage}_64_metrics.jsonl")[0]
    assert row["ratio"] == 1.0 and row["kl"] == 0.0 and row["clip_fraction"] == 0.0
    assert 0.0 < row["reward"] < 1.0 and row["reward_std"] > 0  # a group with both outcomes: a real gradient


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_resume_between_updates_of_one_rollout_is_bit_identical(task, tmp_path, stage):
    """2 updates per batch of rollouts: stopped after step 3 (the first update of the second batch), resumed to 6."""
    module = train_grpo if stage == "grpo" else train_ppo
    extra = dict(updates_per_batch=2, save_interval=100, beta=0.04, **({"separate_critic": 1} if stage == "ppo" else {}))
    with one_thread():
        module.main(rl_flags(task, tmp_path / "whole", max_steps=6, **extra))
        module.main(rl_flags(task, tmp_path / "part", max_steps=3, **extra))
        state = torch.load(tmp_path / "part" / f"{stage}_64_resume.pth", weights_only=True)
        assert (state["step"], state["repeat"], len(state["stage"][0]["rollouts"])) == (3, 1, 1)
        module.main(rl_flags(task, tmp_path / "part", max_steps=6, resume=1, **extra))
    assert same_weights(torch.load(tmp_path / "part" / f"{stage}_64.pth", weights_only=True),
                        torch.load(tmp_path / "whole" / f"{stage}_64.pth", weights_only=True))
    ours = read_metrics(tmp_path / "part" / f"{stage}_64_metrics.jsonl")
    theirs = read_metrics(tmp_path / "whole" / f"{stage}_64_metrics.jsonl")
    keys = ("step", "loss", "reward", "kl", "ratio")
    assert [tuple(r[k] for k in keys) for r in ours] == [tuple(r[k] for k in keys) for r in theirs]
    assert ours[2]["ratio"] == 1.0 and ours[3]["ratio"] != 1.0  # step 4 reused step 3's rollouts, sampled before step 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_runs_under_torchrun_with_two_processes(task, tmp_path, stage):
    stdout = run([*TORCHRUN_2, f"train_{stage}.py", *rl_flags(task, tmp_path, max_steps=2, batch_size=2)])
    assert "2 process(es)" in stdout and "replicas in sync across 2 ranks" in stdout
    assert len(read_metrics(tmp_path / f"{stage}_64_metrics.jsonl")) == 2
    load_pretrained(tmp_path / f"{stage}_64.pth", n_heads=4)
