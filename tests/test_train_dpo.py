"""train_dpo.py: the DPO loss against hand-computed values, vanishing gradients as beta -> 0, a reference model that
the training loop never changes, and end-to-end runs on dpo_mini.jsonl (held-out reward accuracy and margin rise,
bit-exact resume, torchrun with 2 processes)."""
from __future__ import annotations

import inspect
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_FP32, TINY_FLAGS, TORCHRUN_2, run, same_weights, tiny_model, weight_differences
from model.common import MissingInputError
from model.dataset import DPOCollator, DPODataset
from model.train_log import read_metrics
import train_dpo
from train_dpo import dpo_loss, make_dpo_loss, sequence_log_probs

BETA = 0.1


# ----------------------------------------------------------------------------------------------------------------
# The loss on hand-made numbers


def test_sequence_log_probs_sum_and_mean_over_the_mask():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 0.0, 0.0]],
                           [[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]])  # (2, 3, 3)
    labels = torch.tensor([[1, 2, 0], [1, 0, 2]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Row 0 counts log(e^3 / (e + e^2 + e^3)) and log(e^5 / (e^5 + 2)); row 1 counts log(3/5) and log(1/3).
    row0 = [3.0 - math.log(math.e + math.e**2 + math.e**3), 5.0 - math.log(math.e**5 + 2.0)]
    row1 = [math.log(3.0 / 5.0), math.log(1.0 / 3.0)]
    summed = sequence_log_probs(logits, labels, mask)
    assert summed.tolist() == pytest.approx([sum(row0), sum(row1)], abs=1e-6)
    mean = sequence_log_probs(logits, labels, mask, length_normalize=True)
    assert mean.tolist() == pytest.approx([sum(row0) / 2, sum(row1) / 2], abs=1e-6)
    assert sequence_log_probs(logits, labels, torch.zeros(2, 3), length_normalize=True).tolist() == [0.0, 0.0]


def test_dpo_loss_matches_hand_computation():
    policy_chosen, policy_rejected = [-10.0, -3.0, -7.0], [-12.0, -2.0, -7.0]
    reference_chosen, reference_rejected = [-11.0, -3.5, -6.0], [-11.5, -2.5, -9.0]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor(policy_chosen), torch.tensor(policy_rejected), torch.tensor(reference_chosen),
        torch.tensor(reference_rejected), BETA)
    for i in range(3):
        z = BETA * ((policy_chosen[i] - policy_rejected[i]) - (reference_chosen[i] - reference_rejected[i]))
        assert float(losses[i]) == pytest.approx(math.log(1.0 + math.exp(-z)), abs=1e-6)  # -log(sigmoid(z))
        assert float(chosen_rewards[i]) == pytest.approx(BETA * (policy_chosen[i] - reference_chosen[i]), abs=1e-6)
        assert float(rejected_rewards[i]) == pytest.approx(BETA * (policy_rejected[i] - reference_rejected[i]), abs=1e-6)
    # z = 0.15, 0, -0.3: the pair whose policy prefers the chosen reply more than the reference does costs least.
    assert float(losses[1]) == pytest.approx(math.log(2.0), abs=1e-7)
    assert float(losses[0]) < float(losses[1]) < float(losses[2])


# ----------------------------------------------------------------------------------------------------------------
# Gradients and the frozen reference, through a real model


def preference_slices(shared_data: Path, folder: Path, train: int, held_out: int) -> tuple[Path, Path]:
    """Single-turn pairs with a short prompt (<= 60 characters) from dpo_mini.jsonl, so that the replies, where
    chosen and rejected differ, fit in 96 tokens; the first `train` for training, the last `held_out` kept apart."""
    lines = (shared_data / "dpo_mini.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    short = [line for line in lines
             if len(record := json.loads(line)["chosen"]) == 2 and len(record[0]["content"]) <= 60]
    assert len(short) >= train + held_out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dpo_train.jsonl").write_text("".join(short[:train]), encoding="utf-8")
    (folder / "dpo_held.jsonl").write_text("".join(short[-held_out:]), encoding="utf-8")
    return folder / "dpo_train.jsonl", folder / "dpo_held.jsonl"


def test_gradients_vanish_as_beta_goes_to_zero(tmp_path, shared_data, tokenizer):
    train_file, _ = preference_slices(shared_data, tmp_path, 4, 1)
    batch = DPOCollator(tokenizer.pad_token_id)([DPODataset(train_file, tokenizer, 96)[i] for i in range(4)])
    torch.manual_seed(0)
    policy, reference = tiny_model(), tiny_model()
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)

    def gradient_norm(beta: float) -> float:
        policy.zero_grad(set_to_none=True)
        loss, metrics = make_dpo_loss(reference, beta)(policy, batch)
        assert float(loss.detach()) == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference: z = 0 for any beta
        assert float(metrics["reward_margin"]) == 0.0 and float(metrics["reward_acc"]) == 0.0
        loss.backward()
        return float(torch.cat([p.grad.flatten() for p in policy.parameters()]).norm())

    norms = {beta: gradient_norm(beta) for beta in (0.1, 1e-3, 1e-5, 0.0)}
    assert norms[0.1] > 1e-3
    # d loss / d theta = -beta * sigmoid(-z) * dz/dtheta = -(beta / 2) dz/dtheta at z = 0: linear in beta.
    assert norms[1e-3] / 1e-3 == pytest.approx(norms[0.1] / 0.1, rel=1e-4)
    assert norms[1e-5] == pytest.approx(norms[0.1] * 1e-4, rel=1e-4)
    assert norms[0.0] == 0.0
    assert all(p.grad is None for p in reference.parameters())


