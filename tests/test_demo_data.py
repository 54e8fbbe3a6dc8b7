"""The bundled demo's generated data: valid MiniMind jsonl that the datasets read, deterministic, and correct."""
import json
import re

from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR
from model.dataset import PretrainDataset, SFTDataset
from scripts import make_demo_data


def test_demo_data_is_valid_deterministic_and_right(tmp_path):
    make_demo_data.main(["--out_dir", str(tmp_path / "a"), "--n_pretrain", "300", "--n_sft", "200"])
    make_demo_data.main(["--out_dir", str(tmp_path / "b"), "--n_pretrain", "300", "--n_sft", "200"])
    for name in ("demo_pretrain.jsonl", "demo_sft.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    pretrain = PretrainDataset(tmp_path / "a" / "demo_pretrain.jsonl", tokenizer, max_length=96)
    sft = SFTDataset(tmp_path / "a" / "demo_sft.jsonl", tokenizer, max_length=96)
    assert (len(pretrain), len(sft)) == (300, 200)
    assert all(sft[i][2].sum() > 0 for i in range(len(sft)))  # every conversation has reply tokens in the window

    # every arithmetic answer in the SFT data is correct
    checked = 0
    for line in (tmp_path / "a" / "demo_sft.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
        for message in json.loads(line)["conversations"]:
            match = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\.", message["content"])
            if match:
                a, op, b, result = match.groups()
                assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
                checked += 1
    assert checked > 20


def test_zh_numbers():
    assert [make_demo_data.zh_number(n) for n in (0, 7, 10, 12, 20, 35, 98)] == ["零", "七", "十", "十二", "二十", "三十五", "九十八"]
