"""train_distillation.py: the loss against a hand-computed example, zero KL when the teacher is the student, and
end-to-end runs on sft_mini.jsonl (with alpha = 0 the student's KL to a trained teacher falls on held-out
conversations; bit-exact resume; torchrun with 2 processes)."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CPU_FP32, TINY_FLAGS, TORCHRUN_2, run, same_weights, tiny_model, write_lines
from model.common import MissingInputError
from model.dataset import PackedCollator, PackedDataset, PadCollator, SFTDataset
from model.LMConfig import LMConfig
from model.model import MiniMindLM
from model.train_log import read_metrics
from model.trainer import masked_cross_entropy
import train_distillation
from train_distillation import (
    distillation_loss, make_distillation_loss, soft_kl, student_state_from_teacher, teacher_blocks_for,
)

# The teacher of the end-to-end runs: wider and deeper than the tiny student (dim 64, 2 layers).
TEACHER_FLAGS = ["--teacher_dim", "96", "--teacher_n_layers", "3", "--teacher_n_heads", "8", "--teacher_n_kv_heads", "2"]


def teacher_model(state_dict: dict | None = None) -> MiniMindLM:
    model = MiniMindLM(LMConfig(dim=96, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=6400)).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The loss on hand-made numbers


def test_loss_matches_a_hand_computed_example():
    # One conversation of 2 positions over a 3-token vocabulary; only position 1 is an assistant token.
    # Position 0 holds extreme logits that would change every number below if it were counted.
    student = torch.tensor([[[0.0, 0.0, 9.0], [0.0, 0.0, 0.0]]])  # (1, 2, 3)
    teacher = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 2.0 * math.log(3.0), 0.0]]])
    labels = torch.tensor([[2, 1]])
    loss_mask = torch.tensor([[0.0, 1.0]])
    alpha, temperature = 0.3, 2.0
    # At T = 2 the teacher's logits become (0, ln 3, 0): probabilities (1/5, 3/5, 1/5); the student's stay uniform.
    kl = 2 / 5 * math.log((1 / 5) / (1 / 3)) + 3 / 5 * math.log((3 / 5) / (1 / 3))
    ce = math.log(3.0)  # the label 1 under the uniform student (cross-entropy is taken at T = 1)
    loss, ce_value, kl_value = distillation_loss(student, teacher, labels, loss_mask, alpha, temperature)
    assert float(kl_value) == pytest.approx(kl, abs=1e-6)
    assert float(ce_value) == pytest.approx(ce, abs=1e-6)
    assert float(loss) == pytest.approx(alpha * ce + (1 - alpha) * temperature**2 * kl, abs=1e-6)
    assert float(soft_kl(student, teacher, torch.zeros(1, 2), temperature)) == 0.0  # nothing counted


@pytest.mark.parametrize("packed", [False, True])
def test_teacher_equal_to_student_gives_zero_kl_and_the_plain_ce_gradient(tmp_path, shared_data, tokenizer, packed):
    """Packed rows: the KL is 0 only if the teacher, too, reads each document alone (gets the document_ids)."""
    if packed:
        dataset = PackedDataset(write_lines(shared_data / "sft_mini.jsonl", tmp_path / "sft.jsonl", 0, 16), tokenizer,
                                max_length=512, chat=True)
        shared_rows = [dataset[r] for r in range(len(dataset)) if len(dataset[r]) > 1]  # rows of several documents
        batch = PackedCollator(tokenizer.pad_token_id, dataset.row_length)(shared_rows[:2])
    else:
        dataset = SFTDataset(shared_data / "sft_mini.jsonl", tokenizer, max_length=64)
        batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    student, teacher = tiny_model(), tiny_model()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    alpha = 0.25

    loss, metrics = make_distillation_loss(teacher, alpha, temperature=1.5)(student, batch)
    assert float(metrics["kl"]) == 0.0
    ce = masked_cross_entropy(student(batch.input_ids, document_ids=batch.document_ids).logits, batch.labels,
                              batch.loss_mask)
    assert float(metrics["ce"]) == float(ce.detach())
    loss.backward()
    distilled_gradient = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    (alpha * ce).backward()  # at KL = 0 (its minimum) the soft term adds no gradient
    for ours, plain in zip(distilled_gradient, (p.grad for p in student.parameters())):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())


def test_missing_or_unusable_teacher_is_a_clear_error(tmp_path, shared_data, capsys):
    data = ["--data_path", str(shared_data / "lora_identity.jsonl"), "--out_dir", str(tmp_path), *CPU_FP32, *TINY_FLAGS,
            "--from_weight", "none"]
    with pytest.raises(MissingInputError) as error:
        train_distillation.main([*data, *TEACHER_FLAGS])
    assert str(error.value).startswith("teacher weights (--teacher_weight full_sft, sizes --teacher_dim 96 "
                                       "--teacher_n_layers 3 --teacher_use_moe 0): ")
    assert str(tmp_path / "full_sft_96.pth") in str(error.value)
    with pytest.raises(SystemExit):
        train_distillation.main([*data, "--teacher_weight", "none"])
    assert "the teacher must be a trained model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# A student that starts from the teacher's blocks


def test_teacher_blocks_are_every_kth_from_the_first():
    assert teacher_blocks_for(4, 2) == [0, 2]
    assert teacher_blocks_for(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert teacher_blocks_for(8, 3) == [0, 2, 5]
    assert teacher_blocks_for(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="a student of 5 blocks cannot start from a teacher of 4"):
        teacher_blocks_for(4, 5)


def test_student_from_teacher_blocks_computes_what_those_blocks_compute():
    torch.manual_seed(0)
    teacher = tiny_model(n_layers=4, vocab_size=300)
    student = tiny_model(n_layers=2, vocab_size=300)
    student.load_state_dict(student_state_from_teacher(teacher.state_dict(), [0, 2]), strict=True)
    for name, value in student.layers[1].state_dict().items():
        assert torch.equal(value, teacher.layers[2].state_dict()[name])
    # Independent reference: the teacher's own modules applied by hand, skipping blocks 1 and 3
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        cos, sin = teacher.rotary(torch.arange(9).expand(2, 9))
        h = teacher.tok_embeddings(tokens)
        for index in (0, 2):
            h = teacher.layers[index](h, cos, sin, None)[0]
        expected = teacher.output(teacher.norm(h))
        assert torch.allclose(student(tokens).logits, expected, atol=1e-6)
    assert student.tok_embeddings.weight.data_ptr() == student.output.weight.data_ptr()  # still tied


def test_init_from_teacher_flag_errors_name_the_fix(tmp_path, capsys):
    base = ["--data_path", str(tmp_path / "none.jsonl"), "--out_dir", str(tmp_path), *CPU_FP32, *TINY_FLAGS]
    with pytest.raises(SystemExit):
        train_distillation.main([*base, *TEACHER_FLAGS, "--init_from_teacher", "1"])
    assert "--init_from_teacher 1 starts the student from the teacher: pass --from_weight none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_distillation.main([*base, *TEACHER_FLAGS, "--init_from_teacher", "1", "--from_weight", "none"])
    assert "needs a student as wide as the teacher" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# End to end: the script as users run it

# 96 training conversations, 8 per step: 12 steps, the interrupted run stopping at 6. alpha 0: only the teacher.
DISTILL_RUN = [*CPU_FP32, *TINY_FLAGS, *TEACHER_FLAGS, "--max_seq_len", "64", "--batch_size", "8",
               "--accumulation_steps", "1", "--learning_rate", "3e-3", "--alpha", "0", "--temperature", "2",
               "--epochs", "1", "--log_interval", "1", "--save_interval", "3", "--num_workers", "0"]


def train_teacher(data: Path, tokenizer, steps: int = 20) -> dict:
    """A teacher that knows something: 20 plain SFT steps of the dim-96 model on held-apart conversations."""
    dataset = SFTDataset(data, tokenizer, max_length=64)
    collate = PadCollator(tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = teacher_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        inputs, labels, loss_mask = collate([dataset[(step * 8 + i) % len(dataset)] for i in range(8)])
        loss = masked_cross_entropy(model(inputs).logits, labels, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().state_dict()


@torch.no_grad()
def held_out_kl(student_state: dict, teacher_state: dict, dataset: SFTDataset) -> float:
    """Mean over the held-out assistant tokens of KL(teacher || student) at temperature 1, in float64, one
    conversation at a time (independently of train_distillation.soft_kl)."""
    student, teacher = tiny_model(student_state), teacher_model(teacher_state)
    total, count = 0.0, 0
    for index in range(len(dataset)):
        inputs, _, mask = dataset[index]
        p = torch.softmax(teacher(inputs[None]).logits[0].double(), dim=-1)  # (T, V)
        q = torch.softmax(student(inputs[None]).logits[0].double(), dim=-1)
        per_position = (p * (p.log() - q.log())).sum(dim=-1)  # (T,)
        total += float(per_position[mask == 1].sum())
        count += int(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def distillation_run(tmp_path_factory, shared_data, tokenizer) -> SimpleNamespace:
    """A trained teacher, and the uninterrupted 12-step run with alpha 0 the other tests compare with."""
    folder = tmp_path_factory.mktemp("distillation")
    sft = shared_data / "sft_mini.jsonl"
    train_file = write_lines(sft, folder / "train.jsonl", 0, 96)
    held = SFTDataset(write_lines(sft, folder / "held.jsonl", 13_200, 13_224), tokenizer, max_length=64)
    out = folder / "full"
    out.mkdir()
    teacher = train_teacher(write_lines(sft, folder / "teacher.jsonl", 1_000, 1_160), tokenizer)
    torch.save(teacher, out / "full_sft_96.pth")  # found by the default --teacher_weight full_sft
    torch.manual_seed(0)
    start = tiny_model().state_dict()
    start_file = folder / "start_64.pth"
    torch.save(start, start_file)
    command = [sys.executable, "train_distillation.py", *DISTILL_RUN, "--data_path", str(train_file),
               "--from_weight", str(start_file)]
    stdout = run([*command, "--out_dir", str(out), "--max_steps", "12"])
    return SimpleNamespace(command=command, stdout=stdout, out=out, held=held, teacher=teacher, start=start,
                           start_file=start_file, train_file=train_file,
                           rows=read_metrics(out / "full_dist_64_metrics.jsonl"),
                           trained=torch.load(out / "full_dist_64.pth", weights_only=True))


@pytest.mark.slow
def test_distillation_run_lowers_held_out_kl(distillation_run):
    """With alpha 0 the student moves towards the teacher on held-out conversations."""
    run_ = distillation_run
    assert f"from {run_.start_file}, teacher " in run_.stdout
    assert f"from {run_.out / 'full_sft_96.pth'}, alpha 0.0" in run_.stdout
    assert [r["step"] for r in run_.rows] == list(range(1, 13))
    assert all(r["loss"] == pytest.approx(4.0 * r["kl"], rel=1e-6) for r in run_.rows)  # alpha 0: T^2 * KL only
    before, after = held_out_kl(run_.start, run_.teacher, run_.held), held_out_kl(run_.trained, run_.teacher, run_.held)
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_distillation_stop_and_resume_is_bit_identical(distillation_run, tmp_path):
    """Stopped after 6 steps and resumed to 12 (teacher given as a path this time): the same weights and logs."""
    command = [*distillation_run.command, "--out_dir", str(tmp_path), "--teacher_weight",
               str(distillation_run.out / "full_sft_96.pth")]
    run([*command, "--max_steps", "6"])
    stdout = run([*command, "--max_steps", "12", "--resume", "1"])
    assert "at step 6 (epoch 1, sample 48/96" in stdout
    assert same_weights(torch.load(tmp_path / "full_dist_64.pth", weights_only=True), distillation_run.trained)
    logged = ("step", "loss", "lr", "ce", "kl")
    assert [tuple(r[k] for k in logged) for r in read_metrics(tmp_path / "full_dist_64_metrics.jsonl")] == [
        tuple(r[k] for k in logged) for r in distillation_run.rows]


@pytest.mark.slow
def test_distillation_runs_under_torchrun(distillation_run, tmp_path):
    """Two processes (gloo) with the teacher equal to the student's starting weights: the first step's KL is 0."""
    stdout = run([*TORCHRUN_2, "train_distillation.py", *DISTILL_RUN, "--data_path", str(distillation_run.train_file),
                  "--from_weight", str(distillation_run.start_file), "--teacher_weight", str(distillation_run.start_file),
                  *(f"--teacher_{flag[2:]}" if flag.startswith("--") else flag for flag in TINY_FLAGS),
                  "--alpha", "0.5", "--batch_size", "4", "--max_steps", "2", "--out_dir", str(tmp_path)])
    assert "replicas in sync across 2 ranks" in stdout and stdout.count("step 2/2") == 1
    first = read_metrics(tmp_path / "full_dist_64_metrics.jsonl")[0]
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5 * first["ce"], rel=1e-6)
    tiny_model(torch.load(tmp_path / "full_dist_64.pth", weights_only=True))  # a complete state dict (strict load)