def test_the_training_loop_never_changes_the_reference(tmp_path, shared_data):
    """train_dpo.main in-process, so the reference its loss function holds can be inspected afterwards."""
    train_file, _ = preference_slices(shared_data, tmp_path, 16, 1)
    torch.manual_seed(0)
    start = tiny_model().state_dict()
    torch.save(start, tmp_path / "start_64.pth")
    trainer = train_dpo.main([*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "64", "--batch_size", "4", "--accumulation_steps",
                              "1", "--learning_rate", "3e-3", "--num_workers", "0", "--data_path", str(train_file),
                              "--from_weight", str(tmp_path / "start_64.pth"), "--out_dir", str(tmp_path / "out")])
    reference = inspect.getclosurevars(trainer.loss_fn).nonlocals["reference"]
    assert trainer.step == 8 and reference is not trainer.model  # 2 epochs (the default) of 4 steps
    assert not same_weights(trainer.model.state_dict(), start)  # the policy moved ...
    assert same_weights(reference.state_dict(), start)  # ... the reference did not, and never had a gradient
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert not reference.training
    assert same_weights(torch.load(tmp_path / "out" / "rlhf_64.pth", weights_only=True), trainer.model.state_dict())


def test_bad_beta_and_missing_sft_weights_are_clear_errors(tmp_path, shared_data, capsys):
    data = ["--data_path", str(shared_data / "dpo_mini.jsonl"), "--out_dir", str(tmp_path), *CPU_FP32, *TINY_FLAGS]
    with pytest.raises(SystemExit):
        train_dpo.main([*data, "--beta", "0"])
    assert "--beta must be > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(MissingInputError, match=f"{tmp_path / 'full_sft_64.pth'} not found: run train_full_sft.py first"):
        train_dpo.main(data)  # the default --from_weight full_sft


# ----------------------------------------------------------------------------------------------------------------
# End to end: the script as users run it

# 225 training pairs, 16 per step: 10 steps, the interrupted run stopping at 5. Without dropout the policy equals
# the reference at the first step, so its logged loss is exactly ln 2 and its rewards are 0.
DPO_RUN = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "96", "--batch_size", "16", "--accumulation_steps", "1",
           "--learning_rate", "3e-3", "--beta", str(BETA), "--epochs", "1", "--log_interval", "1", "--save_interval", "5",
           "--num_workers", "0"]


