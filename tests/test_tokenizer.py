"""The shipped tokenizer: byte-exact round trips, fixed special ids, ChatML template; and the training script."""
import json
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from conftest import ROOT, TOKENIZER_DIR

sys.path.insert(0, str(ROOT / "scripts"))
import train_tokenizer  # noqa: E402  (scripts/ is not a package)

EXPECTED_IDS = {
    "<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
    "<think>": 3, "</think>": 4, "<answer>": 5, "</answer>": 6,
}


def test_loads_with_expected_roles(tokenizer):
    assert len(tokenizer) == 6400
    roles = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert roles == (1, 2, 0, 0)
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2]
    assert tokenizer.model_max_length == 32768


@pytest.mark.parametrize("text", [
    "今天天气很好，我们去公园散步吧。《论语》：学而时习之，不亦说乎？",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇨🇳 and ZWJ sequences",
    "def f(x):\n\tif x  >  1:   \n\t\treturn x ** 2    \n\n\n    # trailing spaces   \n",
    "  leading spaces, \r\n CRLF, \x00 NUL, \u00a0nbsp, \u3000ideographic space\t\t",
    "混合 mixed 文本 with 数字 12345 and code `print('你好')` 😀\n<think>推理</think><answer>42</answer>",
    "",
])
def test_round_trip_is_byte_exact(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + list(range(0x4E00, 0x4E80)) + [0x1F600, 0x1F680, 9, 10, 0xFEFF]]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_and_tags_are_single_ids(tokenizer):
    for token, expected in EXPECTED_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == expected
        assert tokenizer.encode(token, add_special_tokens=False) == [expected]
        # embedded in text without surrounding spaces, still never split
        ids = tokenizer.encode(f"ab{token}cd", add_special_tokens=False)
        assert expected in ids and tokenizer.decode(ids) == f"ab{token}cd"
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode("hello", add_special_tokens=False)


def test_skip_special_tokens_drops_chatml_but_keeps_tags(tokenizer):
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n<answer>\ny\n</answer><|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    visible = "assistant\n<think>\nx\n</think>\n<answer>\ny\n</answer>\n"
    assert tokenizer.decode(ids, skip_special_tokens=True) == visible


CONVERSATION = [
    {"role": "system", "content": "You are MiniMind."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "Hi!\nHow can I help?"},
]


def test_chat_template_renders_chatml(tokenizer):
    expected = ("<|im_start|>system\nYou are MiniMind.<|im_end|>\n"
                "<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\nHi!\nHow can I help?<|im_end|>\n")
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are MiniMind.<|im_end|>\n"
                      "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    # no system prompt is injected when there is none
    assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "<|im_start|>user\n你好<|im_end|>\n"


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(jinja2.TemplateError, match="unknown role \"function\".*message 1"):
        tokenizer.apply_chat_template([CONVERSATION[1], {"role": "function", "content": "x"}], tokenize=False)


