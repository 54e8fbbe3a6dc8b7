"""MiniMind model configuration.

`LMConfig` is a `transformers.PretrainedConfig` so it can be saved next to exported weights, but the model code
only reads plain attributes from it. Field names and defaults match the published MiniMind2 configs, so their
checkpoints load unchanged.
"""
from __future__ import annotations

import math

from transformers import PretrainedConfig

from .common import ConfigError

ROPE_SCALING_TYPES = ("linear", "ntk", "yarn")


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
        qk_norm: bool = False,
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
        # minimind-3 (Qwen3-like): an RMSNorm over each head's query and key, before the rotary embedding.
        self.qk_norm = qk_norm
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Fail early, naming the field, instead of deep inside a matmul."""
        if self.dim % self.n_heads:
            raise ConfigError(f"LMConfig: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LMConfig: n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"LMConfig: head_dim={self.dim // self.n_heads} must be even for rotary embeddings")
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
}


def preset(name: str, **overrides) -> LMConfig:
    """LMConfig for a named preset, e.g. `preset("MiniMind2-Small", max_seq_len=512)`."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})
