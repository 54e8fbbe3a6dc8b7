"""eval_model.py and model/inference.py with tiny checkpoints whose replies are known in advance.

A dim-64 model is trained for a few seconds until it reproduces two fixed replies exactly under greedy decoding:
a reasoning reply to a chat prompt (with an emoji that byte-level BPE splits across tokens) and a continuation of
a raw-text prompt. Printed output, stop strings, truncation and streaming are checked against those known texts,
or against `model.generate` + `tokenizer.decode` for models that were not trained.
"""
import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import eval_model
from conftest import ROOT, TINY, TINY_FLAGS
from model import LMConfig, MiniMindLM
from model.common import DataFormatError, WeightsMismatchError
from model.hf_minimind import save_hf_folder
from model.inference import (
    IncrementalDecoder,
    ReplyRouter,
    build_prompt,
    split_reasoning,
    stream_chat,
)
from model.loading import add_model_args, load_model
from model.model_lora import apply_lora, save_lora
from model.tools import builtin_tools

QUESTION = "9.11和9.9哪个大？"
THINK, ANSWER = "比较小数位", "9.9更大🙂"
REPLY = f"<think>\n{THINK}\n</think>\n<answer>\n{ANSWER}\n</answer>"
OPENING, CONTINUATION = "世界上最高的山峰是", "珠穆朗玛峰"


def tiny_config(tokenizer) -> LMConfig:
    return LMConfig(**TINY, vocab_size=len(tokenizer), max_seq_len=256)


def chat_prompt_ids(tokenizer, question: str = QUESTION) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def continuation_prompt_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer.encode(OPENING, add_special_tokens=False)


