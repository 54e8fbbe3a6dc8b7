"""The published MiniMind weight layouts, and how each maps onto this project's MiniMindLM.

| layout         | what is stored this way                                   | key names                               | RoPE pairs        |
|----------------|-----------------------------------------------------------|-----------------------------------------|-------------------|
| "minimind2"    | MiniMind2 (Feb 2025) .pth and folders; this project's .pth | `layers.N.attention.wq`, `feed_forward.w1` | interleaved (2i, 2i+1) |
| "minimind2-hf" | MiniMind2 re-release (Apr 2025 on); our Llama exports      | `model.layers.N.self_attn.q_proj`, `mlp.gate_proj` | halves (i, i+hd/2) |
| "minimind-3"   | minimind-3 (2026); our Qwen3 exports                       | as minimind2-hf plus `self_attn.q_norm/k_norm` | halves |

Converting between them is renaming, plus (rotary) reordering the rows of each head of the q/k projections and
the q/k norm weights: rotating the interleaved pairs of a vector is rotating the halves of the same vector with its
entries reordered (even entries first, then odd ones), and q.k is unchanged when q and k are reordered alike.
So a model of any release runs on the one MiniMindLM, at no cost per token.

MoE names: the HF-named releases keep the router in `mlp.gate.weight`, experts in `mlp.experts.E.gate_proj/
up_proj/down_proj`, and MiniMind2's shared experts as a list `mlp.shared_experts.S.*`; ours are
`feed_forward.gate.weight`, `feed_forward.experts.E.w1/w3/w2`, and the shared experts as one SwiGLU S times as wide
(`feed_forward.shared_experts.w1/w3/w2`, the same function as the sum of the S experts).

What the weights cannot tell differs per release, so each layout has its defaults (`RELEASE_DEFAULTS`): MiniMind2
routes each token to 2 of its experts and balances them per sequence; minimind-3 routes to 1 (with weight 1) and
balances over the batch with coefficient 5e-4; the norm epsilon is 1e-5 and 1e-6.

This module only transforms dicts (no files): model/loading.py reads files with it, model/hf_minimind.py writes
Hugging Face folders with it.
"""
from __future__ import annotations

import re

import torch

from .common import ConfigError, WeightsMismatchError
from .LMConfig import PRESETS, LMConfig, architecture_fields

NATIVE, MINIMIND2_HF, MINIMIND3 = "minimind2", "minimind2-hf", "minimind-3"
LAYOUTS = (NATIVE, MINIMIND2_HF, MINIMIND3)

RELEASE_DEFAULTS: dict[str, dict] = {
    NATIVE: dict(n_heads=8, norm_eps=1e-5, num_experts_per_tok=2, seq_aux=True, aux_loss_alpha=0.1),
    MINIMIND2_HF: dict(n_heads=8, norm_eps=1e-5, num_experts_per_tok=2, seq_aux=True, aux_loss_alpha=0.1),
    MINIMIND3: dict(qk_norm=True, norm_eps=1e-6, num_experts_per_tok=1, norm_top1=True, seq_aux=False, aux_loss_alpha=5e-4),
}

# How a layout is recognised: the embedding's name (one of these is in every checkpoint of that layout).
EMBEDDING_NAMES = {NATIVE: ("tok_embeddings.weight", "model.tok_embeddings.weight"), MINIMIND2_HF: ("model.embed_tokens.weight",)}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, on checkpoints saved from a wrapped model

# ----------------------------------------------------------------------------------------------------------------
# Names: ours <-> the Hugging Face-style names of the later releases

GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {  # ours (after layers.{i}.) -> theirs (after model.layers.{i}.)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.gate.weight": "mlp.gate.weight",
}
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
THEIR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
THEIR_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
THEIR_SHARED = re.compile(r"mlp\.shared_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names without the prefixes DDP ("module.") and torch.compile ("_orig_mod.") add to a wrapped model's keys."""
    def bare(name: str) -> str:
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        return name
    return {bare(name): tensor for name, tensor in state.items()}


def detect_layout(state: dict[str, torch.Tensor], source: str) -> str:
    """The layout of a state dict, from its key names; an unknown one raises WeightsMismatchError listing the
    names each layout has and the names found."""
    if any(name in state for name in EMBEDDING_NAMES[NATIVE]):
        return NATIVE
    if EMBEDDING_NAMES[MINIMIND2_HF][0] in state:
        return MINIMIND3 if any(name.endswith("self_attn.q_norm.weight") for name in state) else MINIMIND2_HF
    found = sorted(state)
    raise WeightsMismatchError(
        f"{source}: not a MiniMind checkpoint of a known layout. Expected {NATIVE} names (tok_embeddings.weight, "
        f"layers.0.attention.wq.weight, layers.0.feed_forward.w1.weight, ...) or {MINIMIND2_HF}/{MINIMIND3} names "
        f"(model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, model.layers.0.mlp.gate_proj.weight, "
        f"... with self_attn.q_norm.weight in minimind-3); found {len(found)} keys: {', '.join(found[:8])}"
        f"{', ...' if len(found) > 8 else ''}")


def native_names(state: dict[str, torch.Tensor], layout: str, source: str) -> dict[str, torch.Tensor]:
    """The tensors under our names, still in the layout's rotary order. Names no layout knows are an error.
    The HF-style list of shared experts becomes our one wide shared expert (rows of w1/w3, columns of w2)."""
    if layout == NATIVE:
        prefix = "model." if "model.tok_embeddings.weight" in state else ""  # our MoE export's folder
        return {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    ours_for = {theirs: ours for ours, theirs in LAYER_NAMES.items()}
    globals_for = {theirs: ours for ours, theirs in GLOBAL_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    shared: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (layer, projection) -> {expert: tensor}
    unknown = []
    for name, tensor in state.items():
        layer = THEIR_LAYER.fullmatch(name)
        if name in globals_for:
            out[globals_for[name]] = tensor
        elif layer is None:
            unknown.append(name)
        elif layer[2] in ours_for:
            out[f"layers.{layer[1]}.{ours_for[layer[2]]}"] = tensor
        elif expert := THEIR_EXPERT.fullmatch(layer[2]):
            ours = {theirs: ours for ours, theirs in EXPERT_NAMES.items()}[expert[2]]
            out[f"layers.{layer[1]}.feed_forward.experts.{expert[1]}.{ours}.weight"] = tensor
        elif shared_expert := THEIR_SHARED.fullmatch(layer[2]):
            shared.setdefault((int(layer[1]), shared_expert[2]), {})[int(shared_expert[1])] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise WeightsMismatchError(f"{source}: keys that no MiniMind release has: {', '.join(sorted(unknown)[:6])}")
    for (layer, projection), experts in shared.items():
        ours = {theirs: ours for ours, theirs in EXPERT_NAMES.items()}[projection]
        parts = [experts[s] for s in sorted(experts)]
        out[f"layers.{layer}.feed_forward.shared_experts.{ours}.weight"] = torch.cat(parts, dim=1 if ours == "w2" else 0)
    return out


def release_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our dense (per-head q/k norms allowed) names -> the Hugging Face Llama / Qwen3 names (lm_head included
    only when present, i.e. for an untied head)."""
    out = {}
    for name, tensor in state.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)
        if rest not in LAYER_NAMES or rest.startswith("feed_forward.gate"):
            raise ConfigError(f"{name} has no Llama/Qwen3 name (only dense models export to Llama/Qwen3)")
        out[f"model.layers.{layer}.{LAYER_NAMES[rest]}"] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rotary order: interleaved pairs (MiniMind2) <-> rotated halves (Llama, Qwen3, the later releases)


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (n_heads*hd, dim): per head, rows 0,2,4,.. then 1,3,5,.."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_halves."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def reorder_rotary(state: dict[str, torch.Tensor], config: LMConfig, from_layout: str,
                   to_layout: str) -> dict[str, torch.Tensor]:
    """A state dict (our names) with its q/k rows and q/k norm weights reordered from one rotary order to the
    other ("interleaved" or "half"); the other tensors are passed through."""
    if to_layout == from_layout:
        return dict(state)
    reorder = interleaved_to_halves if to_layout == "half" else halves_to_interleaved
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads,
             "attention.q_norm.weight": 1, "attention.k_norm.weight": 1}
    out = {}
    for name, tensor in state.items():
        n_heads = heads.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        if n_heads is None:
            out[name] = tensor
        elif tensor.ndim == 1:  # a norm weight: one value per position within a head
            out[name] = reorder(tensor[:, None], 1)[:, 0].contiguous()
        else:
            out[name] = reorder(tensor, n_heads).contiguous()
    return out


def rope_layout_of(layout: str) -> str:
    return "interleaved" if layout == NATIVE else "half"


# ----------------------------------------------------------------------------------------------------------------
# The architecture of a bare .pth (no config.json): read from the tensors' shapes


def infer_config(state: dict[str, torch.Tensor], layout: str, source: str, preset_name: str | None = None,
                 **given) -> LMConfig:
    """The LMConfig of a state dict in our names: sizes from the tensors' shapes, the rest from the release's
    defaults, a preset (if named) and `given` fields (flags the user set), in rising priority. Given sizes are not
    second-guessed here: a checkpoint that disagrees with them fails the strict load that follows, naming both."""
    given = {k: v for k, v in given.items() if v is not None}
    family = MINIMIND3 if "layers.0.attention.q_norm.weight" in state else layout  # a minimind-3 in our names too
    fields = {**RELEASE_DEFAULTS[family], **(PRESETS[preset_name] if preset_name else {}), **given}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    embedding = shapes.get("tok_embeddings.weight")
    if embedding is None:
        raise WeightsMismatchError(f"{source}: the embedding (tok_embeddings.weight) is missing")
    inferred = dict(vocab_size=embedding[0], dim=embedding[1],
                    n_layers=1 + max((int(n.split(".")[1]) for n in shapes if n.startswith("layers.")), default=-1))
    q_norm, wq, wk = (shapes.get(f"layers.0.attention.{n}.weight") for n in ("q_norm", "wq", "wk"))
    inferred["qk_norm"] = q_norm is not None
    if q_norm is not None:  # the q/k norms give the head size, and so the head counts
        inferred["head_dim"] = q_norm[0]
    head_dim = fields.get("head_dim") or inferred.get("head_dim") or inferred["dim"] // fields.get("n_heads", 8)
    if wq is not None and wk is not None and head_dim:
        inferred.update(n_heads=wq[0] // head_dim, n_kv_heads=wk[0] // head_dim)
    experts = {int(n.split(".")[4]) for n in shapes if n.startswith("layers.0.feed_forward.experts.")}
    ffn = shapes.get("layers.0.feed_forward.experts.0.w1.weight" if experts else "layers.0.feed_forward.w1.weight")
    if ffn is not None:
        inferred["hidden_dim"] = ffn[0]
    inferred["use_moe"] = bool(experts)
    if experts:
        shared = shapes.get("layers.0.feed_forward.shared_experts.w1.weight")
        inferred.update(n_routed_experts=len(experts), n_shared_experts=shared[0] // ffn[0] if shared else 0)
    head = state.get("output.weight")
    inferred["tie_word_embeddings"] = head is None or head is state["tok_embeddings.weight"] or (
        head.shape == state["tok_embeddings.weight"].shape and torch.equal(head, state["tok_embeddings.weight"]))
    return LMConfig(**{**inferred, **fields})


def tie_or_untie(state: dict[str, torch.Tensor], config: LMConfig, source: str) -> dict[str, torch.Tensor]:
    """A tied model's state dict has output.weight = the embedding (added when a file stores it once); an
    untied model needs its own output matrix; a tied config with a different stored head is an error."""
    state = dict(state)
    head, embedding = state.get("output.weight"), state.get("tok_embeddings.weight")
    if not config.tie_word_embeddings or embedding is None:
        return state
    if head is not None and head is not embedding and not torch.equal(head, embedding):
        raise WeightsMismatchError(f"{source}: the output head differs from the embedding, but the config ties "
                                   f"them (tie_word_embeddings=true)")
    state["output.weight"] = embedding
    return state


# ----------------------------------------------------------------------------------------------------------------
# config.json of a Hugging Face folder


def rope_settings_from_hf(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, inference_rope_scaling) from a config.json: transformers 5 `rope_parameters`, the 4.x
    `rope_theta` + `rope_scaling` fields, or the MiniMind releases' `inference_rope_scaling: true` (YaRN x16 from
    2048 positions, attention factor 1)."""
    if cfg.get("inference_rope_scaling") is True:
        return float(cfg.get("rope_theta", 1e6)), {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                                                   "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "yarn":
        scaling = {"type": "yarn", "factor": float(params["factor"])}
        for key in ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
            if params.get(key) is not None:
                scaling[key] = params[key]
        return theta, scaling
    raise ConfigError(f"{source}: rope type {kind!r} is not supported by MiniMind (default, linear, yarn)")


def config_from_json(cfg: dict, layout: str, source: str, **given) -> LMConfig:
    """The LMConfig a config.json describes: ours (LMConfig's own field names: our MoE exports and the Feb-2025
    MiniMind2 folders), or transformers' standard names (Llama/Qwen3 exports, the MiniMind2 re-release and
    minimind-3 folders, whose MoE fields are named n_routed_experts or num_experts). `given` fields win."""
    if "dim" in cfg:  # LMConfig's own names
        return LMConfig(**{**{k: v for k, v in cfg.items() if k in architecture_fields()}, **given})
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported (MiniMind attends to all positions)")
    for field, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                           ("scoring_func", "softmax")):
        if cfg.get(field, allowed) != allowed:
            raise ConfigError(f"{source}: {field}={cfg[field]!r} is not supported (MiniMind uses {allowed!r})")
    defaults = RELEASE_DEFAULTS[layout]
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    intermediate = cfg.get("intermediate_size")
    if cfg.get("moe_intermediate_size") not in (None, intermediate):
        raise ConfigError(f"{source}: moe_intermediate_size={cfg['moe_intermediate_size']} differs from "
                          f"intermediate_size={intermediate}; MiniMind's experts have the dense FFN's size")
    rope_theta, scaling = rope_settings_from_hf(cfg, source)
    fields = dict(
        dim=hidden, n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads, vocab_size=cfg["vocab_size"], hidden_dim=intermediate,
        norm_eps=cfg.get("rms_norm_eps", defaults["norm_eps"]), max_seq_len=cfg.get("max_position_embeddings", 8192),
        rope_theta=rope_theta, inference_rope_scaling=scaling, qk_norm=layout == MINIMIND3,
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), use_moe=bool(cfg.get("use_moe", False)),
        num_experts_per_tok=cfg.get("num_experts_per_tok", defaults["num_experts_per_tok"]),
        n_routed_experts=cfg.get("n_routed_experts", cfg.get("num_experts", 4)),
        n_shared_experts=cfg.get("n_shared_experts", 1 if layout == MINIMIND2_HF else 0),
        norm_topk_prob=cfg.get("norm_topk_prob", True), norm_top1=layout == MINIMIND3, seq_aux=cfg.get("seq_aux", defaults["seq_aux"]),
        aux_loss_alpha=cfg.get("aux_loss_alpha", cfg.get("router_aux_loss_coef", defaults["aux_loss_alpha"])),
    )
    return LMConfig(**{**fields, **given})
