"""Hugging Face export/import against transformers itself.

Dense exports are loaded by transformers' own LlamaForCausalLM (no remote code) and must give our logits and our
greedy generation; MoE exports are loaded with trust_remote_code; both round-trip to the exact original tensors.
"""
import argparse
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen3ForCausalLM

from conftest import TINY, TOKENIZER_DIR
from model import LMConfig, MiniMindLM, preset
from model.hf_minimind import save_hf_folder
from model.releases import halves_to_interleaved, interleaved_to_halves
from model.inference import build_prompt
from model.loading import add_model_args, load_checkpoint, load_model
from scripts import convert_model



def tiny_model(tokenizer, seed: int = 0, **overrides) -> MiniMindLM:
    """A tiny model with weights large enough that greedy decoding does not repeat one token forever."""
    torch.manual_seed(seed)
    model = MiniMindLM(LMConfig(**{**TINY, "max_seq_len": 256, "vocab_size": len(tokenizer), **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def sample_ids(tokenizer, batch: int = 2) -> torch.Tensor:
    text = ["人类大脑的主要功能是处理信息，控制身体的各种活动，并且储存记忆。", "The largest animal on Earth is the blue whale."]
    ids = [tokenizer.encode(t, add_special_tokens=False)[:12] for t in text[:batch]]
    return torch.tensor(ids)  # (B, 12)


def assert_loads_plainly_with_our_logits(model: MiniMindLM, hf_path: str, tokenizer, architecture: type) -> None:
    """transformers loads the folder as `architecture` without remote code, with our parameter count and logits."""
    hf = AutoModelForCausalLM.from_pretrained(hf_path).eval()  # no trust_remote_code
    assert type(hf) is architecture
    assert sum(p.numel() for p in hf.parameters()) == model.num_parameters()
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 1.0  # logits are not trivially small
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def load_hf_folder(path) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    loaded = load_checkpoint(path)
    return loaded.config, loaded.state


def save_pth(model: MiniMindLM, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# The rotary permutation


def test_rotary_permutation_by_hand():
    """head_dim 4: rows (0, 1, 2, 3) of a head become (0, 2, 1, 3): pair (0,1) -> halves (0,2), pair (2,3) -> (1,3)."""
    w = torch.arange(16.0).view(8, 2)  # 2 heads x head_dim 4, row i holds (2i, 2i+1)
    halves = interleaved_to_halves(w, n_heads=2)
    assert halves[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    assert torch.equal(halves_to_interleaved(halves, n_heads=2), w)


# ---------------------------------------------------------------------------------------------------------------
# Dense: a plain LlamaForCausalLM


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("dense")
    model = tiny_model(tokenizer)
    weight = save_pth(model, tmp / "full_sft_64.pth")
    hf_path = str(tmp / "hf")
    convert_model.main(["torch2hf", "--weight", weight, "--hf_path", hf_path, "--dim", "64", "--n_layers", "2",
                        "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "256", "--tokenizer_path", str(TOKENIZER_DIR)])
    return model, weight, hf_path


def test_dense_export_is_plain_llama_with_same_logits(dense_export, tokenizer):
    model, _, hf_path = dense_export
    assert_loads_plainly_with_our_logits(model, hf_path, tokenizer, LlamaForCausalLM)


def test_dense_export_same_greedy_generation(dense_export, tokenizer):
    model, _, hf_path = dense_export
    hf = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    ids = sample_ids(tokenizer, batch=1)
    ours = model.generate(ids, max_new_tokens=24, temperature=0)
    theirs = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    assert len(set(ours[0].tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(theirs, ours)


def test_dense_export_folder_contents(dense_export, tokenizer):
    _, _, hf_path = dense_export
    config = json.load(open(os.path.join(hf_path, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]) == (64, 192, 2)
    assert config["max_position_embeddings"] == 256 and config["rope_parameters"]["rope_theta"] == 1e6
    assert config["dtype"] == "float32"
    generation = json.load(open(os.path.join(hf_path, "generation_config.json")))
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    exported_tokenizer = AutoTokenizer.from_pretrained(hf_path)
    chat = [{"role": "user", "content": "你好"}]
    assert exported_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert exported_tokenizer.encode("你好 world") == tokenizer.encode("你好 world")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_round_trip_is_exact(tmp_path, tokenizer, dtype):
    model = tiny_model(tokenizer, seed=1).to(getattr(torch, dtype))
    weight = save_pth(model, tmp_path / "in.pth")
    convert_model.main(["torch2hf", "--weight", weight, "--hf_path", str(tmp_path / "hf"), "--dim", "64",
                        "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--tokenizer_path", str(TOKENIZER_DIR)])
    convert_model.main(["hf2torch", "--hf_path", str(tmp_path / "hf"), "--weight", str(tmp_path / "out.pth")])
    original = torch.load(weight, weights_only=True)
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.0},
    {"type": "ntk", "factor": 4.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_maps_to_hf(tmp_path, tokenizer, scaling):
    model = tiny_model(tokenizer, seed=2, inference_rope_scaling=scaling)
    save_hf_folder(model.state_dict(), model.config, str(tmp_path), tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(0))  # past 64 positions
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    config, _ = load_hf_folder(str(tmp_path))
    if scaling["type"] != "ntk":  # ntk is exported as a plain RoPE with a larger theta, which is equivalent
        assert config.inference_rope_scaling["type"] == scaling["type"]


# ---------------------------------------------------------------------------------------------------------------
# MoE: MiniMind code shipped in the folder


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("moe")
    model = tiny_model(tokenizer, seed=3, use_moe=True)
    weight = save_pth(model, tmp / "full_sft_64_moe.pth")
    hf_path = str(tmp / "hf")
    convert_model.main(["torch2hf", "--weight", weight, "--hf_path", hf_path, "--dim", "64", "--n_layers", "2",
                        "--n_heads", "4", "--n_kv_heads", "2", "--use_moe", "1", "--tokenizer_path", str(TOKENIZER_DIR)])
    return model, weight, hf_path


def test_moe_export_loads_with_remote_code(moe_export, tokenizer):
    model, _, hf_path = moe_export
    assert {"hf_minimind.py", "model.py", "LMConfig.py", "model.safetensors"} <= set(os.listdir(hf_path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(hf_path, trust_remote_code=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_path, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MiniMindForCausalLM"
    assert hf.config.num_hidden_layers == 2 and hf.config.use_moe
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
        loss = hf(ids, labels=ids).loss  # HF convention: labels are the inputs, shifted inside the model
        reference = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, reference)
    one = ids[:1]
    ours = model.generate(one, max_new_tokens=16, temperature=0)
    theirs = hf.generate(one, max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, one.shape[1]:]
    assert torch.equal(theirs, ours)


def test_moe_round_trip_is_exact(moe_export, tmp_path):
    _, weight, hf_path = moe_export
    convert_model.main(["hf2torch", "--hf_path", hf_path, "--weight", str(tmp_path / "back.pth")])
    original = torch.load(weight, weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


# ---------------------------------------------------------------------------------------------------------------
# load_model(--load 1) reuses the import


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_load_model_from_hf_folder(which, dense_export, moe_export, tokenizer):
    model, _, hf_path = dense_export if which == "dense" else moe_export
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    loaded, loaded_tokenizer = load_model(parser.parse_args(["--load", "1", "--hf_path", hf_path, "--device", "cpu"]))
    assert loaded.config.use_moe == (which == "moe") and not loaded.training
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# Errors name the file and the problem


def test_export_with_wrong_architecture_flags_names_the_shape(dense_export, tmp_path):
    _, weight, _ = dense_export
    with pytest.raises(ValueError, match=r"full_sft_64.pth does not fit the model built from the flags \(--dim 128 .*"
                                         r"tok_embeddings.weight is \(6400, 64\) in the file but \(6400, 128\)"):
        convert_model.torch_to_hf(weight, str(tmp_path / "hf"), dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                  tokenizer_path=str(TOKENIZER_DIR))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        convert_model.torch_to_hf(weight, str(tmp_path / "hf"), dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                                  tokenizer_path=str(TOKENIZER_DIR))


def test_import_errors(tmp_path, dense_export):
    with pytest.raises(FileNotFoundError, match="config.json not found.*torch2hf"):
        load_hf_folder(str(tmp_path))
    _, _, hf_path = dense_export
    config = json.load(open(os.path.join(hf_path, "config.json")))
    broken = tmp_path / "broken"
    broken.mkdir()
    os.link(os.path.join(hf_path, "model.safetensors"), broken / "model.safetensors")
    json.dump({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}},
              open(broken / "config.json", "w"))
    with pytest.raises(ValueError, match="config.json: rope type 'llama3' is not supported"):
        load_hf_folder(str(broken))
    json.dump({**config, "hidden_act": "gelu"}, open(broken / "config.json", "w"))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        load_hf_folder(str(broken))


def test_export_dtype_flag(dense_export, tmp_path):
    _, weight, _ = dense_export
    convert_model.main(["torch2hf", "--weight", weight, "--hf_path", str(tmp_path), "--dim", "64", "--n_layers", "2",
                        "--n_heads", "4", "--n_kv_heads", "2", "--dtype", "bfloat16", "--tokenizer_path", str(TOKENIZER_DIR)])
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    _, state = load_hf_folder(str(tmp_path))
    original = torch.load(weight, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert torch.equal(state["layers.1.attention.wk.weight"], original["layers.1.attention.wk.weight"].bfloat16())


# ---------------------------------------------------------------------------------------------------------------
# Per-head q/k norms (the minimind-3 layout): a plain Qwen3ForCausalLM


def test_minimind3_preset_has_the_release_parameter_count():
    """The count the minimind-3 release's own code gives at its defaults (tied embedding counted once)."""
    with torch.device("meta"):
        model = MiniMindLM(preset("minimind-3"))
    assert model.num_parameters() == 63_912_192
    assert model.layers[0].attention.q_norm.weight.shape == (96,)


@pytest.fixture(scope="module")
def qk_norm_export(tmp_path_factory, tokenizer):
    model = tiny_model(tokenizer, seed=2, qk_norm=True)
    with torch.no_grad():  # norm weights that differ per position, so a wrong reordering would show
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand_like(p) + 0.5)
    hf_path = str(tmp_path_factory.mktemp("qk_norm") / "hf")
    save_hf_folder(model.state_dict(), model.config, hf_path, tokenizer)
    return model, hf_path


def test_qk_norm_export_is_plain_qwen3_with_same_logits_and_generation(qk_norm_export, tokenizer):
    model, hf_path = qk_norm_export
    assert_loads_plainly_with_our_logits(model, hf_path, tokenizer, Qwen3ForCausalLM)
    hf = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    prompt = sample_ids(tokenizer, batch=1)
    greedy = model.generate(prompt, max_new_tokens=24, temperature=0)
    assert len(set(greedy[0].tolist())) > 3
    assert torch.equal(hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[:, prompt.shape[1]:],
                       greedy)


def test_qk_norm_round_trip_is_exact(qk_norm_export):
    model, hf_path = qk_norm_export
    config, state = load_hf_folder(hf_path)
    assert config.qk_norm and (config.n_heads, config.n_kv_heads) == (4, 2)
    original = model.state_dict()
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key


def test_a_release_tokenizer_folder_is_used_with_its_own_chat_template(dense_export, tmp_path, tokenizer):
    """--tokenizer_path to another release's tokenizer folder: its chat template renders the prompts as it is (here
    one that writes roles in brackets), for a native .pth and for a model folder alike."""
    _, weight, hf_path = dense_export
    release_tokenizer = tmp_path / "release_tokenizer"
    shutil.copytree(TOKENIZER_DIR, release_tokenizer)
    (release_tokenizer / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for source in (["--weight", weight, "--n_heads", "4"], ["--load", "1", "--hf_path", hf_path]):
        _, loaded_tokenizer = load_model(parser.parse_args([*source, "--device", "cpu", "--tokenizer_path",
                                                            str(release_tokenizer)]))
        prompt = build_prompt(loaded_tokenizer, [{"role": "user", "content": "你好"}], max_prompt_tokens=64)
        assert loaded_tokenizer.decode(prompt) == "[user] 你好\n[assistant] "


@pytest.mark.parametrize("options, architecture", [
    (dict(rope_layout="half"), LlamaForCausalLM),  # already in Llama's rotary order: exported as it is
    (dict(tie_word_embeddings=False), LlamaForCausalLM),  # an output head of its own: lm_head.weight
    (dict(qk_norm=True, head_dim=24), Qwen3ForCausalLM),  # head size other than dim / n_heads
])
def test_release_options_export_plainly_and_import_exactly(options, architecture, tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=3, **options)
    save_hf_folder(model.state_dict(), model.config, str(tmp_path), tokenizer)
    assert_loads_plainly_with_our_logits(model, str(tmp_path), tokenizer, architecture)
    config, state = load_hf_folder(str(tmp_path))
    imported = MiniMindLM(config).eval()
    imported.load_state_dict(state, strict=True)
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