@pytest.fixture(scope="module")
def memorized(tokenizer) -> MiniMindLM:
    """Trained until greedy decoding gives REPLY to QUESTION and CONTINUATION to OPENING, each followed by eos."""
    eos = tokenizer.eos_token_id
    pairs = [(chat_prompt_ids(tokenizer), tokenizer.encode(REPLY, add_special_tokens=False) + [eos]),
             (continuation_prompt_ids(tokenizer), tokenizer.encode(CONTINUATION, add_special_tokens=False) + [eos])]
    length = max(len(p) + len(r) for p, r in pairs) - 1
    x = torch.zeros(len(pairs), length, dtype=torch.long)  # (2, T) inputs
    y = torch.full((len(pairs), length), -100)  # (2, T) targets: the reply tokens only
    for row, (prompt, reply) in enumerate(pairs):
        seq = prompt + reply
        x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(reply)
    torch.manual_seed(0)
    model = MiniMindLM(tiny_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and leaves the other core alone
    try:
        for _ in range(400):
            logits = model(x).logits  # (2, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            targets = y != -100
            if loss < 0.05 and bool((logits.argmax(-1)[targets] == y[targets]).all()):
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            raise AssertionError(f"the tiny model did not memorize its replies (loss {loss.item():.3f})")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def untrained(tokenizer, seed: int) -> MiniMindLM:
    torch.manual_seed(seed)
    model = MiniMindLM(tiny_config(tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # varied greedy output instead of one repeated token
    return model.eval()


def greedy_text(model: MiniMindLM, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Independent reference: generate, cut at eos, decode in one go."""
    new = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, temperature=0,
                         eos_token_id=tokenizer.eos_token_id)[0].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=False)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, memorized, tokenizer):
    """out/ with a checkpoint per model mode (rlhf is a different, untrained model) and one LoRA adapter."""
    out = tmp_path_factory.mktemp("out")
    for stage in ("pretrain", "full_sft", "reason"):
        torch.save(memorized.state_dict(), out / f"{stage}_64.pth")
    torch.save(untrained(tokenizer, seed=5).state_dict(), out / "rlhf_64.pth")
    with_lora = MiniMindLM(tiny_config(tokenizer))
    with_lora.load_state_dict(memorized.state_dict())
    apply_lora(with_lora, rank=4, targets=("wq", "wo"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in with_lora.named_parameters():
            if name.endswith("lora.B.weight"):
                p.normal_(std=2.0)
    save_lora(with_lora, str(out / "lora" / "probe_64.pth"))
    return out, with_lora.eval()


class RecordingOutput(io.StringIO):
    """Keeps every write separately, to see that a reply arrives in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def run_eval(out_dir, *flags: str, stdin: str = "") -> RecordingOutput:
    out = RecordingOutput()
    eval_model.main([*TINY_FLAGS, "--out_dir", str(out_dir), "--device", "cpu", "--temperature", "0",
                     "--max_new_tokens", "40", *flags], stdin=io.StringIO(stdin), out=out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# eval_model.py


def test_sft_mode_prints_the_streamed_reply(out_dir):
    out = run_eval(out_dir[0], "--model_mode", "1", "--prompt", QUESTION)
    assert f"🤖: {REPLY}\n" in out.getvalue()
    assert sum(1 for w in out.writes if w and w in REPLY) >= 8  # streamed in many pieces, not printed at the end


def test_reason_mode_shows_think_part_apart(out_dir):
    printed = run_eval(out_dir[0], "--model_mode", "3", "--prompt", QUESTION).getvalue()
    assert f"🤖: [think]\n{THINK}\n[answer]\n{ANSWER}\n" in printed
    assert "<think>" not in printed and "<answer>" not in printed and "\033[" not in printed  # not a terminal


def test_pretrain_mode_continues_raw_text(out_dir):
    printed = run_eval(out_dir[0], "--model_mode", "0", "--prompt", OPENING).getvalue()
    assert f"🤖: {OPENING}{CONTINUATION}\n" in printed


def test_rlhf_mode_reads_its_own_checkpoint(out_dir, tokenizer):
    printed = run_eval(out_dir[0], "--model_mode", "2", "--prompt", QUESTION, "--max_new_tokens", "16").getvalue()
    rlhf = MiniMindLM(tiny_config(tokenizer))
    rlhf.load_state_dict(torch.load(out_dir[0] / "rlhf_64.pth", weights_only=True))
    expected = greedy_text(rlhf.eval(), tokenizer, chat_prompt_ids(tokenizer), max_new_tokens=16)
    assert expected != REPLY[: len(expected)]
    assert f"🤖: {expected}\n" in printed


def test_lora_name_applies_the_adapter(out_dir, tokenizer):
    out, with_lora = out_dir
    printed = run_eval(out, "--model_mode", "1", "--prompt", QUESTION, "--lora_name", "probe").getvalue()
    expected = greedy_text(with_lora, tokenizer, chat_prompt_ids(tokenizer), max_new_tokens=40)
    assert expected != REPLY  # the adapter changes the reply ...
    assert f"🤖: {expected}\n" in printed  # ... and eval_model shows the adapted model's reply


def test_auto_runs_every_builtin_prompt(out_dir):
    printed = run_eval(out_dir[0], "--model_mode", "0", "--auto", "--max_new_tokens", "6").getvalue()
    prompts = eval_model.TEST_PROMPTS["pretrain"]
    assert printed.count("👶: ") == len(prompts)
    assert all(f"👶: {p}\n🤖: {p}" in printed for p in prompts)
    assert f"🤖: {OPENING}{CONTINUATION}\n" in printed  # OPENING is one of them


def test_interactive_free_input_with_clear(out_dir):
    printed = run_eval(out_dir[0], "--model_mode", "3", "--history_cnt", "2",
                       stdin=f"1\n{QUESTION}\n/clear\n\n{QUESTION}\nexit\n").getvalue()
    assert printed.count(f"[answer]\n{ANSWER}\n") == 2
    assert "(history cleared)" in printed


def test_history_keeps_answers_and_is_sent_back(memorized, tokenizer):
    args = eval_model.parse_args(["--model_mode", "3", "--history_cnt", "2", "--temperature", "0", "--max_new_tokens", "40"])
    history: list[dict] = []
    eval_model.answer(memorized, tokenizer, QUESTION, history, args, io.StringIO())
    assert history == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    second = eval_model.answer(memorized, tokenizer, "再说一遍", history, args, io.StringIO())
    expected_prompt = build_prompt(tokenizer, history[:2] + [{"role": "user", "content": "再说一遍"}], 10_000)
    assert second.prompt_tokens == len(expected_prompt)


def test_missing_weights_say_which_stage_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rlhf_64.pth.*train_dpo.py"):
        run_eval(tmp_path, "--model_mode", "2", "--prompt", "hi")


@pytest.mark.slow
def test_load_1_from_exported_folder_as_a_script(memorized, tokenizer, tmp_path):
    save_hf_folder(memorized.state_dict(), memorized.config, str(tmp_path / "hf"), tokenizer)
    result = subprocess.run(
        [sys.executable, "eval_model.py", "--load", "1", "--hf_path", str(tmp_path / "hf"), "--model_mode", "3",
         "--prompt", QUESTION, "--temperature", "0", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert f"[think]\n{THINK}\n[answer]\n{ANSWER}\n" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# model/inference.py: prompts


def render_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


CONVERSATION = [
    {"role": "system", "content": "你是MiniMind。"},
    {"role": "user", "content": "第一个问题：天空为什么是蓝色的？"},
    {"role": "assistant", "content": "因为瑞利散射。"},
    {"role": "user", "content": "second question: what is RoPE?"},
    {"role": "assistant", "content": "rotary position embedding"},
    {"role": "user", "content": "最后一个问题"},
]


def test_build_prompt_is_the_chat_template(tokenizer):
    assert build_prompt(tokenizer, CONVERSATION, 10_000) == render_ids(tokenizer, CONVERSATION)
    no_generation_prompt = build_prompt(tokenizer, CONVERSATION[:3], 10_000, add_generation_prompt=False)
    text = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert no_generation_prompt == tokenizer.encode(text, add_special_tokens=False)


def test_build_prompt_drops_oldest_turns_first(tokenizer):
    without_first_turn = [CONVERSATION[0]] + CONVERSATION[3:]
    limit = len(render_ids(tokenizer, without_first_turn))
    assert len(render_ids(tokenizer, CONVERSATION)) > limit
    assert build_prompt(tokenizer, CONVERSATION, limit) == render_ids(tokenizer, without_first_turn)
    only_last = [CONVERSATION[0], CONVERSATION[-1]]
    assert build_prompt(tokenizer, CONVERSATION, limit - 1) == render_ids(tokenizer, only_last)


def test_build_prompt_cuts_tokens_from_the_left_keeping_system(tokenizer):
    messages = [CONVERSATION[0], {"role": "user", "content": "很长的问题。" * 50}]
    full = render_ids(tokenizer, messages)
    system = tokenizer.encode(tokenizer.apply_chat_template(messages[:1], tokenize=False), add_special_tokens=False)
    ids = build_prompt(tokenizer, messages, 40)
    assert len(ids) == 40
    assert ids[: len(system)] == system and ids[len(system):] == full[-(40 - len(system)):]
    with pytest.raises(ValueError, match="system message alone"):
        build_prompt(tokenizer, messages, len(system))


# ---------------------------------------------------------------------------------------------------------------
# model/inference.py: streaming


def collect(stream):
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as done:
            return deltas, done.value


def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "好的🙂👍 ok 珠穆朗玛峰 ünïcødé"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token really holds part of a character
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stream_chat_known_reply(memorized, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    deltas, result = collect(stream_chat(memorized, tokenizer, messages, temperature=0))
    assert "".join(deltas) == result.text == REPLY
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 8
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == len(chat_prompt_ids(tokenizer))
    assert result.completion_tokens == len(tokenizer.encode(REPLY, add_special_tokens=False)) + 1  # + eos


@pytest.mark.parametrize("stop, expected", [
    (["更大"], f"<think>\n{THINK}\n</think>\n<answer>\n9.9"),
    (["位\n</th", "never"], "<think>\n比较小数"),  # spans several tokens, including a special one
    (["🙂"], f"<think>\n{THINK}\n</think>\n<answer>\n9.9更大"),  # a character split across tokens
])
def test_stream_chat_stop_strings(memorized, tokenizer, stop, expected):
    messages = [{"role": "user", "content": QUESTION}]
    deltas, result = collect(stream_chat(memorized, tokenizer, messages, temperature=0, stop=stop))
    assert result.text == expected and "".join(deltas) == expected  # nothing of the stop string leaked
    assert result.finish_reason == "stop"


def test_stream_chat_length_and_context_limits(memorized, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    _, result = collect(stream_chat(memorized, tokenizer, messages, temperature=0, max_new_tokens=3))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("<think>\n比较", "length", 3)
    prompt_len = len(chat_prompt_ids(tokenizer))
    _, result = collect(stream_chat(memorized, tokenizer, messages, temperature=0, max_new_tokens=5,
                                    max_context=prompt_len + 2))
    assert result.prompt_tokens == prompt_len - 3 and result.completion_tokens == 5  # cut to fit context - 5


def test_stream_chat_continuation_and_seed(memorized, tokenizer):
    opening = [{"role": "user", "content": OPENING}]
    _, result = collect(stream_chat(memorized, tokenizer, opening, temperature=0, continuation=True))
    assert result.text == CONTINUATION and result.prompt_tokens == len(continuation_prompt_ids(tokenizer))
    model = untrained(tokenizer, seed=7)
    runs = [collect(stream_chat(model, tokenizer, opening, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=s))[1].text
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


# ---------------------------------------------------------------------------------------------------------------
# model/inference.py: reasoning replies


@pytest.mark.parametrize("text, expected", [
    (REPLY, (THINK, ANSWER)),
    (f"{THINK}\n</think>\n{ANSWER}", (THINK, ANSWER)),  # <think> was part of the prompt
    (f"<think>\n{THINK}", (THINK, "")),  # cut off while thinking
    ("just an answer", ("", "just an answer")),
    ("<answer>only answer</answer>", ("", "only answer")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("text, reasoning", [
    (f"{REPLY} and <thinking is not a tag", True),
    (f"  {THINK}\n</think>\n<answer>\n{ANSWER}\n</answer>\n", True),  # <think> was in the prompt
    ("plain reply <answer>with tags</answer>  ", False),
    (f"an answer first, then <think> {THINK} </think> more", False),
])
def test_reply_router_pieces_are_the_same_for_any_deltas_and_join_to_split_reasoning(text, reasoning):
    def route(deltas: list[str]) -> list[tuple[str, str]]:
        router = ReplyRouter(reasoning)
        return [piece for delta in deltas for piece in router.feed(delta)] + router.close()

    whole = route([text])
    one_char = route(list(text))  # tags split across deltas are held back until they are complete
    join = lambda pieces, kind: "".join(t for k, t in pieces if k == kind)  # noqa: E731
    for kind in ("think", "answer"):
        assert join(one_char, kind) == join(whole, kind)
    if reasoning:
        assert (join(whole, "think"), join(whole, "answer")) == split_reasoning(text)
    elif "<think>" not in text:  # a reply without a think part passes through untouched, but for the dropped tags
        assert join(whole, "answer") == text.replace("<answer>", "").replace("</answer>", "")
    else:  # text before the think part is answer as it came; trimming starts with the think part
        assert (join(whole, "think"), join(whole, "answer")) == (THINK, "an answer first, then more")
    assert "<thinking is not a tag" in join(whole, "answer") or "<thinking" not in text


# ---------------------------------------------------------------------------------------------------------------
# model/inference.py: loading


def test_load_model_checks_architecture_flags(out_dir):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--dim", "64", "--n_layers", "3", "--n_heads", "4", "--out_dir", str(out_dir[0])])
    with pytest.raises(WeightsMismatchError, match=r"full_sft_64.pth does not fit the model built from the flags \(--dim 64 --n_layers 3.*: 9 missing key\(s\) \(layers\.2\."):
        load_model(args)


def test_model_mode_takes_numbers_and_stage_names(capsys):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for value, mode in [("0", 0), ("pretrain", 0), ("1", 1), ("full_sft", 1), ("2", 2), ("rlhf", 2), ("3", 3),
                        ("reason", 3)]:
        assert parser.parse_args(["--model_mode", value]).model_mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_mode", "sft"])
    assert "unknown model mode 'sft': use 0 or pretrain, 1 or full_sft, 2 or rlhf, 3 or reason" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# eval_model.py --tools


@contextmanager
def scripted_replies(model, tokenizer, replies: list[str]):
    """Generation number i emits replies[i] (then eos), whatever the prompt; the prompts are collected."""
    scripts = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in replies]
    prompts: list[list[int]] = []
    step = 0

    def force(module, args, kwargs, output):
        nonlocal step
        if kwargs.get("past_key_values") is None:
            prompts.append(args[0][0].tolist())
            step = 0
        else:
            step += 1
        script = scripts[min(len(prompts), len(scripts)) - 1]
        forced = torch.full_like(output.logits, -1e4)
        forced[..., script[min(step, len(script) - 1)]] = 1e4
        return dataclasses.replace(output, logits=forced)

    handle = model.register_forward_hook(force, with_kwargs=True)
    try:
        yield prompts
    finally:
        handle.remove()


def test_tools_run_the_calls_and_feed_results_back(memorized, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(memorized.config, "max_seq_len", 2048)  # room for the three tool schemas (~430 tokens)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"Kalo": "a river town"}), encoding="utf-8")
    args = eval_model.parse_args(["--tools", "--tools_file", str(facts), "--temperature", "0", "--max_new_tokens", "60"])
    tools = builtin_tools(facts)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>'
    lookup = '<tool_call>{"name": "lookup", "arguments": {"query": "kalo"}}</tool_call>'
    out, history = io.StringIO(), []
    with scripted_replies(memorized, tokenizer, [f"Let me compute.{call}", lookup, "56088, by a river town."]) as prompts:
        result = eval_model.answer(memorized, tokenizer, "123*456?", history, args, out, tools)
    assert out.getvalue() == ('🤖: Let me compute.\n🔧 calculator({"expression": "123*456"}) → 56088\n'
                              '🤖: \n🔧 lookup({"query": "kalo"}) → {"Kalo": "a river town"}\n'
                              "🤖: 56088, by a river town.\n\n")
    assert result.text == "56088, by a river town."
    schemas = [tool.schema for tool in tools.values()]
    assert [tokenizer.decode(p) for p in prompts] == [tokenizer.apply_chat_template(
        history[:n], tools=schemas, tokenize=False, add_generation_prompt=True) for n in (1, 3, 5)]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert history[2]["content"] == "56088" and "<tool_response>56088</tool_response>" in tokenizer.decode(prompts[1])


def test_tools_flag_errors(out_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_model.parse_args(["--tools", "--model_mode", "0"])
    assert "--tools needs a chat model" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad.json: invalid JSON at line 2"):
        run_eval(out_dir[0], "--tools_file", str(bad), "--prompt", "hi")
