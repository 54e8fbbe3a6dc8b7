"""MiniMind model configuration.

`LMConfig` is a `transformers.PretrainedConfig` so it can be saved next to exported weights, but the model code
only reads plain attributes from it. Field names and defaults match the published MiniMind2 configs, so their
checkpoints load unchanged.
"""
from __future__ import annotations

import inspect
import math

from transformers import PretrainedConfig

from .common import ConfigError

ROPE_SCALING_TYPES = ("linear", "ntk", "yarn")
ROPE_LAYOUTS = ("interleaved", "half")


class LMConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        n_kv_heads: int = 2,
        vocab_size: int = 6400,
        hidden_dim: int | None = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 8192,
        rope_theta: float = 1e6,
        inference_rope_scaling: dict | None = None,
        dropout: float = 0.0,
        flash_attn: bool = True,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        norm_top1: bool = False,
        qk_norm: bool = False,
        head_dim: int | None = None,
        rope_layout: str = "interleaved",
        **kwargs,
    ):
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        # SwiGLU keeps the parameter count of a 4*dim MLP: 2/3 * 4 * dim, rounded up to `multiple_of`.
        self.hidden_dim = hidden_dim if hidden_dim is not None else multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.rope_theta = rope_theta
        # Long-context RoPE scaling, e.g. {"type": "yarn", "factor": 4, "original_max_position_embeddings": 2048}.
        # (Not named `rope_scaling`: transformers 5 turns that attribute into its own `rope_parameters`.)
        self.inference_rope_scaling = inference_rope_scaling
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        # With one expert per token, MiniMind2 weights its output by the router probability; minimind-3 normalises
        # that single weight too (to 1), so the router learns from the balancing loss alone.
        self.norm_top1 = norm_top1
        # minimind-3 (Qwen3-like): an RMSNorm over each head's query and key, before the rotary embedding.
        self.qk_norm = qk_norm
        self.head_dim = head_dim if head_dim is not None else dim // n_heads
        # Which dimensions of a head RoPE rotates together: "interleaved" pairs (2i, 2i+1), as MiniMind2 was
        # trained, or "half": (i, i + head_dim/2), as Llama, Qwen3 and the later MiniMind releases. Either is
        # the other with the q/k projection rows reordered (model/releases.py converts weights that way).
        self.rope_layout = rope_layout
        # tie_word_embeddings (a PretrainedConfig field): the output head shares the embedding matrix (default);
        # False gives the model a separate output matrix.
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Fail early, naming the field, instead of deep inside a matmul."""
        if self.head_dim < 1 or self.n_heads < 1 or self.n_kv_heads < 1:
            raise ConfigError(f"LMConfig: head_dim={self.head_dim}, n_heads={self.n_heads} and n_kv_heads="
                              f"{self.n_kv_heads} must be >= 1 (without an explicit head_dim, dim >= n_heads)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LMConfig: n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"LMConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ConfigError(f"LMConfig: rope_layout={self.rope_layout!r} must be one of {ROPE_LAYOUTS}")
        if self.use_moe:
            if self.scoring_func != "softmax":
                raise ConfigError(f"LMConfig: scoring_func={self.scoring_func!r} is not supported (only 'softmax')")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"LMConfig: num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}"
                )
        scaling = self.inference_rope_scaling
        if scaling is not None:
            if scaling.get("type") not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"LMConfig: inference_rope_scaling.type={scaling.get('type')!r} must be one of {ROPE_SCALING_TYPES}"
                )
            if float(scaling.get("factor", 1.0)) < 1.0:
                raise ConfigError(f"LMConfig: inference_rope_scaling.factor must be >= 1, got {scaling.get('factor')}")


# The published MiniMind2 sizes; the comments give the exact unique-parameter counts (embedding tied to output).
PRESETS: dict[str, dict] = {
    "MiniMind2-Small": dict(dim=512, n_layers=8),  # 25,829,888
    "MiniMind2": dict(dim=768, n_layers=16),  # 104,030,976
    "MiniMind2-MoE": dict(dim=640, n_layers=8, use_moe=True),  # 145,029,760
    # minimind-3 (2026), dense: Qwen3-like, per-head q/k norms, 4 KV heads, FFN ceil(768 * pi / 64) * 64 = 2432.
    "minimind-3": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=2432, norm_eps=1e-6,
                       qk_norm=True),  # 63,912,192
    # minimind-3 MoE (198M total, 64M active): 4 experts, one per token, no shared expert, and the balancing
    # loss alpha * E * sum_e(load_e * mean_prob_e) over all tokens of the batch (seq_aux off).
    "minimind-3-moe": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=2432, norm_eps=1e-6,
                           qk_norm=True, use_moe=True, n_routed_experts=4, num_experts_per_tok=1,
                           n_shared_experts=0, norm_top1=True, seq_aux=False, aux_loss_alpha=5e-4),  # 198,416,640
}


def preset(name: str, **overrides) -> LMConfig:
    """LMConfig for a named preset, e.g. `preset("MiniMind2-Small", max_seq_len=512)`."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})


def architecture_fields() -> set[str]:
    """Names of the fields that describe a MiniMind network: LMConfig's own arguments and tie_word_embeddings."""
    return {p for p in inspect.signature(LMConfig.__init__).parameters if p not in ("self", "kwargs")} | {
        "tie_word_embeddings"}