def test_rendered_chat_encodes_markers_as_single_ids(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 3 and ids[0] == 1
    assert tokenizer.decode(ids) == rendered


def _write_corpus(path: Path) -> None:
    rng = random.Random(1)
    words = ["机器", "学习", "模型", "训练", "hello", "world", "token", "数据", "🙂", "def", "return", "\t", "  "]
    with path.open("w", encoding="utf-8") as handle:
        for index in range(400):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
            if index % 2:
                record = {"text": sentence}
            else:
                record = {"conversations": [{"role": "user", "content": sentence},
                                            {"role": "assistant", "content": sentence[::-1]}]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if index % 50 == 0:
                handle.write("\n")  # blank lines are ignored


@pytest.mark.slow
def test_training_script_produces_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    out_dir = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--data_path", str(corpus),
         "--vocab_size", "300", "--out_dir", str(out_dir)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in out_dir.iterdir()}
    trained = AutoTokenizer.from_pretrained(out_dir)
    assert len(trained) == 300
    for token, expected in EXPECTED_IDS.items():
        assert trained.encode(token, add_special_tokens=False) == [expected]
    text = "机器学习 hello 🙂\tworld  未见过的字"
    assert trained.decode(trained.encode(text, add_special_tokens=False)) == text
    # merges were learned from the corpus: a frequent word is one token
    assert len(trained.encode("hello", add_special_tokens=False)) == 1
    assert trained.apply_chat_template(CONVERSATION, tokenize=False) == AutoTokenizer.from_pretrained(
        TOKENIZER_DIR).apply_chat_template(CONVERSATION, tokenize=False)


def test_training_is_deterministic_and_respects_max_chars(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "300", "--out_dir", str(tmp_path / "a")])
    train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "300", "--out_dir", str(tmp_path / "b")])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()

    texts = list(train_tokenizer.iter_texts([corpus], max_chars=100))
    assert sum(map(len, texts)) == 100
    first = json.loads(corpus.read_text(encoding="utf-8").splitlines()[0])
    assert texts[0] == first["conversations"][0]["content"][:100]


def test_training_input_errors_name_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "ok"}\n\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: no 'text' or 'conversations'"):
        list(train_tokenizer.iter_texts([corpus]))
    corpus.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        list(train_tokenizer.iter_texts([corpus]))
    assert list(train_tokenizer.iter_texts([corpus], field="text", max_chars=2)) == ["ok"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(train_tokenizer.iter_texts([tmp_path / "missing.jsonl"]))


def test_isolated_spaces_give_a_word_one_token_wherever_it_stands(tmp_path):
    names = ["Kalomir", "Velora", "Pelmora"]
    lines = [f"{a} lives in {b}. {a} 住在 {b}。{b}是{a}的家。" for a in names for b in names] * 20
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    isolated = train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "2000", "--isolate_spaces", "1",
                                     "--out_dir", str(tmp_path / "isolated")])
    glued = train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "2000", "--out_dir", str(tmp_path / "glued")])
    for name in names:
        [alone] = isolated.encode(name, add_special_tokens=False)
        assert isolated.encode(f" {name}", add_special_tokens=False) == [isolated.convert_tokens_to_ids("Ġ"), alone]
        assert isolated.encode(f"住在 {name}。", add_special_tokens=False)[-2] == alone
        assert glued.encode(f" {name}", add_special_tokens=False) != [glued.convert_tokens_to_ids("Ġ"),
                                                                       *glued.encode(name, add_special_tokens=False)]
    text = "Kalomir  lives\tin 住在 Pelmora 🙂 \n <think>x</think>"
    assert isolated.decode(isolated.encode(text, add_special_tokens=False)) == text
    for token, expected in EXPECTED_IDS.items():
        assert isolated.encode(token, add_special_tokens=False) == [expected]


def test_split_digits_gives_every_digit_a_token_of_its_own(tmp_path):
    lines = [f"{a} + {b} = {a + b}. Room 4821, year 2024, 4821 again." for a in range(40, 90) for b in range(10, 30)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    split = train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "600", "--isolate_spaces", "1",
                                  "--split_digits", "1", "--out_dir", str(tmp_path / "split")])
    merged = train_tokenizer.main(["--data_path", str(corpus), "--vocab_size", "600", "--isolate_spaces", "1",
                                   "--out_dir", str(tmp_path / "merged")])
    for number in ("4821", "2024", "63", "107"):
        assert split.convert_ids_to_tokens(split.encode(number, add_special_tokens=False)) == list(number)
    assert len(merged.encode("4821", add_special_tokens=False)) < 4  # without the flag BPE merges frequent digits
    text = "63 + 43 = 106 <tool_call>{\"expression\": \"12 * 34\"}</tool_call>"
    ids = split.encode(text, add_special_tokens=False)
    assert split.decode(ids) == text and split.convert_tokens_to_ids("<tool_call>") in ids
