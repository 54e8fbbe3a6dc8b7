"""The bundled demo: every MiniMind training stage, run through the real scripts on a made-up world small enough to
learn on a laptop CPU in minutes, and each stage measured on data it never trained on.

    python scripts/demo.py                  # all stages (~19 min of training on 2 CPU cores), then the results table
    python scripts/demo.py --seed 2         # another world and another initialisation
    python scripts/demo.py --fresh          # retrain every stage (by default finished stages are reused)
    python scripts/demo.py --quick          # a shortened run with a tiny world (for tests; the figures mean little)

Stages, each a command a user could type (printed as it starts):
    data        scripts/make_demo_data.py     the mini-world's text, chats, pairs and problems -> dataset/demo/
    tokenizer   scripts/train_tokenizer.py    a BPE tokenizer of the demo text -> out/demo/tokenizer/
    pretrain    train_pretrain.py             the world's biographies (+ QA chats about half of the entities)
    sft         train_full_sft.py             QA chats about that half only, replaying pretraining text
    lora        train_lora.py                 an adapter that gives the assistant a new name
    dpo         train_dpo.py                  right over wrong answers about other entities
    distill     train_distillation.py (x2)    a half-depth student from the SFT model's blocks, with it as teacher and without
    reason      train_distill_reason.py       multi-step arithmetic, thinking in <think> before the <answer>
    tools       train_full_sft.py             the SFT model fine-tuned to call a calculator and a lookup tool
Then it prints one table and a few sample chats, and writes out/demo/results.json and images/demo_loss.png.

What it teaches: a small model answers questions about facts it only *read* (the held-out entities) when the
same text also shows it questions answered about other entities (mixed into pretraining and SFT), each fact is
stated in many paraphrases, and every name is one token that repeats within a text. Without those, plain
pretrain-then-SFT learns to answer only the entities it was fine-tuned on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from model.checkpoint import atomic_write_text  # noqa: E402
from model.dataset import DPODataset, PretrainDataset, SFTDataset  # noqa: E402
from model.loading import load_into_model  # noqa: E402
from model.common import select_device  # noqa: E402
from model.evaluation import generate_replies, mean_loss, preference_log_probs, replies_with_tools  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindLM  # noqa: E402
from model.model_lora import attach_lora_file, lora_path  # noqa: E402
from model.tools import ToolRound  # noqa: E402
from model.train_log import format_duration, read_metrics  # noqa: E402
from scripts.make_demo_data import demo_tools  # noqa: E402

# The demo model and the distillation student: as wide, half as deep (it starts from the teacher's blocks 0 and 2)
MODEL = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}
STUDENT = {**MODEL, "n_layers": 2}
MAX_SEQ_LEN = 128
TOOL_SEQ_LEN = 384  # a tool chat lists both tools' schemas in its system turn: ~280 tokens
TOOL_REPLY_TOKENS = 48  # a call or an answer
TOOL_BATCH_SIZE = 16  # copying the question's numbers and names into a call is learned late and abruptly: ~1,000 steps
BATCH_SIZE = 8  # small batches, many steps: what a model this size needs most
LOG_POINTS = 25  # log lines (loss-curve points) per training run
DPO_BETA = 0.1
WELL_FORMED = re.compile(r"<think>\n(.+?)\n</think>\n<answer>\n(.+?)\n</answer>", re.S)


# Typical seconds per stage of the full demo on 2 CPU cores (measured on an Intel Xeon, the tools stage on an AMD
# EPYC, which ran the other stages ~1.25x slower; the ETA scales them by this machine's speed)
SECONDS_FULL = {"data": 3, "tokenizer": 4, "pretrain": 185, "sft": 75, "lora": 13, "dpo": 10, "distill": 42,
                "reason": 63, "tools": 672}


@dataclass(frozen=True)
class Plan:
    """What each stage trains on and for how long; `full` is the demo, `quick` a smoke run for tests."""
    world: tuple[str, ...]  # make_demo_data.py flags
    pretrain_epochs: int
    sft_epochs: int
    lora_epochs: int
    dpo_epochs: int
    distill_epochs: int
    reason_epochs: int
    tools_epochs: int
    max_steps: int  # 0: no cap; the quick plan caps every run
    seconds: dict[str, float]  # typical seconds per stage on 2 CPU cores, for the ETA


FULL = Plan(
    world=("--n_people", "160", "--n_animals", "48", "--n_cities", "12", "--mentions", "180", "--qa_per_fact", "6",
           "--n_reason", "12000", "--n_identity", "100", "--dpo_per_fact", "2", "--n_distill", "600"),
    pretrain_epochs=1, sft_epochs=1, lora_epochs=4, dpo_epochs=1, distill_epochs=4, reason_epochs=1, tools_epochs=7,
    max_steps=0,
    seconds=SECONDS_FULL,
)
QUICK = Plan(
    world=("--n_people", "16", "--n_animals", "6", "--n_cities", "4", "--mentions", "12", "--qa_per_fact", "2",
           "--n_reason", "200", "--n_identity", "16", "--dpo_per_fact", "1", "--n_distill", "100", "--n_tool", "32"),
    pretrain_epochs=1, sft_epochs=1, lora_epochs=1, dpo_epochs=1, distill_epochs=1, reason_epochs=1, tools_epochs=1,
    max_steps=30,
    seconds={"data": 2, "tokenizer": 4, "pretrain": 8, "sft": 7, "lora": 6, "dpo": 7, "distill": 14, "reason": 7,
             "tools": 10},
)


@dataclass
class Stage:
    name: str
    what: str
    commands: list[list[str]]
    outputs: list[Path]


# ----------------------------------------------------------------------------------------------------------------
# The stages: commands, reuse and progress


def flags(values: dict[str, int]) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def training_flags(args: argparse.Namespace, out_dir: Path, data_file: Path, epochs: int, max_steps: int,
                   max_seq_len: int = MAX_SEQ_LEN, batch_size: int = BATCH_SIZE) -> list[str]:
    """The flags every training run of the demo shares, with a log interval giving ~LOG_POINTS curve points.
    (Before the data stage has run the step count is unknown; the flags are built again once it has.)"""
    steps = count_lines(data_file) // batch_size * epochs if data_file.exists() else 0
    if max_steps:
        steps = min(steps, max_steps)
    return [
        "--out_dir", str(out_dir), "--tokenizer_path", str(args.out_dir / "tokenizer"),
        "--data_path", str(data_file), "--max_seq_len", str(max_seq_len), "--batch_size", str(batch_size),
        "--accumulation_steps", "1", "--epochs", str(epochs), "--max_steps", str(max_steps), "--num_workers", "0",
        "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed), "--save_interval", "1000000",
        "--log_interval", str(max(1, steps // LOG_POINTS)),
    ]


def build_stages(args: argparse.Namespace, plan: Plan) -> list[Stage]:
    data, out = args.data_dir, args.out_dir
    model = flags(MODEL)
    suffix = f"_{MODEL['dim']}"

    def train(script: str, data_file: str, epochs: int, *extra: str) -> list[str]:
        return [script, *model, *training_flags(args, out, data / data_file, epochs, plan.max_steps), *extra]

    distill = []
    for with_teacher in (True, False):
        run_dir = out / "distill" / ("with_teacher" if with_teacher else "without_teacher")
        distill.append([
            "train_distillation.py", *flags(STUDENT),
            *training_flags(args, run_dir, data / "distill.jsonl", plan.distill_epochs, plan.max_steps),
            "--from_weight", "none", "--init_from_teacher", "1", "--learning_rate", "1e-3", "--warmup_iters", "30",
            "--teacher_dim", str(MODEL["dim"]), "--teacher_n_layers", str(MODEL["n_layers"]),
            "--teacher_n_heads", str(MODEL["n_heads"]), "--teacher_n_kv_heads", str(MODEL["n_kv_heads"]),
            "--teacher_weight", str(out / f"full_sft{suffix}.pth"),
            # with the teacher: only its distributions (KL, T = 1); without: only the data's labels
            "--alpha", "0" if with_teacher else "1", "--temperature", "1",
        ])
    return [
        Stage("data", "generate the mini-world", [["scripts/make_demo_data.py", "--out_dir", str(data),
                                                    "--seed", str(args.seed), *plan.world]], [data / "world.json"]),
        Stage("tokenizer", "train a BPE tokenizer on the demo text",
              [["scripts/train_tokenizer.py", "--data_path", *(str(data / f) for f in
                ("pretrain.jsonl", "sft.jsonl", "lora_identity.jsonl", "reason.jsonl", "tool_text.jsonl")),
                "--vocab_size", "2048", "--isolate_spaces", "1", "--split_digits", "1", "--out_dir", str(out / "tokenizer")]],
              [out / "tokenizer" / "tokenizer.json"]),
        Stage("pretrain", "pretrain from random init on the biographies",
              [train("train_pretrain.py", "pretrain.jsonl", plan.pretrain_epochs, "--learning_rate", "2e-3",
                     "--warmup_iters", "100")], [out / f"pretrain{suffix}.pth"]),
        Stage("sft", "fine-tune on QA chats about the SFT split (plus replayed text)",
              [train("train_full_sft.py", "sft.jsonl", plan.sft_epochs, "--learning_rate", "1e-3",
                     "--warmup_iters", "20")], [out / f"full_sft{suffix}.pth"]),
        Stage("lora", "train a LoRA adapter with a new identity (base frozen)",
              [train("train_lora.py", "lora_identity.jsonl", plan.lora_epochs, "--learning_rate", "2e-3",
                     "--lora_rank", "8", "--lora_targets", "all", "--warmup_iters", "10")],
              [lora_path(out, "lora_identity", MODEL["dim"])]),
        Stage("dpo", "prefer right over wrong answers (DPO)",
              [train("train_dpo.py", "dpo.jsonl", plan.dpo_epochs, "--learning_rate", "1e-4",
                     "--beta", str(DPO_BETA))], [out / f"rlhf{suffix}.pth"]),
        Stage("distill", f"distil the SFT model into a {STUDENT['n_layers']}-block student, and train the same "
                         f"student without it", distill,
              [out / "distill" / run / f"full_dist_{STUDENT['dim']}.pth" for run in ("with_teacher", "without_teacher")]),
        Stage("reason", "learn to think before answering (multi-step arithmetic)",
              [train("train_distill_reason.py", "reason.jsonl", plan.reason_epochs, "--learning_rate", "2e-3",
                     "--warmup_iters", "20")], [out / f"reason{suffix}.pth"]),
        Stage("tools", "fine-tune the SFT model to call tools (a calculator, a lookup over the world's facts)",
              [["train_full_sft.py", *model, *training_flags(args, out / "tools", data / "tool_sft.jsonl",
                                                              plan.tools_epochs, plan.max_steps, TOOL_SEQ_LEN, TOOL_BATCH_SIZE),
                "--from_weight", str(out / f"full_sft{suffix}.pth"), "--learning_rate", "2e-3", "--warmup_iters", "20"]],
              [out / "tools" / f"full_sft{suffix}.pth"]),
    ]


def fingerprint(commands: list[list[str]], upstream: str) -> str:
    """Identifies a stage's work: its commands and everything before it."""
    return hashlib.sha256(json.dumps([commands, upstream]).encode()).hexdigest()[:16]


