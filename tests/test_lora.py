"""LoRA: a fresh adapter is a no-op, merging is exact, only adapter parameters train, files round-trip."""
import pytest
import torch
import torch.nn.functional as F

from model import LMConfig, MiniMindLM
from model.model_lora import (
    apply_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    parse_targets,
    rank_and_targets,
    read_lora_file,
    save_lora,
    unmerge_lora,
)

CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)


def base_model(seed=0) -> MiniMindLM:
    torch.manual_seed(seed)
    return MiniMindLM(LMConfig(**CFG)).eval()


def ids(seed=1):
    return torch.randint(0, CFG["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora.B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fresh_adapter_is_an_exact_no_op():
    model = base_model()
    before = model(ids()).logits
    apply_lora(model, rank=8)
    assert torch.equal(model(ids()).logits, before)


@pytest.mark.parametrize("targets", [("wq", "wo"), "all"])
def test_only_adapter_parameters_train(targets):
    model = base_model()
    adapted = apply_lora(model, rank=4, alpha=8, targets=targets)
    expected = 2 * 2 if targets != "all" else 2 * 7
    assert len(adapted) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert len(trainable) == 2 * expected  # A and B per adapted linear
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = ids()
    for _ in range(3):
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # base bit-identical
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if ".lora.B" in k)


def test_merge_equals_adapter_and_unmerge_restores():
    model = base_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=8, alpha=16, targets="all")
    randomize_adapters(model)
    with_adapter = model(ids()).logits
    merge_lora(model)
    torch.testing.assert_close(model(ids()).logits, with_adapter, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids()).logits, with_adapter, atol=1e-5, rtol=0)
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    # a standalone merged weights file loads strictly into a plain model and gives the same logits
    plain = MiniMindLM(LMConfig(**CFG)).eval()
    plain.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(plain(ids()).logits, with_adapter, atol=1e-5, rtol=0)


def test_adapter_file_round_trip(tmp_path):
    model = base_model()
    apply_lora(model, rank=4, targets=("wq", "wk"))
    randomize_adapters(model)
    expected = model(ids()).logits
    path = tmp_path / "lora" / "identity_64.pth"
    save_lora(model, str(path))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(lora_state_dict(model))
    assert all(".lora." in k for k in saved)
    assert rank_and_targets(read_lora_file(str(path))) == (4, ("wk", "wq"))

    fresh = base_model()
    apply_lora(fresh, rank=4, targets=("wq", "wk"))
    load_lora(fresh, str(path))
    assert torch.equal(fresh(ids()).logits, expected)

    mismatched = base_model()
    apply_lora(mismatched, rank=4, targets=("wq", "wo"))
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(mismatched, str(path))
    with pytest.raises(FileNotFoundError, match="train_lora.py"):
        load_lora(fresh, str(tmp_path / "missing.pth"))


def test_scale_is_alpha_over_rank():
    model = base_model()
    apply_lora(model, rank=4, alpha=2, targets=("wq",))
    randomize_adapters(model)
    wq = model.layers[0].attention.wq
    x = torch.randn(3, CFG["dim"])
    manual = x @ wq.weight.T + 0.5 * (x @ wq.lora.A.weight.T @ wq.lora.B.weight.T)
    torch.testing.assert_close(wq(x), manual, atol=1e-6, rtol=0)


def test_parse_targets_and_errors():
    assert parse_targets("wq, wo") == ("wq", "wo")
    assert parse_targets("all") == "all"
    with pytest.raises(ValueError, match="matches"):
        apply_lora(base_model(), targets=("nope",))
    model = base_model()
    apply_lora(model, targets=("wq",))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, targets=("wq",))


def test_adapter_file_holds_the_scale(tmp_path):
    """Files store scale-1 adapters (alpha/rank folded into B): attaching one needs no alpha, any alpha works."""
    from model.model_lora import attach_lora_file

    model = base_model()
    apply_lora(model, rank=4, alpha=12, targets="all")
    randomize_adapters(model)
    expected = model(ids()).logits
    path = str(tmp_path / "scaled.pth")
    save_lora(model, path)
    saved = torch.load(path, weights_only=True)
    wq = model.layers[0].attention.wq.lora
    assert torch.equal(saved["layers.0.attention.wq.lora.B.weight"], wq.B.weight * 3.0)
    fresh = base_model()
    attach_lora_file(fresh, path)
    torch.testing.assert_close(fresh(ids()).logits, expected, atol=1e-6, rtol=0)
    other_alpha = base_model()
    apply_lora(other_alpha, rank=4, alpha=1, targets="all")
    load_lora(other_alpha, path)
    torch.testing.assert_close(other_alpha(ids()).logits, expected, atol=1e-6, rtol=0)
