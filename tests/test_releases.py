"""Acceptance test: every published MiniMind release loads.

For each release layout (MiniMind2 of Feb 2025, the MiniMind2 re-release with Hugging Face names, minimind-3), dense
and mixture-of-experts, a seeded tiny model is written in that release's own layout, as a `.pth` state dict and as a
Hugging Face-style folder, and loaded through `model.loading`. Its eval-mode logits must equal those of the release's
own forward pass within 1e-4.

The reference forward passes live in this file and share no code with model/: transformers' LlamaForCausalLM (the
re-release's dense network) and Qwen3ForCausalLM (minimind-3's dense network), and a plain-torch forward written
from the releases' definitions (interleaved or rotate-half RoPE, optional per-head q/k norm, routed experts with
optional shared experts). The hand forward is itself checked against transformers on the same weights, so a wrong
reference cannot make the loader look right.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BATCH, SEQ = 2, 12


# ----------------------------------------------------------------------------------------------------------------
# The releases' tiny architectures


@dataclass(frozen=True)
class Release:
    """A tiny model of one release's layout. head_dim None: hidden // n_heads."""

    layout: str
    moe: bool
    hidden: int = 64
    n_layers: int = 3
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = None
    ffn: int = 192
    vocab: int = 300
    n_experts: int = 4
    top_k: int = 2
    n_shared: int = 1
    eps: float = 1e-5
    theta: float = 1e6
    aux_coef: float = 5e-4  # minimind-3's router_aux_loss_coef
    tied: bool = True
    pth_overrides: dict = field(default_factory=dict, hash=False, compare=False)  # what a .pth cannot tell

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    @property
    def qk_norm(self) -> bool:
        return self.layout == "minimind-3"

    @property
    def interleaved_rope(self) -> bool:
        return self.layout == "minimind2"

    @property
    def renormalise_single(self) -> bool:
        """minimind-3 divides the top-k weights by their sum even for k = 1 (the weight becomes exactly 1)."""
        return self.layout == "minimind-3"

    @property
    def case_id(self) -> str:
        return f"{self.layout}-{'moe' if self.moe else 'dense'}"


def minimind2_ffn(dim: int) -> int:
    return 64 * math.ceil(int(8 * dim / 3) / 64)


CASES = [
    # Feb 2025: 8 heads (the .pth default), GQA 8/2, the default FFN (the folder's config leaves hidden_dim null)
    Release("minimind2", moe=False, ffn=minimind2_ffn(64)),
    Release("minimind2", moe=True, ffn=minimind2_ffn(64), n_kv_heads=4),
    # re-release: 4 heads, which a .pth cannot tell (passed as an override); MoE with a list of 2 shared experts
    Release("minimind2-hf", moe=False, n_heads=4, n_kv_heads=2, ffn=160, pth_overrides={"n_heads": 4}),
    Release("minimind2-hf", moe=True, n_heads=8, n_kv_heads=4, ffn=128, n_shared=2),
    # minimind-3: head_dim 16 != 64 / 8 (a .pth tells it by the q_norm size), eps 1e-6; MoE top-1, no shared expert
    Release("minimind-3", moe=False, n_heads=8, n_kv_heads=4, head_dim=16, ffn=256, eps=1e-6),
    Release("minimind-3", moe=True, n_heads=8, n_kv_heads=4, ffn=128, top_k=1, n_shared=0, eps=1e-6),
]
CASE_BY_ID = {case.case_id: case for case in CASES}
assert {case.layout for case in CASES} == {"minimind2", "minimind2-hf", "minimind-3"} and len(CASE_BY_ID) == 6
UNTIED = replace(CASE_BY_ID["minimind-3-dense"], tied=False)


# ----------------------------------------------------------------------------------------------------------------
# Each release's weight names


@dataclass(frozen=True)
class Names:
    embed: str
    head: str
    final_norm: str
    layer: str  # format string with {i}
    q: str
    k: str
    v: str
    o: str
    attn_norm: str
    mlp_norm: str
    q_norm: str | None
    k_norm: str | None
    mlp: str  # the dense MLP / the MoE block, inside a layer
    gate: str
    up: str
    down: str
    router: str  # inside the MoE block
    expert: str  # inside the MoE block, with {e}
    shared: str  # inside the MoE block, with {s} (a single shared expert: no {s})