@torch.no_grad()
def held_out_margins(policy_state: dict, reference_state: dict, dataset: DPODataset) -> list[float]:
    """Per held-out pair, the implicit reward of the chosen reply minus that of the rejected one, with
    reward = beta * (log pi - log ref) summed over the reply tokens in float64 from log_softmax, one conversation at
    a time (independently of train_dpo.sequence_log_probs)."""
    policy, reference = tiny_model(policy_state), tiny_model(reference_state)

    def log_prob(model, triple) -> float:
        inputs, labels, mask = triple
        token_log_probs = F.log_softmax(model(inputs[None]).logits[0].double(), dim=-1)  # (T, V)
        return float(token_log_probs[torch.arange(len(labels)), labels][mask == 1].sum())

    margins = []
    for index in range(len(dataset)):
        chosen, rejected = dataset[index]
        chosen_reward = BETA * (log_prob(policy, chosen) - log_prob(reference, chosen))
        rejected_reward = BETA * (log_prob(policy, rejected) - log_prob(reference, rejected))
        margins.append(chosen_reward - rejected_reward)
    return margins


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, shared_data) -> SimpleNamespace:
    """The uninterrupted 10-step run the other tests compare with, from a fixed random start."""
    folder = tmp_path_factory.mktemp("dpo")
    train_file, held_file = preference_slices(shared_data, folder / "data", 225, 100)
    torch.manual_seed(0)
    start = tiny_model().state_dict()
    start_file = folder / "start_64.pth"
    torch.save(start, start_file)
    command = [sys.executable, "train_dpo.py", *DPO_RUN, "--data_path", str(train_file), "--from_weight", str(start_file)]
    full = folder / "full"
    stdout = run([*command, "--out_dir", str(full), "--max_steps", "10"])
    return SimpleNamespace(command=command, stdout=stdout, start=start, start_file=start_file, train_file=train_file,
                           held_file=held_file, rows=read_metrics(full / "rlhf_64_metrics.jsonl"),
                           trained=torch.load(full / "rlhf_64.pth", weights_only=True))


@pytest.mark.slow
def test_dpo_run_raises_held_out_rewards(dpo_run, tokenizer):
    """Before the run every held-out reward is 0 (policy = reference); after it the chosen replies of unseen pairs
    win more often than they lose, and the mean margin is positive beyond its noise."""
    assert f"from {dpo_run.start_file} (also the frozen reference), 225 preference pairs" in dpo_run.stdout
    assert "| reward_acc " in dpo_run.stdout and "| reward_margin " in dpo_run.stdout
    rows = dpo_run.rows
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert (rows[0]["reward_acc"], rows[0]["reward_margin"]) == (0.0, 0.0)
    held = DPODataset(dpo_run.held_file, tokenizer, 96)
    assert set(held_out_margins(dpo_run.start, dpo_run.start, held)) == {0.0}
    margins = torch.tensor(held_out_margins(dpo_run.trained, dpo_run.start, held), dtype=torch.float64)
    accuracy, margin, standard_error = float((margins > 0).double().mean()), float(margins.mean()), float(margins.std() / len(margins) ** 0.5)
    assert accuracy > 0.5 and margin > 2 * standard_error, (accuracy, margin, standard_error)


@pytest.mark.slow
def test_dpo_stop_and_resume_is_bit_identical(dpo_run, tmp_path):
    """Stopped after 5 steps and resumed to 10: the same weights and the same logged losses and rewards."""
    run([*dpo_run.command, "--out_dir", str(tmp_path), "--max_steps", "5"])
    stdout = run([*dpo_run.command, "--out_dir", str(tmp_path), "--max_steps", "10", "--resume", "1"])
    assert "at step 5 (epoch 1, sample 80/225" in stdout
    resumed = torch.load(tmp_path / "rlhf_64.pth", weights_only=True)
    assert same_weights(resumed, dpo_run.trained), weight_differences(resumed, dpo_run.trained)
    logged = ("step", "loss", "lr", "reward_acc", "reward_margin")
    assert [tuple(r[k] for k in logged) for r in read_metrics(tmp_path / "rlhf_64_metrics.jsonl")] == [
        tuple(r[k] for k in logged) for r in dpo_run.rows]


@pytest.mark.slow
def test_dpo_runs_under_torchrun(dpo_run, tmp_path):
    """Two processes (gloo), 4 pairs each per step: both replicas end equal and rank 0 writes the weights."""
    stdout = run([*TORCHRUN_2, "train_dpo.py", *DPO_RUN, "--data_path", str(dpo_run.train_file), "--from_weight",
                  str(dpo_run.start_file), "--batch_size", "4", "--max_steps", "2", "--out_dir", str(tmp_path)])
    assert "replicas in sync across 2 ranks" in stdout and stdout.count("step 2/2") == 1
    tiny_model(torch.load(tmp_path / "rlhf_64.pth", weights_only=True))  # a complete state dict (strict load)
    assert torch.load(tmp_path / "rlhf_64_resume.pth", weights_only=True)["world_size"] == 2