def code_version() -> str:
    """A hash of the code the stages run (the scripts and model/), so that a changed script retrains what follows."""
    sources = sorted([*REPO_ROOT.glob("train_*.py"), *(REPO_ROOT / "model").glob("*.py"),
                      REPO_ROOT / "scripts" / "make_demo_data.py", REPO_ROOT / "scripts" / "train_tokenizer.py"])
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Manifest:
    """OUT_DIR/stages.json: for each finished stage, its fingerprint, training seconds and the sha256 of each of
    its outputs when it finished (so a later stage can prove it left them untouched)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def finished(self, stage: Stage, stage_fingerprint: str) -> bool:
        entry = self.entries.get(stage.name)
        return (entry is not None and entry["fingerprint"] == stage_fingerprint
                and all(path.exists() for path in stage.outputs))

    def record(self, stage: Stage, stage_fingerprint: str, seconds: float) -> None:
        self.entries[stage.name] = {"fingerprint": stage_fingerprint, "seconds": seconds,
                                    "outputs": {str(path): sha256(path) for path in stage.outputs}}
        self.save()

    def forget(self, stage: Stage) -> None:
        self.entries.pop(stage.name, None)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.entries, indent=1) + "\n")


def run_stages(args: argparse.Namespace, plan: Plan, manifest: Manifest,
               evaluate: Callable[[str], None]) -> dict[str, dict]:
    """Run (or reuse) every stage in order, each followed by its evaluation; returns {stage: {seconds, reused}}."""
    done: dict[str, dict] = {}
    upstream = code_version()
    start = time.time()
    stage_names = [stage.name for stage in build_stages(args, plan)]
    for index, name in enumerate(stage_names):
        stage = next(s for s in build_stages(args, plan) if s.name == name)  # rebuilt: flags depend on the data
        stage_fingerprint = fingerprint(stage.commands, upstream)
        upstream = stage_fingerprint
        remaining = sum(plan.seconds[n] for n in stage_names[index:])
        # this machine's speed against the 2-core reference, from the training stages run so far
        measured = [n for n, entry in done.items() if not entry["reused"] and n not in ("data", "tokenizer")]
        speed = sum(done[n]["seconds"] for n in measured) / sum(plan.seconds[n] for n in measured) if measured else 1.0
        header = f"[{index + 1}/{len(stage_names)}] {name}: {stage.what}"
        if not args.fresh and manifest.finished(stage, stage_fingerprint):
            seconds = manifest.entries[name]["seconds"]
            print(f"\n{header} -- reusing the finished stage ({seconds:.0f} s when it ran; --fresh retrains)", flush=True)
            done[name] = {"seconds": seconds, "reused": True}
        else:
            print(f"\n{header}\n    expected: about {format_duration(plan.seconds[name] * speed)} for this stage, "
                  f"{format_duration(remaining * speed)} until the demo's end (elapsed {format_duration(time.time() - start)})",
                  flush=True)
            manifest.forget(stage)
            began = time.time()
            for command in stage.commands:
                print("    $ python " + " ".join(command).replace(f"{REPO_ROOT}/", ""), flush=True)
                result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT)
                if result.returncode != 0:
                    raise SystemExit(f"demo: stage '{name}' failed (exit {result.returncode}); the command is printed "
                                     f"above, run it from {REPO_ROOT} to see why")
            seconds = time.time() - began
            manifest.record(stage, stage_fingerprint, seconds)
            done[name] = {"seconds": seconds, "reused": False}
        evaluate(name)
    return done


# ----------------------------------------------------------------------------------------------------------------
# Measuring each stage on its held-out data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def values_named(reply: str, candidates: list[str]) -> set[str]:
    """The candidate values a reply mentions as whole words."""
    return {value for value in candidates if re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply)}


class Evaluator:
    """Loads the checkpoints each stage wrote and measures them; figures accumulate in `results`."""

    def __init__(self, args: argparse.Namespace, manifest: Manifest):
        self.args, self.manifest = args, manifest
        self.device = select_device(args.device)
        self.results: dict = {}
        self.samples: list[dict] = []
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.data = args.data_dir

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.args.out_dir / "tokenizer")
        return self._tokenizer

    def load(self, weights: Path, shape: dict = MODEL, lora: Path | None = None, context: int = 256) -> MiniMindLM:
        config = LMConfig(**shape, vocab_size=len(self.tokenizer), max_seq_len=context)
        model = MiniMindLM(config)
        load_into_model(model, weights, "run the demo stage that writes it")
        if lora is not None:
            attach_lora_file(model, str(lora))
        return model.to(self.device).eval()

    def weights(self, stage: str) -> Path:
        return self.args.out_dir / f"{stage}_{MODEL['dim']}.pth"

    def __call__(self, stage: str) -> None:
        getattr(self, f"after_{stage}")()

    # -- stages ----------------------------------------------------------------------------------------------

    def after_data(self) -> None:
        world = json.loads((self.data / "world.json").read_text(encoding="utf-8"))
        splits = {split: sum(e["split"] == split for e in world["entities"]) for split in ("sft", "dpo", "heldout")}
        self.results["world"] = {"entities": len(world["entities"]), "splits": splits,
                                 "facts": sum(len(e["facts"]) for e in world["entities"])}
        self.world = world

    def after_tokenizer(self) -> None:
        names = [entity["name"] for entity in self.world["entities"]]
        single = sum(len(self.tokenizer.encode(name, add_special_tokens=False)) == 1 for name in names)
        self.results["tokenizer"] = {"vocab_size": len(self.tokenizer), "names": len(names), "single_token_names": single}
        print(f"    -> {len(self.tokenizer):,} tokens; {single} of {len(names)} names are single tokens", flush=True)

    def after_pretrain(self) -> None:
        model = self.load(self.weights("pretrain"))
        true_loss = mean_loss(model, PretrainDataset(self.data / "eval_text.jsonl", self.tokenizer, MAX_SEQ_LEN))
        false_loss = mean_loss(model, PretrainDataset(self.data / "eval_text_false.jsonl", self.tokenizer, MAX_SEQ_LEN))
        qa = self.qa_accuracy(model)
        self.results["pretrain"] = {
            "parameters": model.num_parameters(), "heldout_text_loss": true_loss, "false_fact_text_loss": false_loss,
            "uniform_loss": math.log(len(self.tokenizer)), "heldout_qa_accuracy": qa["heldout"]["accuracy"],
        }
        print(f"    -> held-out text loss {true_loss:.3f} (the same text with false facts: {false_loss:.3f}); "
              f"held-out QA already {qa['heldout']['accuracy']:.1%}", flush=True)

    def after_sft(self) -> None:
        model = self.load(self.weights("full_sft"))
        qa = self.qa_accuracy(model, keep_samples=True)
        self.results["sft"] = qa
        self.results["heldout_qa_accuracy"] = qa["heldout"]["accuracy"]
        self.results["seen_qa_accuracy"] = qa["sft"]["accuracy"]
        self.results["chance_level"] = qa["heldout"]["chance"]
        print(f"    -> QA exact match: held-out {qa['heldout']['accuracy']:.1%}, SFT-seen {qa['sft']['accuracy']:.1%} "
              f"(chance {qa['heldout']['chance']:.1%})", flush=True)

    def after_lora(self) -> None:
        base_file = self.weights("full_sft")
        adapter = lora_path(self.args.out_dir, "lora_identity", MODEL["dim"])
        questions = read_jsonl(self.data / "eval_identity.jsonl")
        chats = [[{"role": "user", "content": q["question"]}] for q in questions]
        base_name, lora_name = self.world["assistant_names"]["base"], self.world["assistant_names"]["lora"]
        with_adapter = generate_replies(self.load(base_file, lora=adapter), self.tokenizer, chats, max_new_tokens=40)
        without = generate_replies(self.load(base_file), self.tokenizer, chats, max_new_tokens=40)
        adapted_qa = self.qa_accuracy(self.load(base_file, lora=adapter))["heldout"]["accuracy"]
        self.results["lora"] = {
            "questions": len(questions),
            "new_name_with_adapter": sum(lora_name in reply for reply in with_adapter),
            "base_name_without_adapter": sum(base_name in reply and lora_name not in reply for reply in without),
            "base_sha256_when_sft_finished": self.manifest.entries["sft"]["outputs"][str(base_file)],
            "base_sha256_after_lora": sha256(base_file),
            "heldout_qa_accuracy_with_adapter": adapted_qa,
            "adapter_bytes": adapter.stat().st_size,
            "replies": [{"question": q["question"], "with_adapter": a, "without_adapter": b}
                        for q, a, b in zip(questions, with_adapter, without)],
        }
        lora = self.results["lora"]
        lora["base_file_unchanged"] = lora["base_sha256_when_sft_finished"] == lora["base_sha256_after_lora"]
        print(f"    -> '{lora_name}' in {lora['new_name_with_adapter']}/{len(questions)} replies with the adapter, "
              f"'{base_name}' in {lora['base_name_without_adapter']}/{len(questions)} without; base file "
              f"{'unchanged' if lora['base_file_unchanged'] else 'CHANGED'}", flush=True)

    def after_dpo(self) -> None:
        pairs = DPODataset(self.data / "eval_dpo.jsonl", self.tokenizer, MAX_SEQ_LEN)
        before_chosen, before_rejected = preference_log_probs(self.load(self.weights("full_sft")), pairs)
        model = self.load(self.weights("rlhf"))
        after_chosen, after_rejected = preference_log_probs(model, pairs)
        chosen_reward = DPO_BETA * (after_chosen - before_chosen)
        rejected_reward = DPO_BETA * (after_rejected - before_rejected)
        self.results["dpo"] = {
            "pairs": len(pairs),
            "reward_accuracy_before": 0.0,  # policy == reference: every reward is 0, no pair is won
            "reward_accuracy_after": float((chosen_reward > rejected_reward).float().mean()),
            "reward_margin_after": float((chosen_reward - rejected_reward).mean()),
            "preference_accuracy_before": float((before_chosen > before_rejected).float().mean()),
            "preference_accuracy_after": float((after_chosen > after_rejected).float().mean()),
            "log_prob_margin_before": float((before_chosen - before_rejected).mean()),
            "log_prob_margin_after": float((after_chosen - after_rejected).mean()),
            "heldout_qa_accuracy_after": self.qa_accuracy(model)["heldout"]["accuracy"],
        }
        dpo = self.results["dpo"]
        print(f"    -> held-out pairs: reward accuracy {dpo['reward_accuracy_after']:.1%}, chosen-rejected log-prob "
              f"margin {dpo['log_prob_margin_before']:.2f} -> {dpo['log_prob_margin_after']:.2f} nats", flush=True)

    def after_distill(self) -> None:
        text = PretrainDataset(self.data / "eval_text.jsonl", self.tokenizer, MAX_SEQ_LEN)
        chats = SFTDataset(self.data / "eval_qa.jsonl", self.tokenizer, MAX_SEQ_LEN)
        models = {run: self.load(self.args.out_dir / "distill" / run / f"full_dist_{STUDENT['dim']}.pth", STUDENT)
                  for run in ("with_teacher", "without_teacher")}
        models["teacher"] = self.load(self.weights("full_sft"))
        figures: dict = {name: {"parameters": model.num_parameters(), "heldout_text_loss": mean_loss(model, text),
                                "heldout_qa_loss": mean_loss(model, chats),
                                "heldout_qa_accuracy": self.qa_accuracy(model)["heldout"]["accuracy"]}
                         for name, model in models.items()}
        self.results["distill"] = figures
        print(f"    -> student held-out text loss {figures['with_teacher']['heldout_text_loss']:.3f} with the teacher, "
              f"{figures['without_teacher']['heldout_text_loss']:.3f} without; held-out QA "
              f"{figures['with_teacher']['heldout_qa_accuracy']:.1%} vs {figures['without_teacher']['heldout_qa_accuracy']:.1%}",
              flush=True)

    def after_reason(self) -> None:
        problems = read_jsonl(self.data / "eval_reason.jsonl")
        before = self.reasoning_scores(self.load(self.weights("rlhf")), problems)
        after = self.reasoning_scores(self.load(self.weights("reason")), problems, keep_samples=True)
        self.results["reason"] = {"problems": len(problems), "before": before, "after": after}
        print(f"    -> well-formed think/answer {after['well_formed']:.1%} (before {before['well_formed']:.1%}), "
              f"answers right {after['accuracy']:.1%} (before {before['accuracy']:.1%})", flush=True)

    def after_tools(self) -> None:
        records = read_jsonl(self.data / "eval_tools.jsonl")
        tools = demo_tools(self.data)
        context = TOOL_SEQ_LEN + TOOL_REPLY_TOKENS * 2
        before = self.tool_scores(self.load(self.weights("full_sft"), context=context), records, tools)
        after = self.tool_scores(self.load(self.args.out_dir / "tools" / f"full_sft_{MODEL['dim']}.pth", context=context),
                                 records, tools, keep_samples=True)
        self.results["tools"] = {"before": before, "after": after}
        print(f"    -> right call on {after['call_prompts']} held-out prompts: {before['right_call']:.1%} -> "
              f"{after['right_call']:.1%}; unseen sums right {after['with_tools']['sum']:.1%} with the calculator, "
              f"{after['without_tools']['sum']:.1%} without", flush=True)

    # -- measures --------------------------------------------------------------------------------------------

    def qa_accuracy(self, model: MiniMindLM, keep_samples: bool = False) -> dict:
        """Exact match of the answer value: the greedy reply names the right value and no other candidate."""
        records = read_jsonl(self.data / "eval_qa.jsonl")
        replies = generate_replies(model, self.tokenizer, [r["conversations"][:1] for r in records], max_new_tokens=32)
        by_split: dict[str, dict] = {}
        for split in ("sft", "heldout"):
            rows = [(r, reply) for r, reply in zip(records, replies) if r["split"] == split]
            right = [values_named(reply, r["candidates"]) == {r["answer"]} for r, reply in rows]
            exact = [reply.strip() == r["conversations"][1]["content"] for r, reply in rows]
            by_split[split] = {
                "questions": len(rows), "accuracy": sum(right) / len(rows),
                "reply_exact_match": sum(exact) / len(rows),
                "chance": sum(1 / len(r["candidates"]) for r, _ in rows) / len(rows),
                "by_language": {lang: sum(ok for (r, _), ok in zip(rows, right) if r["language"] == lang)
                                / max(1, sum(r["language"] == lang for r, _ in rows)) for lang in ("en", "zh")},
            }
        if keep_samples:
            heldout = [(r, reply) for r, reply in zip(records, replies) if r["split"] == "heldout" and r["kind"] == "person"]
            for language in ("en", "zh"):
                for r, reply in [pair for pair in heldout if pair[0]["language"] == language][:2]:
                    self.samples.append({"stage": "sft (held-out entity)", "user": r["conversations"][0]["content"],
                                         "assistant": reply, "expected": r["conversations"][1]["content"]})
        return by_split

    def reasoning_scores(self, model: MiniMindLM, problems: list[dict], keep_samples: bool = False) -> dict:
        replies = generate_replies(model, self.tokenizer, [p["conversations"][:1] for p in problems], max_new_tokens=90)
        formed = [WELL_FORMED.fullmatch(reply.strip()) for reply in replies]
        right = [bool(m) and m.group(2).strip() == str(p["answer"]) for m, p in zip(formed, problems)]
        if keep_samples:
            for p, reply in list(zip(problems, replies))[:2]:
                self.samples.append({"stage": "reason (unseen problem)", "user": p["conversations"][0]["content"],
                                     "assistant": reply, "expected": str(p["answer"])})
        return {"well_formed": sum(bool(m) for m in formed) / len(problems), "accuracy": sum(right) / len(problems)}

    def tool_scores(self, model: MiniMindLM, records: list[dict], tools: dict, keep_samples: bool = False) -> dict:
        scores, rounds = tool_scores(model, self.tokenizer, records, tools)
        if keep_samples:
            for kind in ("sum", "lookup"):
                record, turns = next((r, t) for r, t in zip(records, rounds) if r["kind"] == kind)
                self.samples.append({"stage": f"tools (unseen {'problem' if kind == 'sum' else 'entity'})",
                                     "user": record["conversations"][0]["content"], "assistant": tool_transcript(turns),
                                     "expected": record["answer"]})
        return scores


def tool_scores(model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                tools: dict) -> tuple[dict, list[list[ToolRound]]]:
    """Each held-out tool prompt (eval_tools.jsonl) asked with the tools listed (the calls the first reply makes
    are run and fed back, and the next reply is the answer) and asked with no tools. right_call: the first reply
    makes exactly the reference call (right_tool: one call, to the reference's tool); no_call: no call where none is
    needed; with_tools / without_tools: the answer is right, by kind of question. Also returns each prompt's
    rounds."""
    questions = [record["conversations"][:1] for record in records]
    rounds = replies_with_tools(model, tokenizer, [list(q) for q in questions], tools,
                                max_new_tokens=TOOL_REPLY_TOKENS, max_rounds=2)
    plain = generate_replies(model, tokenizer, questions, max_new_tokens=TOOL_REPLY_TOKENS)
    right_call, right_tool, no_call = [], [], []
    by_kind: dict[str, dict[str, list[bool]]] = {}
    for record, turns, plain_reply in zip(records, rounds, plain):
        made = turns[0].calls
        if record["kind"] == "direct":
            no_call.append(not made)
            continue
        expected = record["conversations"][1]["tool_calls"][0]["function"]
        right_tool.append(len(made) == 1 and made[0].name == expected["name"])
        right_call.append(right_tool[-1] and made[0].arguments == expected["arguments"])
        kind = by_kind.setdefault(record["kind"], {"with_tools": [], "without_tools": []})
        kind["with_tools"].append(answered(turns[-1].content, record))
        kind["without_tools"].append(answered(plain_reply, record))
    scores = {"call_prompts": len(right_call), "right_call": sum(right_call) / len(right_call),
              "right_tool": sum(right_tool) / len(right_tool),
              "no_call_prompts": len(no_call), "no_call": sum(no_call) / max(1, len(no_call)),
              **{column: {kind: sum(s[column]) / len(s[column]) for kind, s in by_kind.items()}
                 for column in ("with_tools", "without_tools")}}
    return scores, rounds


def answered(reply: str, record: dict) -> bool:
    """A lookup's answer names the right value and no other candidate; an arithmetic answer's last number is the
    result ("63 + 43 = 106.")."""
    if record["kind"] == "lookup":
        return values_named(reply, record["candidates"]) == {record["answer"]}
    numbers = re.findall(r"-?\d+", reply)
    return bool(numbers) and numbers[-1] == record["answer"]


def tool_transcript(turns: list[ToolRound]) -> str:
    """A conversation's rounds in one line: each call with its result, then the answer."""
    return " ".join([f"{call.to_text()} -> {result}" for turn in turns for call, result in zip(turn.calls, turn.results)]
                    + [turns[-1].content])


# ----------------------------------------------------------------------------------------------------------------
# Report: table, samples, results.json, loss curves


def print_table(results: dict, stages: dict[str, dict]) -> None:
    r = results
    sft, lora, dpo, dist, reason, tools = r["sft"], r["lora"], r["dpo"], r["distill"], r["reason"], r["tools"]
    rows = [
        ("data", f"{r['world']['entities']} entities, {r['world']['facts']} facts; split into "
                 + ", ".join(f"{k} {v}" for k, v in r["world"]["splits"].items())),
        ("tokenizer", f"{r['tokenizer']['vocab_size']:,} tokens; {r['tokenizer']['single_token_names']}/"
                      f"{r['tokenizer']['names']} names are single tokens"),
        ("pretrain", f"held-out text loss {r['pretrain']['heldout_text_loss']:.3f} (same text, facts made false: "
                     f"{r['pretrain']['false_fact_text_loss']:.3f}; uniform guess {r['pretrain']['uniform_loss']:.2f})"),
        ("sft", f"QA exact match, held-out entities {sft['heldout']['accuracy']:.1%} (chance {r['chance_level']:.1%}); "
                f"SFT-seen entities {sft['sft']['accuracy']:.1%}"),
        ("lora", f"new name in {lora['new_name_with_adapter']}/{lora['questions']} unseen identity questions with the "
                 f"adapter, old name in {lora['base_name_without_adapter']}/{lora['questions']} without; base file "
                 f"{'unchanged (sha256)' if lora['base_file_unchanged'] else 'CHANGED'}"),
        ("dpo", f"held-out pairs: reward accuracy {dpo['reward_accuracy_before']:.0%} -> "
                f"{dpo['reward_accuracy_after']:.1%}, log-prob margin {dpo['log_prob_margin_before']:.2f} -> "
                f"{dpo['log_prob_margin_after']:.2f} nats"),
        ("distill", f"{STUDENT['n_layers']}-block student ({dist['with_teacher']['parameters'] / 1e6:.2f}M): held-out "
                    f"text loss {dist['with_teacher']['heldout_text_loss']:.3f} with teacher vs "
                    f"{dist['without_teacher']['heldout_text_loss']:.3f} without (teacher "
                    f"{dist['teacher']['heldout_text_loss']:.3f}); QA {dist['with_teacher']['heldout_qa_accuracy']:.1%} "
                    f"vs {dist['without_teacher']['heldout_qa_accuracy']:.1%}"),
        ("reason", f"unseen problems: well-formed {reason['before']['well_formed']:.0%} -> "
                   f"{reason['after']['well_formed']:.1%}, right {reason['before']['accuracy']:.0%} -> "
                   f"{reason['after']['accuracy']:.1%}"),
        ("tools", f"{tools['after']['call_prompts']} unseen prompts: right tool {tools['before']['right_tool']:.0%} -> "
                  f"{tools['after']['right_tool']:.1%}, right call {tools['before']['right_call']:.0%} -> "
                  f"{tools['after']['right_call']:.1%}; unseen sums right {tools['after']['with_tools']['sum']:.1%} "
                  f"with the calculator vs {tools['after']['without_tools']['sum']:.1%} without; no call on "
                  f"{tools['after']['no_call']:.0%} of {tools['after']['no_call_prompts']} that need none"),
    ]
    width = max(len(text) for _, text in rows)
    print("\n" + "=" * (width + 22))
    print(f"MiniMind demo, seed {r['seed']}: {r['model']}, {r['device']}, {r['dtype']}")
    print(f"{'stage':<10} {'train s':>8}   result (measured on data the stage never trained on)")
    print("-" * (width + 22))
    for name, text in rows:
        entry = stages[name]
        seconds = f"{entry['seconds']:.0f}" + ("*" if entry["reused"] else "")
        print(f"{name:<10} {seconds:>8}   {text}")
    print("-" * (width + 22))
    print(f"{'total':<10} {r['train_seconds_total']:>8.0f}   seconds of training ({format_duration(r['train_seconds_total'])})"
          + ("; * reused from an earlier run" if any(e["reused"] for e in stages.values()) else ""))


def print_samples(results: dict, samples: list[dict]) -> None:
    print("\nSample chats (greedy decoding):")
    for sample in samples:
        print(f"  [{sample['stage']}] user: {sample['user']}")
        print(f"      assistant: {sample['assistant']!r}   (expected: {sample['expected']!r})")
    for reply in results["lora"]["replies"][:2]:
        print(f"  [lora] user: {reply['question']}")
        print(f"      with adapter: {reply['with_adapter']!r}   without: {reply['without_adapter']!r}")


def plot_losses(args: argparse.Namespace, results: dict, path: Path) -> None:
    """One panel per training stage: the loss logged by each run's metrics file (the distillation panel also gives
    the two students' held-out losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, dim = args.out_dir, MODEL["dim"]
    panels = [
        ("pretrain", {"": out / f"pretrain_{dim}_metrics.jsonl"}),
        ("sft", {"": out / f"full_sft_{dim}_metrics.jsonl"}),
        ("lora", {"": lora_path(out, "lora_identity", dim).with_name(f"lora_identity_{dim}_metrics.jsonl")}),
        ("dpo", {"": out / f"rlhf_{dim}_metrics.jsonl"}),
        ("distill: the students' cross-entropy", {f"{run.replace('_', ' ')}": out / "distill" / run / f"full_dist_{STUDENT['dim']}_metrics.jsonl"
                               for run in ("with_teacher", "without_teacher")}),
        ("reason", {"": out / f"reason_{dim}_metrics.jsonl"}),
        ("tools", {"": out / "tools" / f"full_sft_{dim}_metrics.jsonl"}),
    ]
    figure, axes = plt.subplots(2, 4, figsize=(17, 7))
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (title, runs) in zip(axes.flat, panels):
        for label, metrics_file in runs.items():
            rows = read_metrics(metrics_file)
            key = "ce" if "ce" in rows[0] else "loss"  # distillation: the CE on the data, comparable across runs
            axis.plot([row["step"] for row in rows], [row[key] for row in rows], label=label or None)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(runs) > 1:
            held_out = {run: results["distill"][run]["heldout_text_loss"] for run in ("with_teacher", "without_teacher")}
            axis.legend(title="held-out loss " + " vs ".join(f"{loss:.3f}" for loss in held_out.values()))
    figure.suptitle(f"MiniMind demo training losses (seed {args.seed})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> str:
    """auto: bfloat16 (else float16) autocast on CUDA; float32 elsewhere, which is the fastest for a model this
    small on a CPU (measured: 14K vs 11K tokens/s with bfloat16 on 2 cores)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seed of the world and of every training run")
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps per stage (for tests)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing finished ones")
    parser.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="training precision; auto: bfloat16/float16 autocast on CUDA, float32 on CPU and MPS")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="checkpoints and results.json (default: out/demo, with --quick out/demo_quick)")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="the generated data (default: dataset/demo, with --quick dataset/demo_quick)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="loss-curve PNG (default: images/demo_loss.png; with --quick OUT_DIR/demo_loss.png)")
    args = parser.parse_args(argv)
    name = "demo_quick" if args.quick else "demo"
    args.out_dir = (args.out_dir or REPO_ROOT / "out" / name).resolve()
    args.data_dir = (args.data_dir or REPO_ROOT / "dataset" / name).resolve()
    if args.plot is None:
        args.plot = args.out_dir / "demo_loss.png" if args.quick else REPO_ROOT / "images" / "demo_loss.png"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = select_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    args.device = str(device)
    plan = QUICK if args.quick else FULL
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"MiniMind demo: seed {args.seed}, {'quick' if args.quick else 'full'} run on {device} ({args.dtype}); "
          f"data in {args.data_dir}, checkpoints in {args.out_dir}", flush=True)

    manifest = Manifest(args.out_dir / "stages.json")
    evaluator = Evaluator(args, manifest)
    stages = run_stages(args, plan, manifest, evaluator)

    results = {
        "seed": args.seed, "quick": args.quick, "device": args.device, "dtype": args.dtype,
        "model": f"{MODEL['dim']}x{MODEL['n_layers']} ({evaluator.results['pretrain']['parameters'] / 1e6:.2f}M parameters)",
        "stages": stages,
        "train_seconds_total": sum(entry["seconds"] for entry in stages.values()),
        **evaluator.results,
        "samples": evaluator.samples,
    }
    print_table(results, stages)
    print_samples(results, evaluator.samples)
    atomic_write_text(args.out_dir / "results.json", json.dumps(results, ensure_ascii=False, indent=1) + "\n")
    plot_losses(args, results, args.plot)
    print(f"\nwrote {args.out_dir / 'results.json'} and {args.plot}")
    out = str(args.out_dir).replace(f"{REPO_ROOT}/", "")
    print(f"chat with it: python eval_model.py --out_dir {out} --tokenizer_path {out}/tokenizer "
          f"--dim {MODEL['dim']} --n_layers {MODEL['n_layers']} --n_heads {MODEL['n_heads']} --n_kv_heads "
          f"{MODEL['n_kv_heads']} --temperature 0")
    return results


if __name__ == "__main__":
    main()