MINIMIND2_NAMES = Names(
    embed="tok_embeddings.weight", head="output.weight", final_norm="norm.weight", layer="layers.{i}.",
    q="attention.wq.weight", k="attention.wk.weight", v="attention.wv.weight", o="attention.wo.weight",
    attn_norm="attention_norm.weight", mlp_norm="ffn_norm.weight", q_norm=None, k_norm=None,
    mlp="feed_forward.", gate="w1.weight", up="w3.weight", down="w2.weight",
    router="gate.weight", expert="experts.{e}.", shared="shared_experts.",
)
HF_NAMES = Names(
    embed="model.embed_tokens.weight", head="lm_head.weight", final_norm="model.norm.weight", layer="model.layers.{i}.",
    q="self_attn.q_proj.weight", k="self_attn.k_proj.weight", v="self_attn.v_proj.weight", o="self_attn.o_proj.weight",
    attn_norm="input_layernorm.weight", mlp_norm="post_attention_layernorm.weight", q_norm=None, k_norm=None,
    mlp="mlp.", gate="gate_proj.weight", up="up_proj.weight", down="down_proj.weight",
    router="gate.weight", expert="experts.{e}.", shared="shared_experts.{s}.",
)
MINIMIND3_NAMES = replace(HF_NAMES, q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
NAMES = {"minimind2": MINIMIND2_NAMES, "minimind2-hf": HF_NAMES, "minimind-3": MINIMIND3_NAMES}


def shared_prefixes(release: Release) -> list[str]:
    names = NAMES[release.layout]
    if release.n_shared == 0:
        return []
    if "{s}" not in names.shared:
        assert release.n_shared == 1, "MiniMind2 (Feb 2025) has one shared expert"
        return [names.shared]
    return [names.shared.format(s=s) for s in range(release.n_shared)]


# ----------------------------------------------------------------------------------------------------------------
# Seeded weights in the release's layout


def release_state_dict(release: Release, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's names: matrices large enough that attention and routing are far from
    uniform and logits far from 0, norm weights 1 +- 0.2 so a lost norm shows. A tied head is the same tensor as
    the embedding (as torch.save of the release's model writes it)."""
    g = torch.Generator().manual_seed(seed)
    n = NAMES[release.layout]
    D, hd, H, KV = release.hidden, release.hd, release.n_heads, release.n_kv_heads

    def matrix(rows: int, cols: int, std: float | None = None) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * (std if std is not None else 2.0 / math.sqrt(cols))

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(size, generator=g)

    def ffn(prefix: str, state: dict) -> None:
        state[prefix + n.gate] = matrix(release.ffn, D)
        state[prefix + n.up] = matrix(release.ffn, D)
        state[prefix + n.down] = matrix(D, release.ffn)

    state = {n.embed: matrix(release.vocab, D, std=0.3)}
    for i in range(release.n_layers):
        p = n.layer.format(i=i)
        state[p + n.attn_norm] = norm(D)
        state[p + n.q] = matrix(H * hd, D, std=0.2)  # attention scores of std ~2.5: far from uniform, and float32
        state[p + n.k] = matrix(KV * hd, D, std=0.2)  # noise stays ~1e-5 (with 0.3 it reaches ~7e-5 of the 1e-4)
        state[p + n.v] = matrix(KV * hd, D)
        state[p + n.o] = matrix(D, H * hd)
        if release.qk_norm:
            state[p + n.q_norm] = norm(hd)
            state[p + n.k_norm] = norm(hd)
        state[p + n.mlp_norm] = norm(D)
        if release.moe:
            state[p + n.mlp + n.router] = matrix(release.n_experts, D, std=0.3)
            for e in range(release.n_experts):
                ffn(p + n.mlp + n.expert.format(e=e), state)
            for s in shared_prefixes(release):
                ffn(p + n.mlp + s, state)
        else:
            ffn(p + n.mlp, state)
    state[n.final_norm] = norm(D)
    state[n.head] = state[n.embed] if release.tied else matrix(release.vocab, D, std=0.3)
    return state


def release_config_json(release: Release, **extra) -> dict:
    """The config.json the release's own export writes for this architecture."""
    if release.layout == "minimind2":
        config = dict(
            model_type="minimind", dim=release.hidden, n_layers=release.n_layers, n_heads=release.n_heads,
            n_kv_heads=release.n_kv_heads, vocab_size=release.vocab,
            hidden_dim=None if release.ffn == minimind2_ffn(release.hidden) else release.ffn,  # null: the default
            multiple_of=64, norm_eps=release.eps, rope_theta=release.theta, max_seq_len=8192, dropout=0.0,
            flash_attn=True, use_moe=release.moe, num_experts_per_tok=release.top_k,
            n_routed_experts=release.n_experts, n_shared_experts=release.n_shared, scoring_func="softmax",
            aux_loss_alpha=0.1, seq_aux=True, norm_topk_prob=True,
        )
    elif release.layout == "minimind2-hf":
        config = dict(
            model_type="minimind", architectures=["MiniMindForCausalLM"], hidden_size=release.hidden,
            num_hidden_layers=release.n_layers, num_attention_heads=release.n_heads,
            num_key_value_heads=release.n_kv_heads, intermediate_size=release.ffn, vocab_size=release.vocab,
            rms_norm_eps=release.eps, rope_theta=release.theta, max_position_embeddings=32768, hidden_act="silu",
            use_moe=release.moe, num_experts_per_tok=release.top_k, n_routed_experts=release.n_experts,
            n_shared_experts=release.n_shared, scoring_func="softmax", aux_loss_alpha=0.01, seq_aux=True,
            norm_topk_prob=True, flash_attn=True, dropout=0.0, inference_rope_scaling=False,
            bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        )
    else:
        config = dict(
            model_type="minimind", architectures=["MiniMindForCausalLM"], hidden_size=release.hidden,
            num_hidden_layers=release.n_layers, num_attention_heads=release.n_heads,
            num_key_value_heads=release.n_kv_heads, head_dim=release.hd, intermediate_size=release.ffn,
            vocab_size=release.vocab, rms_norm_eps=release.eps, rope_theta=release.theta,
            max_position_embeddings=32768, hidden_act="silu", tie_word_embeddings=release.tied,
            use_moe=release.moe, num_experts=release.n_experts, num_experts_per_tok=release.top_k,
            moe_intermediate_size=release.ffn, norm_topk_prob=True, router_aux_loss_coef=release.aux_coef,
            inference_rope_scaling=False, dropout=0.0, flash_attn=True, bos_token_id=1, eos_token_id=2,
            dtype="float32",
        )
    config.update(extra)
    return config


def write_pth(release: Release, state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def write_folder(release: Release, state: dict[str, torch.Tensor], folder: Path, **config_extra) -> Path:
    """config.json + model.safetensors as the release exports them; a tied head is not written twice."""
    folder.mkdir(parents=True, exist_ok=True)
    head = NAMES[release.layout].head
    weights = {k: v.clone().contiguous() for k, v in state.items() if not (release.tied and k == head)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(release_config_json(release, **config_extra), indent=2))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The hand reference forward pass, written from the releases' definitions (float64)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalised x, normalised in float32 as the releases (and transformers) do, even for float64 x."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_angles(release: Release, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hd/2) of angle pos * theta^(-2i/hd), computed in float32 as every release (and transformers)
    computes them: with sharp attention, float64 angles alone would move the logits by ~1e-5."""
    hd = release.hd
    inv_freq = 1.0 / release.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, T, heads, hd). Pair i is (2i, 2i+1) when interleaved, else (i, i + hd/2); each pair (a, b) becomes
    (a cos - b sin, a sin + b cos)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def swiglu(x: torch.Tensor, W, prefix: str, names: Names) -> torch.Tensor:
    gate, up, down = W(prefix + names.gate), W(prefix + names.up), W(prefix + names.down)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_forward(release: Release, state: dict[str, torch.Tensor], ids: torch.Tensor,
                      dtype: torch.dtype = torch.float64, *, interleaved: bool | None = None,
                      renormalise_single: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, vocab), aux loss summed over layers) of the release's network, eval mode, in `dtype` (norms
    and RoPE angles in float32, as the releases compute them).
    The aux loss is minimind-3's: coef * E * sum_e(load_e * mean_prob_e), load_e = share of tokens routed to e.
    interleaved / renormalise_single override the release's RoPE pairing and top-1 renormalisation (for the
    checks that these choices matter)."""
    n = NAMES[release.layout]
    interleaved = release.interleaved_rope if interleaved is None else interleaved
    renormalise_single = release.renormalise_single if renormalise_single is None else renormalise_single

    def W(key: str) -> torch.Tensor:
        return state[key].to(dtype)

    B, T = ids.shape
    H, KV, hd = release.n_heads, release.n_kv_heads, release.hd
    cos, sin = rope_angles(release, T, dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W(n.embed)[ids]
    aux_total = torch.zeros((), dtype=dtype)
    for i in range(release.n_layers):
        p = n.layer.format(i=i)
        h = rms_norm(x, W(p + n.attn_norm), release.eps)
        q = (h @ W(p + n.q).T).view(B, T, H, hd)
        k = (h @ W(p + n.k).T).view(B, T, KV, hd)
        v = (h @ W(p + n.v).T).view(B, T, KV, hd)
        if release.qk_norm:
            q = rms_norm(q, W(p + n.q_norm), release.eps)
            k = rms_norm(k, W(p + n.k_norm), release.eps)
        q = rotate(q, cos, sin, interleaved)
        k = rotate(k, cos, sin, interleaved)
        heads = []
        for head in range(H):
            kv = head // (H // KV)  # consecutive query heads share a KV head
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            heads.append(probs @ v[:, :, kv])  # (B, T, hd)
        x = x + torch.cat(heads, dim=-1) @ W(p + n.o).T
        h = rms_norm(x, W(p + n.mlp_norm), release.eps)
        if release.moe:
            y, aux = reference_moe(release, h.reshape(B * T, -1), W, p + n.mlp, n, renormalise_single)
            x = x + y.view(B, T, -1)
            aux_total = aux_total + aux
        else:
            x = x + swiglu(h, W, p + n.mlp, n)
    x = rms_norm(x, W(n.final_norm), release.eps)
    return x @ W(n.head).T, aux_total


def reference_moe(release: Release, tokens: torch.Tensor, W, prefix: str, n: Names,
                  renormalise_single: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts, token by token: softmax router, the k most probable experts, their probabilities as weights
    (divided by their sum when k > 1, or always for minimind-3), plus every shared expert with weight 1."""
    E, k = release.n_experts, release.top_k
    probs = (tokens @ W(prefix + n.router).T).softmax(dim=-1)  # (N, E)
    expert_out = torch.stack([swiglu(tokens, W, prefix + n.expert.format(e=e), n) for e in range(E)])  # (E, N, D)
    out = torch.zeros_like(tokens)
    routed = torch.zeros(E, dtype=tokens.dtype)
    for t in range(tokens.shape[0]):
        chosen = sorted(range(E), key=lambda e: -float(probs[t, e]))[:k]
        weights = probs[t, chosen]
        if k > 1 or renormalise_single:
            weights = weights / (weights.sum() + 1e-20)
        for e, w in zip(chosen, weights):
            out[t] += w * expert_out[e, t]
            routed[e] += 1
    for s in shared_prefixes(release):
        out = out + swiglu(tokens, W, prefix + s, n)
    load = routed / tokens.shape[0]
    aux = release.aux_coef * E * (load * probs.mean(dim=0)).sum()
    return out, aux


# ----------------------------------------------------------------------------------------------------------------
# transformers' models as the references of the dense Hugging Face-named releases


def transformers_model(release: Release, state: dict[str, torch.Tensor]):
    """LlamaForCausalLM (MiniMind2 re-release) or Qwen3ForCausalLM (minimind-3) holding `state` (strict), float64."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    assert not release.moe and release.layout in ("minimind2-hf", "minimind-3")
    common = dict(
        vocab_size=release.vocab, hidden_size=release.hidden, intermediate_size=release.ffn,
        num_hidden_layers=release.n_layers, num_attention_heads=release.n_heads,
        num_key_value_heads=release.n_kv_heads, head_dim=release.hd, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=release.eps,
        rope_parameters={"rope_type": "default", "rope_theta": release.theta},
        tie_word_embeddings=release.tied, attention_bias=False,
    )
    if release.layout == "minimind2-hf":
        model = LlamaForCausalLM(LlamaConfig(mlp_bias=False, **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(use_sliding_window=False, **common))
    model.config._attn_implementation = "eager"
    model.load_state_dict(state, strict=True)
    return model.double().eval()


def transformers_logits(release: Release, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformers_model(release, state)(input_ids=ids).logits


def halves_layout(release: Release, state: dict[str, torch.Tensor]) -> tuple[Release, dict[str, torch.Tensor]]:
    """A dense MiniMind2 (Feb 2025) model as the same network in the re-release's names and rotate-half RoPE:
    per head, q/k rows (2i, 2i+1) become rows (i, i + hd/2). Written here independently of model/."""
    src, dst = MINIMIND2_NAMES, HF_NAMES
    hd = release.hd
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])

    def per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
        return weight.view(heads, hd, -1)[:, order].reshape(heads * hd, -1)

    out = {dst.embed: state[src.embed], dst.final_norm: state[src.final_norm], dst.head: state[src.head]}
    for i in range(release.n_layers):
        ps, pd = src.layer.format(i=i), dst.layer.format(i=i)
        out[pd + dst.q] = per_head(state[ps + src.q], release.n_heads)
        out[pd + dst.k] = per_head(state[ps + src.k], release.n_kv_heads)
        for a, b in ((src.v, dst.v), (src.o, dst.o), (src.attn_norm, dst.attn_norm), (src.mlp_norm, dst.mlp_norm)):
            out[pd + b] = state[ps + a]
        for a, b in ((src.gate, dst.gate), (src.up, dst.up), (src.down, dst.down)):
            out[pd + dst.mlp + b] = state[ps + src.mlp + a]
    return replace(release, layout="minimind2-hf"), out


def dense_equivalent(release: Release, state: dict[str, torch.Tensor]) -> tuple[Release, dict, dict]:
    """A MoE model whose routed experts are all one SwiGLU and whose shared experts output 0, and the dense model
    with that SwiGLU: the same function exactly when the routing weights of a token sum to 1."""
    n = NAMES[release.layout]
    dense = replace(release, moe=False)
    moe_state, dense_state = dict(state), {}
    for key, value in state.items():
        if ".experts." not in key and ".shared_experts" not in key and not key.endswith(n.mlp + n.router):
            dense_state[key] = value
    for i in range(release.n_layers):
        block = n.layer.format(i=i) + n.mlp
        for part in (n.gate, n.up, n.down):
            first = state[block + n.expert.format(e=0) + part]
            dense_state[block + part] = first
            for e in range(release.n_experts):
                moe_state[block + n.expert.format(e=e) + part] = first
        for s in shared_prefixes(release):
            moe_state[block + s + n.down] = torch.zeros_like(state[block + s + n.down])
    return dense, dense_state, moe_state


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


def token_batch(release: Release, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, release.vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """case id -> (state, {"pth": path, "folder": path}), written once per module."""
    written: dict[str, tuple[dict, dict]] = {}

    def files(release: Release) -> tuple[dict, dict]:
        key = release.case_id + ("" if release.tied else "-untied")
        if key not in written:
            state = release_state_dict(release, seed=CASES.index(CASE_BY_ID[release.case_id]))
            root = tmp_path_factory.mktemp(key)
            written[key] = state, {"pth": write_pth(release, state, root / f"{key}.pth"),
                                   "folder": write_folder(release, state, root / key)}
        return written[key]

    return files


def load(release: Release, source: str, path: Path, **extra):
    """Our loader: (LoadedWeights, model) for the file, with the overrides a .pth of this release needs."""
    from model.loading import load_checkpoint, load_pretrained

    overrides = {**(release.pth_overrides if source == "pth" else {}), **extra}
    return load_checkpoint(path, **overrides), load_pretrained(path, **overrides)


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


# ----------------------------------------------------------------------------------------------------------------
# The references themselves


@pytest.mark.parametrize("case_id", ["minimind2-hf-dense", "minimind-3-dense"])
def test_hand_reference_equals_transformers(case_id):
    release = CASE_BY_ID[case_id]
    state, ids = release_state_dict(release, seed=7), token_batch(release)
    ours, _ = reference_forward(release, state, ids)
    theirs = transformers_logits(release, state, ids)
    assert ours.abs().max() > 1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hand_reference_untied_head_equals_transformers():
    state, ids = release_state_dict(UNTIED, seed=8), token_batch(UNTIED)
    torch.testing.assert_close(reference_forward(UNTIED, state, ids)[0], transformers_logits(UNTIED, state, ids),
                               atol=1e-5, rtol=0)


def test_hand_reference_interleaved_rope_equals_llama_on_reordered_rows():
    """MiniMind2 (Feb 2025) rotates interleaved pairs: the same network as a Llama whose q/k rows are reordered."""
    release = CASE_BY_ID["minimind2-dense"]
    state, ids = release_state_dict(release, seed=9), token_batch(release)
    llama_release, llama_state = halves_layout(release, state)
    ours, _ = reference_forward(release, state, ids)
    torch.testing.assert_close(ours, transformers_logits(llama_release, llama_state, ids), atol=1e-5, rtol=0)
    # and the pairing matters: the same weights rotated as halves give other logits
    halves, _ = reference_forward(release, state, ids, interleaved=False)
    assert (halves - ours).abs().max() > 1e-2


@pytest.mark.parametrize("case_id", ["minimind2-moe", "minimind2-hf-moe", "minimind-3-moe"])
def test_hand_moe_reference_with_identical_experts_is_the_dense_network(case_id):
    """With every routed expert the same SwiGLU and silent shared experts, routing weights that sum to 1 (top-2
    renormalised; minimind-3's top-1 renormalised to exactly 1) make the MoE block that SwiGLU: the dense reference,
    itself checked against transformers for the HF-named layouts."""
    release = CASE_BY_ID[case_id]
    state, ids = release_state_dict(release, seed=10), token_batch(release)
    dense, dense_state, moe_state = dense_equivalent(release, state)
    moe_logits, _ = reference_forward(release, moe_state, ids)
    dense_logits, _ = reference_forward(dense, dense_state, ids)
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-9, rtol=0)
    if dense.layout != "minimind2":
        torch.testing.assert_close(dense_logits, transformers_logits(dense, dense_state, ids), atol=1e-5, rtol=0)
    if release.top_k == 1:  # without minimind-3's renormalisation the weight is the router probability, < 1
        plain, _ = reference_forward(release, moe_state, ids, renormalise_single=False)
        assert (plain - moe_logits).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Our loader against the releases


@pytest.mark.parametrize("source", ["pth", "folder"])
@pytest.mark.parametrize("case_id", list(CASE_BY_ID))
def test_release_loads_with_its_own_logits(case_id, source, release_files):
    release = CASE_BY_ID[case_id]
    state, paths = release_files(release)
    ids = token_batch(release)
    loaded, model = load(release, source, paths[source])
    assert loaded.layout == release.layout
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    if release.layout in ("minimind2-hf", "minimind-3") and not release.moe:
        reference = transformers_logits(release, state, ids)
    else:
        reference, _ = reference_forward(release, state, ids)
    ours = our_logits(model, ids)
    assert ours.shape == (BATCH, SEQ, release.vocab)
    assert reference.abs().max() > 1
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["pth", "folder"])
def test_untied_head_loads_untied(source, release_files):
    """A minimind-3 model whose lm_head differs from its embedding keeps both: the logits use lm_head."""
    state, paths = release_files(UNTIED)
    ids = token_batch(UNTIED)
    loaded, model = load(UNTIED, source, paths[source])
    assert loaded.layout == "minimind-3"
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(loaded.state["output.weight"], state["lm_head.weight"], atol=0, rtol=0)
    torch.testing.assert_close(loaded.state["tok_embeddings.weight"], state["model.embed_tokens.weight"], atol=0, rtol=0)
    ours = our_logits(model, ids)
    torch.testing.assert_close(ours, transformers_logits(UNTIED, state, ids), atol=1e-4, rtol=0)
    tied_reading, _ = reference_forward(UNTIED, {**state, "lm_head.weight": state["model.embed_tokens.weight"]}, ids)
    assert (ours - tied_reading).abs().max() > 1  # the head really is lm_head, not the embedding


@pytest.mark.parametrize("source", ["pth", "folder"])
def test_minimind3_moe_aux_loss_in_training(source, release_files, tmp_path):
    """In train mode the balancing loss is minimind-3's: coef * E * sum_e(load_e * mean_prob_e) over the batch's
    tokens, summed over layers (coef 5e-4 by default for a .pth; a folder's router_aux_loss_coef otherwise)."""
    release = CASE_BY_ID["minimind-3-moe"]
    state, paths = release_files(release)
    path = paths["pth"]
    if source == "folder":
        release = replace(release, aux_coef=0.02)
        path = write_folder(release, state, tmp_path / "coef", router_aux_loss_coef=release.aux_coef)
    ids = token_batch(release, seed=3)
    _, model = load(release, source, path)
    logits_eval = our_logits(model, ids)
    model.train()
    out = model(ids)
    reference_logits, reference_aux = reference_forward(release, state, ids)
    torch.testing.assert_close(out.logits.detach().double(), reference_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_eval, reference_logits, atol=1e-4, rtol=0)
    assert reference_aux > 0
    torch.testing.assert_close(out.aux_loss.detach().double(), reference_aux, atol=0, rtol=1e-5)


@pytest.mark.parametrize("layout", ["minimind2", "minimind2-hf"])
def test_minimind2_top1_routing_keeps_the_router_probability(layout, tmp_path):
    """MiniMind2 (both layouts) renormalises the routing weights only when k > 1: a folder whose config routes each
    token to one expert weights it by its router probability (unlike minimind-3, where it becomes 1)."""
    release = replace(CASE_BY_ID[f"{layout}-moe"], top_k=1)
    state, ids = release_state_dict(release, seed=11), token_batch(release)
    folder = write_folder(release, state, tmp_path / layout)
    _, model = load(release, "folder", folder)
    reference, _ = reference_forward(release, state, ids)
    renormalised, _ = reference_forward(release, state, ids, renormalise_single=True)
    assert (reference - renormalised).abs().max() > 1e-2
    torch.testing.assert_close(our_logits(model, ids), reference, atol=1e-4, rtol=0)


def test_layout_override_matches_detection(release_files):
    release = CASE_BY_ID["minimind-3-moe"]
    _, paths = release_files(release)
    from model.loading import load_checkpoint

    detected = load_checkpoint(paths["pth"])
    forced = load_checkpoint(paths["pth"], layout="minimind-3")
    assert detected.layout == forced.layout == "minimind-3"
    assert detected.state.keys() == forced.state.keys()
    assert all(torch.equal(detected.state[k], forced.state[k]) for k in detected.state)


def test_unknown_layout_names_expected_and_found_keys(tmp_path):
    from model.common import WeightsMismatchError
    from model.loading import load_checkpoint, load_pretrained

    g = torch.Generator().manual_seed(0)
    gpt2 = {"transformer.wte.weight": torch.randn(300, 64, generator=g),
            "transformer.h.0.attn.c_attn.weight": torch.randn(64, 192, generator=g),
            "transformer.h.0.mlp.c_fc.weight": torch.randn(64, 256, generator=g),
            "transformer.ln_f.weight": torch.ones(64)}
    path = tmp_path / "gpt2.pth"
    torch.save(gpt2, path)
    for load_fn in (load_checkpoint, load_pretrained):
        with pytest.raises(WeightsMismatchError) as error:
            load_fn(path)
        message = str(error.value)
        assert isinstance(error.value, ValueError)
        assert "transformer.h.0" in message  # what was found
        assert "model.layers.0.self_attn.q_proj" in message or "layers.0.attention.wq" in message  # what was expected


@pytest.mark.parametrize("case_id", ["minimind2-hf-moe", "minimind-3-dense"])
def test_from_weight_loads_a_release_into_a_model_built_from_flags(case_id, release_files):
    """A training stage's --from_weight (and a distillation teacher) reads any release into the model the flags
    built: the same weights as the loader builds by itself; a model of another shape is refused, naming the flags."""
    from model.LMConfig import LMConfig
    from model.loading import load_into_model
    from model.model import MiniMindLM

    release = CASE_BY_ID[case_id]
    _, paths = release_files(release)
    loaded, reference = load(release, "pth", paths["pth"])
    model = MiniMindLM(LMConfig(**loaded.config.to_dict()))
    load_into_model(model, paths["pth"], "pass an existing --from_weight file")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    deeper = MiniMindLM(LMConfig(**{**loaded.config.to_dict(), "n_layers": loaded.config.n_layers + 1}))
    with pytest.raises(ValueError, match=r"does not fit the model built from the flags \(--dim .* missing key"):
        load_into_model(deeper, paths["pth"], "pass an existing --from_weight file")
