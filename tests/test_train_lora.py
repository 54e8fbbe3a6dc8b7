"""train_lora.py: an adapter trained on lora_identity.jsonl changes who the model says it is on held-out questions
while every base weight stays bit-identical; base + adapter file reproduces the trained model exactly; the merge
recipe in the script's docstring gives a plain weights file with the same logits; bit-exact resume; torchrun.

The base is a tiny chat model fully fine-tuned on the training questions with the assistant renamed "Orion" (the
project name, and so the tokens of "MiniMind", stay). The adapter must then teach the original replies, in which
the assistant is MiniMind: the identity change LoRA is typically used for, measurable on questions neither saw.
Training runs call the scripts' main in this process with one thread (fastest for tiny matrices, and it leaves the
other core free); the torchrun run is a subprocess, as users launch it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_full_sft
import train_lora
from conftest import (
    CPU_FP32, TINY_FLAGS, TORCHRUN_2, jsonl_lines, one_thread, run, same_weights, tiny_model,
    write_jsonl,
)
from model.common import MissingInputError
from model.dataset import SFTDataset
from model.model_lora import attach_lora_file
from model.model import MiniMindLM
from model.train_log import read_metrics
from scripts import convert_model

SHORT_RUN = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "128", "--batch_size", "8", "--num_workers", "0"]


def write_records(records: list[dict], path: Path) -> Path:
    return write_jsonl([json.dumps(record, ensure_ascii=False) for record in records], path)


def identity_records(shared_data: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl_lines(shared_data / "lora_identity.jsonl")]


def renamed(record: dict, name: str) -> dict:
    """The conversation with the assistant called `name` in its replies; "MiniMind project" / "MiniMind 项目" stay."""
    def rename(text: str) -> str:
        for project, marker in (("MiniMind project", "\0"), ("MiniMind 项目", "\1")):
            text = text.replace(project, marker)
        text = text.replace("MiniMind", name)
        return text.replace("\0", "MiniMind project").replace("\1", "MiniMind 项目")
    return {"conversations": [{**m, "content": rename(m["content"]) if m["role"] == "assistant" else m["content"]}
                              for m in record["conversations"]]}


def base_with_adapter(base_file: Path, adapter_file: Path) -> MiniMindLM:
    """What eval_model.py --lora_name does: the base weights, then adapters shaped and filled from the file."""
    model = tiny_model(torch.load(base_file, weights_only=True))
    attach_lora_file(model, str(adapter_file))
    return model.eval()


@torch.no_grad()
def held_out_loss(model: MiniMindLM, dataset: SFTDataset) -> float:
    """Token-weighted mean cross-entropy over the reply tokens of every conversation."""
    total, count = 0.0, 0.0
    for index in range(len(dataset)):
        inputs, labels, mask = dataset[index]
        per_token = F.cross_entropy(model(inputs[None]).logits[0], labels, reduction="none")  # (T,)
        total += float((per_token * mask).sum())
        count += float(mask.sum())
    return total / count


def greedy_replies(model: MiniMindLM, tokenizer, questions: list[str]) -> list[str]:
    replies = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        input_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        new = model.generate(input_ids, max_new_tokens=24, temperature=0, eos_token_id=tokenizer.eos_token_id)[0]
        replies.append(tokenizer.decode(new, skip_special_tokens=True))
    return replies


SELF_NAMING = ("I am {}", "我是 {}", "我叫 {}", "我名为 {}", "作为 {}")  # the phrasings of the identity data


def names_itself(reply: str, name: str) -> bool:
    return any(phrase.format(name) in reply for phrase in SELF_NAMING)


def documented_merge(base_file: Path, adapter_file: Path, merged_file: Path) -> None:
    """Run the merge command that train_lora.py's docstring documents, with this test's model size and paths."""
    assert "convert_model.py merge_lora --weight" in train_lora.__doc__
    convert_model.main(["merge_lora", "--weight", str(base_file), "--lora", str(adapter_file), "--out", str(merged_file),
                        *TINY_FLAGS[2:]])  # the architecture flags but --dim, which merge_lora reads from the weights


# ----------------------------------------------------------------------------------------------------------------
# The adapter learns the identity; the base is untouched; reload and merge reproduce the trained model


@pytest.mark.slow
def test_adapter_changes_the_identity_and_leaves_the_base_untouched(tmp_path, shared_data, tokenizer, monkeypatch, capsys):
    records = identity_records(shared_data)
    train = [r for i, r in enumerate(records) if i % 8 != 3]  # 80 conversations
    held = [r for i, r in enumerate(records) if i % 8 == 3]  # 11, spread over the file (English and Chinese)
    train_file = write_records(train, tmp_path / "identity_train.jsonl")
    held_minimind = SFTDataset(write_records(held, tmp_path / "held.jsonl"), tokenizer, 128)
    held_orion = SFTDataset(write_records([renamed(r, "Orion") for r in held], tmp_path / "held_orion.jsonl"), tokenizer, 128)
    out = tmp_path / "out"

    # The base: full SFT from scratch on the renamed training questions, 200 steps, through train_full_sft.py.
    monkeypatch.setattr(sys, "argv", [
        "train_full_sft.py", *SHORT_RUN, "--data_path", str(write_records([renamed(r, "Orion") for r in train],
                                                                         tmp_path / "orion.jsonl")),
        "--out_dir", str(out), "--from_weight", "none", "--epochs", "20", "--learning_rate", "1e-2",
        "--warmup_iters", "5", "--log_interval", "50"])
    with one_thread():
        train_full_sft.main()
    base_file = out / "full_sft_64.pth"
    base_weights = torch.load(base_file, weights_only=True)

    # The adapter: default --from_weight (full_sft), default rank 16 on wq and wo; 80 steps.
    with one_thread():
        trainer = train_lora.main([*SHORT_RUN, "--data_path", str(train_file), "--out_dir", str(out), "--epochs", "8",
                                   "--learning_rate", "3e-2"])
    stdout = capsys.readouterr().out
    assert "MiniMind LoRA 'lora_identity': rank 16 on 4 linears (wq,wo)" in stdout and f"base {base_file}," in stdout
    adapter_file = out / "lora" / "lora_identity_64.pth"
    adapter = torch.load(adapter_file, weights_only=True)
    expected_keys = {f"layers.{i}.attention.{w}.lora.{m}.weight" for i in range(2) for w in ("wq", "wo") for m in "AB"}
    assert set(adapter) == expected_keys
    assert adapter["layers.0.attention.wq.lora.A.weight"].shape == (16, 64)
    assert adapter["layers.0.attention.wq.lora.B.weight"].shape == (64, 16)
    assert set(torch.load(out / "lora" / "lora_identity_64_resume.pth", weights_only=True)["model"]) == expected_keys

    # Every base weight after training is bit-identical to the weights file it started from.
    trained = trainer.model.eval()
    after_training = {k: v for k, v in trained.state_dict().items() if ".lora." not in k}
    assert same_weights(after_training, base_weights)

    # Held-out questions: the loss of the MiniMind replies falls, and the model now prefers MiniMind to Orion.
    base = tiny_model(base_weights)
    before = held_out_loss(base, held_minimind), held_out_loss(base, held_orion)
    after = held_out_loss(trained, held_minimind), held_out_loss(trained, held_orion)
    assert before[0] > before[1] + 0.15, before  # the base knows itself as Orion
    assert after[0] < before[0] - 0.25, (before, after)
    assert after[0] < after[1] - 0.05, after  # ... and the adapted model as MiniMind
    questions = [r["conversations"][0]["content"] for r in held]  # 8 of the 11 replies name the assistant
    with one_thread():
        base_replies, adapted_replies = greedy_replies(base, tokenizer, questions), greedy_replies(trained, tokenizer, questions)
    assert sum(names_itself(r, "Orion") for r in base_replies) >= 6, base_replies
    assert not any(names_itself(r, "MiniMind") for r in base_replies), base_replies
    assert sum(names_itself(r, "MiniMind") for r in adapted_replies) >= 6, adapted_replies
    assert sum(names_itself(r, "Orion") for r in adapted_replies) <= 1, adapted_replies

    # Base + adapter file (as eval_model.py loads them) reproduces the trained model exactly.
    inputs = torch.stack([held_minimind[i][0][:24] for i in range(4)])  # (4, 24): every held-out item is longer
    with torch.no_grad():
        trained_logits = trained(inputs).logits
        assert torch.equal(base_with_adapter(base_file, adapter_file)(inputs).logits, trained_logits)
        assert not torch.allclose(base(inputs).logits, trained_logits, atol=1e-2)  # the adapter does change them

        # The docstring's merge recipe: a plain state dict, loaded without LoRA code, with the same logits.
        merged_file = tmp_path / "full_sft_identity_64.pth"
        documented_merge(base_file, adapter_file, merged_file)
        merged = tiny_model(torch.load(merged_file, weights_only=True))
        assert torch.allclose(merged(inputs).logits, trained_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Exact resume, torchrun, missing starting weights

# 40 conversations, 4 per micro-batch x 2 accumulation = 8 per step: 5 steps per epoch, 10 over 2 epochs. The
# interrupted run stops at step 4 and resumes to 8, across the epoch boundary; dropout makes the RNG state matter.
# The base is a random model.
RESUME_RUN = [*CPU_FP32, *TINY_FLAGS, "--max_seq_len", "64", "--batch_size", "4", "--accumulation_steps", "2",
              "--epochs", "2", "--dropout", "0.1", "--learning_rate", "1e-2", "--log_interval", "1", "--save_interval", "3",
              "--num_workers", "0"]


@pytest.fixture
def random_base_and_data(tmp_path, shared_data) -> tuple[Path, Path]:
    torch.manual_seed(0)
    base_file = tmp_path / "random_base.pth"
    torch.save(tiny_model().state_dict(), base_file)
    return base_file, write_records(identity_records(shared_data)[:40], tmp_path / "identity_40.jsonl")


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(tmp_path, random_base_and_data):
    base_file, data = random_base_and_data
    command = [*RESUME_RUN, "--data_path", str(data), "--from_weight", str(base_file)]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    with one_thread():
        train_lora.main([*command, "--out_dir", str(reference), "--max_steps", "8"])
        train_lora.main([*command, "--out_dir", str(interrupted), "--max_steps", "4"])
        first = torch.load(interrupted / "lora" / "lora_identity_64_resume.pth", weights_only=True)
        assert (first["step"], first["epoch"], first["epoch_samples"]) == (4, 0, 32)
        train_lora.main([*command, "--out_dir", str(interrupted), "--max_steps", "8", "--resume", "1"])
    final = torch.load(interrupted / "lora" / "lora_identity_64.pth", weights_only=True)
    assert same_weights(final, torch.load(reference / "lora" / "lora_identity_64.pth", weights_only=True))
    assert not torch.equal(final["layers.0.attention.wo.lora.B.weight"], first["model"]["layers.0.attention.wo.lora.B.weight"])
    ours = read_metrics(interrupted / "lora" / "lora_identity_64_metrics.jsonl")
    theirs = read_metrics(reference / "lora" / "lora_identity_64_metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, 9))
    assert [(r["loss"], r["lr"]) for r in ours] == [(r["loss"], r["lr"]) for r in theirs]


@pytest.mark.slow
def test_torchrun_two_processes_with_every_linear_adapted(tmp_path, random_base_and_data):
    base_file, data = random_base_and_data
    out = tmp_path / "ddp"
    stdout = run([*TORCHRUN_2, "train_lora.py", *RESUME_RUN, "--data_path", str(data), "--from_weight", str(base_file),
                  "--out_dir", str(out), "--batch_size", "2", "--max_steps", "3", "--lora_name", "lora_all",
                  "--lora_targets", "all", "--lora_rank", "4", "--lora_alpha", "8"])
    assert "rank 4 on 14 linears (all)" in stdout and "2 process(es) on cpu" in stdout
    assert "replicas in sync across 2 ranks" in stdout and stdout.count("step 3/3") == 1
    adapter = torch.load(out / "lora" / "lora_all_64.pth", weights_only=True)
    linears = [f"attention.{w}" for w in ("wq", "wk", "wv", "wo")] + [f"feed_forward.{w}" for w in ("w1", "w2", "w3")]
    assert set(adapter) == {f"layers.{i}.{linear}.lora.{m}.weight" for i in range(2) for linear in linears for m in "AB"}
    assert adapter["layers.1.attention.wk.lora.B.weight"].shape == (32, 4)  # 2 kv heads x 16 dims
    assert torch.load(out / "lora" / "lora_all_64_resume.pth", weights_only=True)["world_size"] == 2


def test_default_start_needs_the_full_sft_weights(tmp_path, shared_data):
    data = write_records(identity_records(shared_data)[:8], tmp_path / "identity_8.jsonl")
    with pytest.raises(MissingInputError, match=r"full_sft_64\.pth not found: run train_full_sft\.py first"):
        train_lora.main([*CPU_FP32, *TINY_FLAGS, "--data_path", str(data), "--out_dir", str(tmp_path / "empty")])
