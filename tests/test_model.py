"""The decoder against an independent reference written here in the plainest possible way.

The reference takes a state dict with the published MiniMind2 key names and computes logits with complex-number
interleaved RoPE, explicit per-head softmax attention and an explicit per-token loop over experts. Our model must
load that state dict with strict=True and agree with it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import conftest

from model import LMConfig, MiniMindLM, preset
from model.model import rope_frequencies, sample_next_token

TINY = {**conftest.TINY, "vocab_size": 97, "max_seq_len": 64}  # a vocabulary of odd size


# ---------------------------------------------------------------------------------------------------------------
# The reference


def random_state_dict(cfg: LMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights under the published key names."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    head_dim = cfg.dim // cfg.n_heads
    kv = cfg.n_kv_heads * head_dim
    sd = {"tok_embeddings.weight": rand(cfg.vocab_size, cfg.dim, scale=0.25)}
    sd["output.weight"] = sd["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(cfg.dim, cfg.dim)
        sd[p + "attention.wk.weight"] = rand(kv, cfg.dim)
        sd[p + "attention.wv.weight"] = rand(kv, cfg.dim)
        sd[p + "attention.wo.weight"] = rand(cfg.dim, cfg.dim)
        sd[p + "attention_norm.weight"] = 1 + rand(cfg.dim)
        sd[p + "ffn_norm.weight"] = 1 + rand(cfg.dim)
        ffns = [(p + "feed_forward.", cfg.hidden_dim)]
        if cfg.use_moe:
            ffns = [(p + f"feed_forward.experts.{j}.", cfg.hidden_dim) for j in range(cfg.n_routed_experts)]
            if cfg.n_shared_experts:  # n shared experts are stored as one n-times-wider SwiGLU
                ffns.append((p + "feed_forward.shared_experts.", cfg.hidden_dim * cfg.n_shared_experts))
            sd[p + "feed_forward.gate.weight"] = rand(cfg.n_routed_experts, cfg.dim, scale=1.0)
        for f, hidden in ffns:
            sd[f + "w1.weight"] = rand(hidden, cfg.dim)
            sd[f + "w2.weight"] = rand(cfg.dim, hidden)
            sd[f + "w3.weight"] = rand(hidden, cfg.dim)
    sd["norm.weight"] = 1 + rand(cfg.dim)
    return sd


def ref_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x, theta):
    """x (T, H, hd): rotate pairs (2i, 2i+1) as complex numbers by position * theta^(-2i/hd)."""
    T, H, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2)
    xc = torch.view_as_complex(x.double().reshape(T, H, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * rot[:, None, :]).reshape(T, H, hd).float()


def ref_swiglu(x, sd, p):
    return F.silu(x @ sd[p + "w1.weight"].T) * (x @ sd[p + "w3.weight"].T) @ sd[p + "w2.weight"].T


def ref_attention(cfg: LMConfig, sd, p: str, h: torch.Tensor) -> torch.Tensor:
    """One sequence h (T, D): causal attention, one head at a time; query head i reads KV head i // group."""
    T = h.shape[0]
    hd = cfg.dim // cfg.n_heads
    group = cfg.n_heads // cfg.n_kv_heads
    q = ref_rope((h @ sd[p + "attention.wq.weight"].T).view(T, cfg.n_heads, hd), cfg.rope_theta)
    k = ref_rope((h @ sd[p + "attention.wk.weight"].T).view(T, cfg.n_kv_heads, hd), cfg.rope_theta)
    v = (h @ sd[p + "attention.wv.weight"].T).view(T, cfg.n_kv_heads, hd)
    heads = []
    for head in range(cfg.n_heads):
        scores = q[:, head] @ k[:, head // group].T / math.sqrt(hd)  # (T, T)
        scores = scores + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, head // group])
    return torch.cat(heads, dim=-1) @ sd[p + "attention.wo.weight"].T


def ref_route(cfg, gate_w, h):
    probs = torch.softmax(h @ gate_w.T, dim=-1)  # (T, E)
    top_w, top_i = probs.topk(cfg.num_experts_per_tok, dim=-1)
    if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return probs, top_w, top_i


def ref_moe(cfg, sd, p, h):
    """One sequence: explicit loop over tokens and their chosen experts, plus the shared expert."""
    _, top_w, top_i = ref_route(cfg, sd[p + "feed_forward.gate.weight"], h)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for w, e in zip(top_w[t], top_i[t]):
            out[t] += w * ref_swiglu(h[t], sd, p + f"feed_forward.experts.{int(e)}.")
    if cfg.n_shared_experts:
        out = out + ref_swiglu(h, sd, p + "feed_forward.shared_experts.")
    return out


def ref_aux_loss(cfg, gate_w, hs: list[torch.Tensor]) -> torch.Tensor:
    """alpha * sum_e f_e P_e with f_e = (times e was chosen) / (uniform share): per sequence then averaged
    (seq_aux), or over all tokens of the batch at once."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    groups = hs if cfg.seq_aux else [torch.cat(hs)]
    losses = []
    for h in groups:
        probs, _, top_i = ref_route(cfg, gate_w, h)
        f = torch.tensor([float((top_i == e).sum()) for e in range(E)]) / (h.shape[0] * k / E)
        losses.append(cfg.aux_loss_alpha * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def ref_forward(cfg: LMConfig, sd, ids: torch.Tensor):
    """Logits (B, T, V) and the summed aux loss of training mode, layer by layer, one sequence at a time."""
    xs = [sd["tok_embeddings.weight"][row] for row in ids]  # B x (T, D)
    aux = torch.tensor(0.0)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        xs = [x + ref_attention(cfg, sd, p, ref_rmsnorm(x, sd[p + "attention_norm.weight"], cfg.norm_eps)) for x in xs]
        hs = [ref_rmsnorm(x, sd[p + "ffn_norm.weight"], cfg.norm_eps) for x in xs]
        if cfg.use_moe:
            aux = aux + ref_aux_loss(cfg, sd[p + "feed_forward.gate.weight"], hs)
            xs = [x + ref_moe(cfg, sd, p, h) for x, h in zip(xs, hs)]
        else:
            xs = [x + ref_swiglu(h, sd, p + "feed_forward.") for x, h in zip(xs, hs)]
    logits = [ref_rmsnorm(x, sd["norm.weight"], cfg.norm_eps) @ sd["output.weight"].T for x in xs]
    return torch.stack(logits), aux


def tiny_model(seed=0, **overrides) -> tuple[MiniMindLM, LMConfig, dict]:
    cfg = LMConfig(**{**TINY, **overrides})
    sd = random_state_dict(cfg, seed)
    model = MiniMindLM(cfg)
    model.load_state_dict(sd, strict=True)
    return model, cfg, sd


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    "name,count", [("MiniMind2-Small", 25_829_888), ("MiniMind2", 104_030_976), ("MiniMind2-MoE", 145_029_760),
                   ("minimind-3", 63_912_192), ("minimind-3-moe", 198_416_640)]  # the releases' own code's counts
)
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = MiniMindLM(preset(name))
    assert model.num_parameters() == count
    assert model.tok_embeddings.weight is model.output.weight


def test_hidden_dim_rule():
    assert LMConfig(dim=512).hidden_dim == 1408
    assert LMConfig(dim=768).hidden_dim == 2048
    assert LMConfig(dim=640).hidden_dim == 1728
    assert LMConfig(dim=512, hidden_dim=1000).hidden_dim == 1000


@pytest.mark.parametrize("use_moe,seq_aux", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("train", [False, True])
def test_matches_reference(use_moe, seq_aux, train):
    model, cfg, sd = tiny_model(seed=1, use_moe=use_moe, seq_aux=seq_aux, n_routed_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model.train(train)
    out = model(ids)
    ref_logits, ref_aux = ref_forward(cfg, sd, ids)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    if use_moe and train:
        torch.testing.assert_close(out.aux_loss, ref_aux, atol=1e-5, rtol=1e-5)
        assert out.aux_loss.requires_grad
    else:
        assert out.aux_loss.item() == 0.0


def test_strict_loading_rejects_wrong_keys():
    model, cfg, sd = tiny_model()
    bad = dict(sd)
    bad["layers.0.attention.q_proj.weight"] = bad.pop("layers.0.attention.wq.weight")
    with pytest.raises(RuntimeError, match="q_proj"):
        MiniMindLM(cfg).load_state_dict(bad, strict=True)


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_decode_equals_full_forward(use_moe):
    model, cfg, _ = tiny_model(seed=3, use_moe=use_moe)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)  # a prompt block, then 3 tokens at once, then one by one
    pieces, past = [out.logits], out.past_key_values
    out = model(ids[:, 5:8], past_key_values=past, use_cache=True)
    pieces.append(out.logits)
    past = out.past_key_values
    for t in range(8, 12):
        out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_moe", [False, True])
def test_sdpa_equals_explicit_attention(use_moe):
    flash, cfg, sd = tiny_model(seed=5, use_moe=use_moe)
    explicit = MiniMindLM(LMConfig(**{**cfg.to_dict(), "flash_attn": False}))
    explicit.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    mask[2, :1] = 0
    for m in (flash, explicit):
        m.eval()
    torch.testing.assert_close(flash(ids).logits, explicit(ids).logits, atol=1e-5, rtol=0)
    a, b = flash(ids, attention_mask=mask).logits, explicit(ids, attention_mask=mask).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_padding_does_not_change_real_tokens():
    model, cfg, _ = tiny_model(seed=7)
    model.eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_moe", [False, True])
def test_batched_left_padded_generation_equals_one_by_one(use_moe):
    model, cfg, _ = tiny_model(seed=9, use_moe=use_moe)
    model.eval()
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=10, temperature=0)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=10, temperature=0)
        assert torch.equal(batched[i], single[0]), f"row {i}"


def test_generate_counts_new_tokens_and_stops_per_row_at_eos():
    model, cfg, _ = tiny_model(seed=11)
    model.eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(12))
    free = model.generate(ids, max_new_tokens=6, temperature=0)
    assert free.shape == (2, 6)
    eos = int(free[0, 2])  # row 0 stops at the first occurrence of this token; row 1 wherever it meets it
    stopped = model.generate(ids, max_new_tokens=6, temperature=0, eos_token_id=eos, pad_token_id=-1)
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 6
        assert stopped[row, :end].tolist() == free[row, :end].tolist()
        assert set(stopped[row, end:].tolist()) <= {-1}
    assert stopped.shape[1] == 6 or bool((stopped[:, -1] == eos).any())


def test_seeded_sampling_is_reproducible():
    model, cfg, _ = tiny_model(seed=13)
    model.eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(14))
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50)
    a, b = model.generate(ids, seed=123, **kw), model.generate(ids, seed=123, **kw)
    c = model.generate(ids, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stream_generate_yields_the_same_tokens_as_generate():
    model, cfg, _ = tiny_model(seed=15)
    model.eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(16))
    steps = list(model.stream_generate(ids, max_new_tokens=7, temperature=0))
    assert len(steps) == 7 and all(s.shape == (1,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(ids, max_new_tokens=7, temperature=0))


def test_repetition_penalty_is_sign_aware():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    # greedy after penalty 4: token0 2/4=0.5, token1 -2*4=-8, token2 1.0 untouched -> token 2 wins
    assert sample_next_token(logits, seen, 0, 1.0, 0, 4.0).item() == 2
    assert sample_next_token(logits, seen, 0, 1.0, 0, 1.0).item() == 0
    # a seen negative logit must become *less* likely, never more
    neg = torch.tensor([[-1.0, -1.5]])
    assert sample_next_token(neg, torch.tensor([[True, False]]), 0, 1.0, 0, 2.0).item() == 1


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    never_seen = torch.zeros(1, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, never_seen, 1.0, 1.0, 2, 1.0, g).item() for _ in range(300)}
    assert draws == {0, 1}  # top-k 2
    draws = {sample_next_token(logits, never_seen, 1.0, 0.7, 0, 1.0, g).item() for _ in range(300)}
    assert draws == {0, 1}  # nucleus 0.7: 0.5 then 0.3 reaches it
    draws = {sample_next_token(logits, never_seen, 1.0, 0.85, 0, 1.0, g).item() for _ in range(300)}
    assert draws == {0, 1, 2}


def test_memory_does_not_depend_on_max_seq_len():
    small = MiniMindLM(LMConfig(**{**TINY, "max_seq_len": 128}))
    huge = MiniMindLM(LMConfig(**{**TINY, "max_seq_len": 10_000_000}))
    size = lambda m: sum(t.numel() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert size(small) == size(huge)
    assert list(huge.buffers()) == []


def test_moe_training_gives_every_expert_a_gradient():
    """DDP needs a gradient for every parameter: an expert that got no token still runs (on nothing) in training."""
    model, cfg, _ = tiny_model(seed=17, use_moe=True)
    moe = model.layers[0].feed_forward
    tokens = torch.randn(6, cfg.dim, requires_grad=True)
    expert_ids = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0]])  # expert 3 never chosen
    weights = torch.full((6, 2), 0.5)
    moe.train()
    moe.route(tokens, weights, expert_ids).pow(2).sum().backward()
    for j, expert in enumerate(moe.experts):
        for name, p in expert.named_parameters():
            assert p.grad is not None, f"expert {j} {name}"
            assert (p.grad.abs().sum() == 0) == (j == 3), f"expert {j} {name}"
    moe.eval()  # inference skips the empty expert: same output
    with torch.no_grad():
        torch.testing.assert_close(moe.route(tokens, weights, expert_ids), moe.train().route(tokens, weights, expert_ids))


def test_moe_train_and_inference_routing_agree():
    model, cfg, _ = tiny_model(seed=19, use_moe=True, num_experts_per_tok=1, n_shared_experts=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model.train()
    train_logits = model(ids).logits
    model.eval()
    torch.testing.assert_close(model(ids).logits, train_logits, atol=1e-6, rtol=0)


def test_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hd, theta = 64, 1e6
    for kind, extra in [("linear", {}), ("yarn", {"original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0})]:
        params = {"rope_type": kind, "factor": 4.0, "rope_theta": theta, **extra}
        hf_cfg = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, max_position_embeddings=8192, rope_parameters=params)
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
        ours, factor = rope_frequencies(hd, theta, {"type": kind, "factor": 4.0, **extra})
        torch.testing.assert_close(ours, hf_inv.float(), atol=1e-7, rtol=1e-5)
        assert factor == pytest.approx(hf_factor)
    base, _ = rope_frequencies(hd, theta)
    ntk, _ = rope_frequencies(hd, theta, {"type": "ntk", "factor": 4.0})
    new_theta = theta * 4.0 ** (hd / (hd - 2))
    torch.testing.assert_close(ntk, 1.0 / new_theta ** (torch.arange(0, hd, 2).double() / hd).float())
    assert ntk[0] == base[0] and ntk[-1] < base[-1]  # highest frequency kept, lowest stretched


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="inference_rope_scaling"):
        LMConfig(inference_rope_scaling={"type": "magic", "factor": 2})
    cfg = LMConfig(dim=96, n_layers=3, use_moe=True, inference_rope_scaling={"type": "yarn", "factor": 2.0})
    again = LMConfig.from_dict(cfg.to_dict())
    assert (again.dim, again.n_layers, again.use_moe, again.inference_rope_scaling) == (96, 3, True, cfg.inference_rope_scaling)


# ---------------------------------------------------------------------------------------------------------------
# Decoding internals: the growing KV cache, fused projections, packed rows


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_growing_in_small_chunks_decodes_like_the_full_forward(use_moe):
    from model.model import KVCache
    model, cfg, _ = tiny_model(seed=17, use_moe=use_moe)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(18))
    cache = KVCache(cfg.n_layers, chunk=4)  # grows 4 -> 8 -> 16 -> 32 while the tokens come
    pieces = [model(ids[:, :3], past_key_values=cache).logits]
    capacities = set()
    for t in range(3, 23):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
        capacities.add(cache.keys[0].shape[2])
    assert cache.length == 23 and capacities == {4, 8, 16, 32}
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids).logits, atol=1e-5, rtol=0)


def test_cache_memory_follows_the_tokens_not_max_seq_len():
    short, cfg, sd = tiny_model(seed=19)
    long = MiniMindLM(LMConfig(**{**cfg.to_dict(), "max_seq_len": 32768}))
    long.load_state_dict(sd)
    ids = torch.randint(3, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(20))
    for model in (short.eval(), long.eval()):
        out = model(ids, use_cache=True)
        for _ in range(40):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
        cache = out.past_key_values
        assert cache.length == 50 and cache.keys[0].shape[2] == 256  # one chunk, whatever max_seq_len says


@pytest.mark.parametrize("use_moe", [False, True])
def test_fused_projections_compute_the_same_logits(use_moe):
    model, cfg, _ = tiny_model(seed=21, use_moe=use_moe)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(22))
    before = model(ids).logits
    generation_before = model.generate(ids, max_new_tokens=8, temperature=0)
    model.fuse_for_inference()
    assert "layers.0.attention.wqkv.weight" in model.state_dict()
    assert not any(name.endswith(("wq.weight", "w1.weight")) for name in model.state_dict())
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0), generation_before)


def test_positions_restart_in_every_document():
    from model.model import document_causal_mask, positions_in_documents
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 7, 7, 7, 7, 7, 9, 9]])
    assert positions_in_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 1]]
    mask = document_causal_mask(docs)[1, 0]
    for q in range(9):  # a query sees exactly the keys of its document at or before it
        assert [k for k in range(9) if mask[q, k]] == [k for k in range(q + 1) if docs[1, k] == docs[1, q]]


@pytest.mark.parametrize("use_moe", [False, True])
def test_a_packed_row_gives_each_document_its_own_logits(use_moe):
    model, cfg, _ = tiny_model(seed=23, use_moe=use_moe)
    model.eval()
    g = torch.Generator().manual_seed(24)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 9, 1, 6)]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = model(row, document_ids=doc_ids).logits[0]
    start = 0
    for doc in docs:
        alone = model(doc[None]).logits[0]
        torch.testing.assert_close(packed[start : start + len(doc)], alone, atol=1e-5, rtol=0)
        start += len(doc)


def test_half_rotary_layout_is_the_interleaved_model_with_reordered_rows():
    """rope_layout="half" rotates (i, i + hd/2) instead of (2i, 2i+1): the same network once each head's q/k rows
    (and q/k norm weights) are reordered even-first; without the reordering it is another network."""
    from model.releases import reorder_rotary

    torch.manual_seed(23)
    cfg = LMConfig(**TINY, qk_norm=True)
    interleaved = MiniMindLM(cfg).eval()
    with torch.no_grad():
        for name, p in interleaved.named_parameters():
            p.mul_(4.0) if p.ndim == 2 else p.copy_(torch.rand_like(p) + 0.5)  # norms that differ per position
    half = MiniMindLM(LMConfig(**{**cfg.to_dict(), "rope_layout": "half"})).eval()
    state = interleaved.state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    half.load_state_dict(state)
    with torch.no_grad():
        assert (half(ids).logits - interleaved(ids).logits).abs().max() > 1e-3
        half.load_state_dict(reorder_rotary(state, cfg, "interleaved", "half"))
        torch.testing.assert_close(half(ids).logits, interleaved(ids).logits, atol=1e-5, rtol=0)
