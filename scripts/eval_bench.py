"""Benchmark a MiniMind checkpoint and write its report card: multiple choice (C-Eval / CMMLU / MMLU style),
held-out perplexity and bits per byte, or generative maths. The logic is in model/benchmarks.py.

Run (the model flags are eval_model.py's: native weights by --model_mode or --weight, a Hugging Face folder with
--load 1 --hf_path, an adapter with --lora_name):
    python scripts/eval_bench.py --task mcq --data_path ../shared/data/eval/mcq_zh.jsonl          # letters, zero-shot
    python scripts/eval_bench.py --task mcq --data_path ../shared/data/eval/mcq_en.jsonl --shots 5 \
        --scoring continuation
    python scripts/eval_bench.py --task mcq --data_path ceval-exam --shots 5      # official C-Eval folder (val/, dev/)
    python scripts/eval_bench.py --task ppl --data_path ../shared/data/pretrain_mini.jsonl --model_mode pretrain
    python scripts/eval_bench.py --task math --data_path ../shared/data/eval/gen_math.jsonl --model_mode reason
    python scripts/eval_bench.py --load 1 --hf_path MiniMind2-Small --task mcq --data_path ... --limit 200 --seed 1

Writes {report_dir}/{name}.json (model, data, settings, every figure, one record per item) and {name}.md (the same
as a card with a table), prints the card, and with --lm_eval_task DIR also writes the scored prompts as a local
lm-eval task to check the accuracy with lm_eval on the Hugging Face export.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/eval_bench.py` from anywhere

from transformers import PreTrainedTokenizerBase  # noqa: E402

from model.benchmarks import (  # noqa: E402
    SCORINGS, Findings, ReportCard, choice_prompts, choose_indices, evaluate_choices, evaluate_math, evaluate_text,
    lm_eval_task_name, load_choice_data, model_summary, read_math_jsonl, write_lm_eval_task,
)
from model.common import exit_on_input_error  # noqa: E402
from model.dataset import PretrainDataset  # noqa: E402
from model.loading import add_model_args, load_model, model_source, resolve_infer_dtype  # noqa: E402
from model.model import MiniMindLM  # noqa: E402

TASKS = ("mcq", "ppl", "math")
TaskRun = tuple[dict, dict, Findings]  # what the card says about the data, the task's settings, the findings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a MiniMind checkpoint and write its report card")
    add_model_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--task", required=True, choices=TASKS,
                       help="mcq: multiple choice; ppl: loss, perplexity and bits per byte of {\"text\"} lines; "
                            "math: greedy replies, exact match of the final number")
    bench.add_argument("--data_path", required=True,
                       help="mcq: a {subject, question, choices, answer} jsonl or an official C-Eval / CMMLU folder; "
                            "ppl: a pretraining jsonl; math: a {question, answer} jsonl")
    bench.add_argument("--limit", type=int, default=None, help="score this many items, drawn at random with --seed")
    bench.add_argument("--seed", type=int, default=0, help="which items --limit draws")
    bench.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (mcq, ppl) or replies "
                                                                  "generated together (math)")
    mcq = parser.add_argument_group("multiple choice (--task mcq)")
    mcq.add_argument("--scoring", default="letter", choices=SCORINGS,
                     help="letter: the option letter with the highest next-token log-probability (lm-eval acc); "
                          "continuation: the option text with the highest log-probability per character (acc_norm)")
    mcq.add_argument("--shots", type=int, default=0,
                     help="solved examples of the same subject before each question: from dev/ of an official folder, "
                          "from --dev_path, else the first SHOTS items of each subject of the file (then not scored)")
    mcq.add_argument("--dev_path", default=None, help="jsonl of solved examples for --shots (same format as the data)")
    mcq.add_argument("--lm_eval_task", default=None, metavar="DIR",
                     help="also write the scored prompts as a local lm-eval task (DIR/minimind_<name>.yaml + .jsonl)")
    maths = parser.add_argument_group("maths (--task math)")
    maths.add_argument("--max_new_tokens", type=int, default=256, help="reply length limit in tokens")
    report = parser.add_argument_group("report card")
    report.add_argument("--report_dir", default=None, help="where the card is written (default: --out_dir)")
    report.add_argument("--name", default=None, help="the card's file name without extension "
                                                     "(default: <model>-<task>-<data>)")
    return parser.parse_args(argv)


def run_mcq(args: argparse.Namespace, model: MiniMindLM, tokenizer: PreTrainedTokenizerBase, name: str) -> TaskRun:
    data = load_choice_data(args.data_path, args.shots, args.dev_path)
    prompts = choice_prompts(data, tokenizer, args.shots, args.scoring,
                             choose_indices(len(data.items), args.limit, args.seed))
    if args.lm_eval_task:
        task = lm_eval_task_name(name)
        print(f"wrote lm-eval task {task}: {write_lm_eval_task(prompts, args.scoring, args.lm_eval_task, task)}")
    findings = evaluate_choices(model, tokenizer, prompts, args.scoring, args.batch_size, progress=True)
    settings = {"shots": args.shots, "scoring": args.scoring, **({"dev_path": args.dev_path} if args.dev_path else {})}
    return {"layout": data.layout, "items": len(data.items), "scored": len(prompts)}, settings, findings


def run_ppl(args: argparse.Namespace, model: MiniMindLM, tokenizer: PreTrainedTokenizerBase) -> TaskRun:
    dataset = PretrainDataset(args.data_path, tokenizer, max_length=model.config.max_seq_len)
    indices = choose_indices(len(dataset), args.limit, args.seed)
    findings = evaluate_text(model, dataset, indices, args.batch_size, progress=True)
    return ({"layout": "jsonl", "items": len(dataset), "scored": len(indices)},
            {"max_length": model.config.max_seq_len}, findings)


def run_math(args: argparse.Namespace, model: MiniMindLM, tokenizer: PreTrainedTokenizerBase) -> TaskRun:
    items = read_math_jsonl(args.data_path)
    chosen = [items[i] for i in choose_indices(len(items), args.limit, args.seed)]
    findings = evaluate_math(model, tokenizer, chosen, args.max_new_tokens, args.batch_size, progress=True)
    data = {"layout": "jsonl", "items": len(items), "scored": len(chosen)}
    return data, {"max_new_tokens": args.max_new_tokens}, findings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_model(args)
    device = next(model.parameters()).device
    source = model_source(args)
    model_name = Path(source).stem + (f"+{args.lora_name}" if args.lora_name else "")
    name = args.name or f"{model_name}-{args.task}-{Path(args.data_path).stem}"

    start = time.perf_counter()
    if args.task == "mcq":
        data, settings, findings = run_mcq(args, model, tokenizer, name)
    elif args.task == "ppl":
        data, settings, findings = run_ppl(args, model, tokenizer)
    else:
        data, settings, findings = run_math(args, model, tokenizer)
    seconds = time.perf_counter() - start

    card = ReportCard(args.task, model_summary(model, str(source), args.lora_name), {"path": args.data_path, **data},
                      {"limit": args.limit, "seed": args.seed, "batch_size": args.batch_size, **settings}, findings,
                      str(device), resolve_infer_dtype(args.infer_dtype, device), seconds)
    json_path, markdown_path = card.write(args.report_dir or args.out_dir, name)
    print(card.to_markdown())
    print(f"wrote {json_path} and {markdown_path}")


if __name__ == "__main__":
    exit_on_input_error(main)
