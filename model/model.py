"""MiniMind: a small Llama-style decoder, dense or mixture-of-experts, in plain PyTorch.

Reading order: RMSNorm -> rotary embeddings -> KV cache and Attention -> FeedForward -> MoE gate and MoE block ->
packed rows -> Block -> MiniMindLM (forward, generation). Parameter names match the published MiniMind2 `.pth`
checkpoints, so those load with `strict=True`. The rotary embedding rotates interleaved pairs (dims 2i, 2i+1) as Meta's Llama code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .LMConfig import LMConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (bf16 squares overflow/round badly)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x * rsqrt(mean(x^2) + eps), one fused op
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies 1/theta^(2i/head_dim) (i < head_dim/2), adjusted by an optional long-context scaling.

    Returns (inv_freq, attention_factor); cos/sin are multiplied by attention_factor (YaRN's "mscale", else 1).
    scaling: None, or {"type": "linear" | "ntk" | "yarn", "factor": f, ...}:
      linear: positions are divided by f (position interpolation).
      ntk:    theta is raised to theta * f^(d/(d-2)) (NTK-aware), stretching low frequencies, keeping high ones.
      yarn:   per-frequency blend of interpolated and original frequencies with a linear ramp between the
              dimensions that rotate beta_fast and beta_slow times over original_max_position_embeddings;
              attention_factor 0.1 ln(f) + 1 unless the dict gives one (the later MiniMind releases give 1.0).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    kind = (scaling or {}).get("type")
    factor = float((scaling or {}).get("factor", 1.0))
    if kind is None:
        return (1.0 / theta**exponents).float(), 1.0
    if kind == "linear":
        return (1.0 / theta**exponents / factor).float(), 1.0
    if kind == "ntk":
        return (1.0 / (theta * factor ** (head_dim / (head_dim - 2))) ** exponents).float(), 1.0
    if kind == "yarn":
        original_len = scaling.get("original_max_position_embeddings", 2048)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_for_rotations(rotations: float) -> float:  # which dimension turns `rotations` times in original_len
            return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_for_rotations(beta_fast)), 0)
        high = min(math.ceil(dim_for_rotations(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        original = 1.0 / theta**exponents
        inv_freq = original / factor * ramp + original * (1 - ramp)  # fast dims keep original, slow dims interpolate
        attention_factor = scaling.get("attention_factor", 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq.float(), attention_factor
    raise ValueError(f"unknown rope_scaling type {kind!r}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """Rotate pairs of dimensions of x (B, T, H, hd) by their angles a_i, computed in float32: the interleaved
    pairs (x[2i], x[2i+1]), or with layout "half" the pairs (x[i], x[i + hd/2]). A pair (u, v) becomes
    (u cos a_i - v sin a_i, u sin a_i + v cos a_i).

    cos and sin (B, T, 1, hd) hold every angle at both members of its pair, with -sin at the first member, so the
    rotation is x * cos + partner(x) * sin, where partner(x) puts each member of a pair in the other's place:
    four element-wise ops, which matters when a decode step is a few microseconds per op."""
    xf = x.float()
    if layout == "half":
        partner = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x1, x2) -> (x2, x1)
    else:
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x0, x1, x2, x3, ..) -> (x1, x0, x3, x2, ..)
    return (xf * cos + partner * sin).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Attention


class KVCache:
    """The keys and values of every layer for the tokens processed so far, each layer's as (B, n_kv_heads, length,
    head_dim) views of buffers that grow in chunks. A decode step writes its one position in place (concatenating
    would copy the whole cache every token), and memory follows the tokens actually seen, not max_seq_len."""

    def __init__(self, n_layers: int, chunk: int = 256):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # positions filled in every layer; the model advances it after each forward
        self.chunk = chunk

    @classmethod
    def from_tensors(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """A cache holding these (keys, values) per layer, e.g. converted from another library's cache."""
        cache = cls(len(layers))
        for i, (k, v) in enumerate(layers):
            cache.keys[i], cache.values[i] = k, v
        cache.length = layers[0][0].shape[2] if layers else 0
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions k, v (B, n_kv, T, hd) of `layer` after the cached ones; return all of them."""
        start, end = self.length, self.length + k.shape[2]
        buffer = self.keys[layer]
        if buffer is None or buffer.shape[2] < end:  # grow: at least double, in whole chunks
            capacity = max(end, 2 * buffer.shape[2] if buffer is not None else 0)
            capacity = -(-capacity // self.chunk) * self.chunk
            self.keys[layer], self.values[layer] = (self._grown(old, new, start, capacity)
                                                    for old, new in ((buffer, k), (self.values[layer], v)))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @staticmethod
    def _grown(old: torch.Tensor | None, new: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
        B, H, _, D = new.shape
        buffer = new.new_empty(B, H, capacity, D)
        if old is not None:
            buffer[:, :, :filled] = old[:, :, :filled]
        return buffer

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n_kv, length, hd) of one layer."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]


class Attention(nn.Module):
    """Grouped-query causal self-attention with an optional KV cache."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.rope_layout = config.rope_layout
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        # Optional (minimind-3): RMSNorm over each head's query and key, one weight of head_dim shared by the heads.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.wqkv: nn.Linear | None = None  # wq, wk, wv stacked into one layer by fuse_for_inference()
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # SDPA picks flash / memory-efficient kernels on GPU; the explicit path is the readable reference.
        self.flash = config.flash_attn

    def fuse_for_inference(self) -> None:
        """Stack wq, wk and wv into one layer: one matrix product per decode step instead of three. The outputs
        are the same; the state dict is not (wqkv.weight), so a fused model is for inference only."""
        self.wqkv = stacked_linear(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        """mask: None means plain causal attention over x alone (or, for one new token, over everything cached);
        else a bool (B, 1, T, S) tensor, True where a query may attend a key. With a cache, the new keys and values
        are stored in it as layer `layer_index` and attention covers the cached positions too."""
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin, self.rope_layout), apply_rotary(k, cos, sin, self.rope_layout)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer_index, k, v)  # (B, n_kv, S, hd)

        dropout_p = self.dropout if self.training else 0.0
        if self.flash and T == 1:
            # Decoding, one query per head: the n_heads / n_kv_heads queries that share a KV head become that head's
            # queries, so attention reads the cache as it is instead of copying it per query head.
            grouped = q.reshape(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            y = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).view(B, self.n_heads, 1, self.head_dim)
        elif self.flash:  # T > 1 here
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                               enable_gqa=True)
        else:
            y = self.explicit_attention(q, k, v, mask, mask is None and T > 1, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))

    def explicit_attention(self, q, k, v, mask, causal: bool, dropout_p: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v, written out; each group of query heads shares one KV head."""
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if causal:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.float().softmax(dim=-1).type_as(q), p=dropout_p)
        return probs @ v


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU, and the mixture-of-experts version


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LMConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or config.hidden_dim
        self.w1 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden_dim, bias=False)
        self.w13: nn.Linear | None = None  # w1 and w3 stacked into one layer by fuse_for_inference()
        self.dropout = nn.Dropout(config.dropout)

    def fuse_for_inference(self) -> None:
        """Stack w1 and w3 into one layer (one matrix product instead of two); for inference only."""
        self.w13 = stacked_linear(self.w1, self.w3)
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


def stacked_linear(*layers: nn.Linear) -> nn.Linear:
    """One bias-free layer whose output is the outputs of `layers` side by side."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    return stacked


class MoEGate(nn.Module):
    """Softmax router: picks the top-k routed experts per token and computes the load-balancing loss."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.norm_top1 = config.norm_top1
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (weights (B*T, k), expert ids (B*T, k), aux_loss scalar)."""
        B, T, D = x.shape
        scores = F.linear(x.reshape(-1, D), self.weight).softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and (self.top_k > 1 or self.norm_top1):  # the chosen weights sum to 1
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training and self.alpha > 0:
            aux_loss = self.balance_loss(scores, topk_idx, B, T)
        else:
            aux_loss = scores.new_zeros(())
        return topk_weight, topk_idx, aux_loss

    def balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """alpha * sum_e f_e * P_e: f_e = share of routing slots given to expert e (scaled so uniform = 1),
        P_e = mean router probability of e. seq_aux computes it per sequence and averages (DeepSeek-V2 style)."""
        E, k = self.n_experts, self.top_k
        if self.seq_aux:
            counts = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
            counts.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * k, device=scores.device, dtype=scores.dtype))
            load = counts / (T * k / E)  # (B, E)
            return (load * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=E).float().mean(0) * E  # (E,)
        return (scores.mean(0) * load).sum() * self.alpha


class MoEFeedForward(nn.Module):
    """Routed experts (top-k per token, weighted) plus always-on shared experts."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        # n shared experts are one SwiGLU n times as wide (the same function as summing n separate ones).
        self.shared_experts = (
            FeedForward(config, config.hidden_dim * config.n_shared_experts) if config.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        weights, expert_ids, aux_loss = self.gate(x)
        y = self.route(x.reshape(-1, D), weights, expert_ids).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, aux_loss

    def route(self, tokens: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Run each expert once on the tokens routed to it and add its weighted output back in place.

        Slots (token, choice) are sorted by expert so each expert sees one contiguous batch (one host sync for
        the counts). In inference an expert without tokens is skipped; in training it still runs on an empty
        batch so every parameter is part of the graph (DDP requires a gradient, here zero, for each one).
        """
        flat_ids = expert_ids.view(-1)  # (N*k,)
        order = flat_ids.argsort()
        counts = flat_ids.bincount(minlength=len(self.experts)).tolist()
        token_of_slot = order // self.top_k
        slot_weight = weights.view(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count or self.training:
                idx = token_of_slot[start : start + count]
                expert_out = expert(tokens[idx]) * slot_weight[start : start + count]
                out.index_add_(0, idx, expert_out.to(out.dtype))
            start += count
        return out


# ----------------------------------------------------------------------------------------------------------------
# Packed rows: several documents in one row, each attending only to itself


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its document: 0 where document_ids changes (and at column 0)."""
    B, T = document_ids.shape
    columns = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_column = torch.where(starts, columns, 0).cummax(dim=1).values
    return columns - start_column


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T): a query sees the keys at or before it in the same document (block-diagonal causal)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# The decoder


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.is_moe = config.use_moe
        self.feed_forward = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer_index: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer_index)
        if self.is_moe:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(h))
        else:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(h)), None
        return h + ffn_out, aux_loss


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, vocab)
    aux_loss: torch.Tensor  # scalar: summed MoE balancing loss (0 for dense models and in eval mode)
    past_key_values: KVCache | None  # the cache, holding this call's tokens too (with use_cache)


class MiniMindLM(nn.Module):
    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tok_embeddings.weight = self.output.weight  # tied input/output embedding
        # RoPE frequencies are computed on first use per device: kept out of the state dict, out of .half(), and
        # real even when the weights were built on the meta device (transformers' from_pretrained).
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def fuse_for_inference(self) -> "MiniMindLM":
        """Stack the projections that read the same input (wq/wk/wv, w1/w3) into single layers, for faster
        decoding. Outputs are unchanged; training, LoRA and saving need the unfused model (merge adapters first)."""
        for module in self.modules():
            if isinstance(module, (Attention, FeedForward)):
                module.fuse_for_inference()
        return self.eval()

    def num_parameters(self) -> int:
        """Unique parameters (a tied embedding counted once), int8 layers (model/quantize.py) included; the int8
        copy of a tied output layer is the embedding again."""
        tied_copy = "output.weight_int8" if self.config.tie_word_embeddings else None
        int8 = sum(buffer.numel() for name, buffer in self.named_buffers()
                   if name.endswith("weight_int8") and name != tied_copy)
        return sum(p.numel() for p in self.parameters()) + int8

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, 1, head_dim) for integer positions (B, T), laid out as apply_rotary takes them."""
        device = position_ids.device
        if device not in self._inv_freq:
            cfg = self.config
            with torch.device("cpu"):
                inv_freq, self._rope_scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.inference_rope_scaling)
            self._inv_freq[device] = inv_freq.to(device)
        angles = position_ids[..., None].float() * self._inv_freq[device]  # (B, T, hd/2)
        cos, sin = angles.cos() * self._rope_scale, angles.sin() * self._rope_scale
        pair_dim = -2 if self.config.rope_layout == "half" else -1  # both members of pair i: i, i+hd/2 or 2i, 2i+1
        return (torch.stack((cos, cos), dim=pair_dim).flatten(-2).unsqueeze(2),
                torch.stack((-sin, sin), dim=pair_dim).flatten(-2).unsqueeze(2))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids (B, T). attention_mask (B, past + T), 1 for real tokens and 0 for (left) padding, covers the
        cached tokens too. past_key_values: a KVCache from an earlier call (it is extended in place), or None
        with use_cache=True to start one. logits_to_keep > 0 computes logits for the last that many positions.
        document_ids (B, T), for packed rows of several documents (no cache): a token attends only to earlier
        tokens of its own document, and positions restart at 0 where a document starts."""
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else KVCache(len(self.layers)) if use_cache else None
        past_len = cache.length if cache is not None else 0
        if document_ids is not None:
            if past_len:
                raise ValueError("document_ids (packed rows) cannot be combined with a KV cache")
            position_ids = positions_in_documents(document_ids)
            mask = document_causal_mask(document_ids)
        else:
            mask = self.attention_mask(attention_mask, B, T, past_len, input_ids.device)
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only, so padding does not shift positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(position_ids)

        h = self.dropout(self.tok_embeddings(input_ids))
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, layer_aux = layer(h, cos, sin, mask, cache, i)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        logits = self.output(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
        return LMOutput(logits=logits, aux_loss=aux_loss, past_key_values=cache)

    @staticmethod
    def attention_mask(padding_mask, B: int, T: int, past_len: int, device) -> torch.Tensor | None:
        """Bool (B, 1, T, past+T) mask, or None when plain causal attention is exact (the fast SDPA path)."""
        if padding_mask is None and (past_len == 0 or T == 1):
            return None
        S = past_len + T
        query_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
        if padding_mask is not None:
            # A padding query would see no key at all (NaN softmax); letting every query see itself avoids it.
            allowed = allowed & padding_mask.bool()[:, None, None, :] | (key_pos == query_pos)
        return allowed.expand(B, 1, T, S)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def stream_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, shape (B,), one step at a time, using the KV cache.

        Prompts of different lengths are left-padded with attention_mask 0. A row that produced eos_token_id
        yields pad_token_id afterwards; the loop stops when all rows are done or after max_new_tokens.
        temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed makes sampling reproducible.
        """
        B = input_ids.shape[0]
        device = input_ids.device
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: use the plain causal fast path
        seen = None  # (B, V) tokens in each row's context, kept only for the repetition penalty
        if repetition_penalty != 1.0:
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=device)
            seen[torch.arange(B, device=device)[:, None].expand_as(input_ids)[real], input_ids[real]] = True
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache, step_input = None, input_ids
        for _ in range(max_new_tokens):
            out = self(step_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_token = sample_next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, pad_token_id)
            yield next_token
            if seen is not None:
                seen[torch.arange(B, device=device), next_token] |= ~finished
            if eos_token_id is not None:
                finished |= next_token == eos_token_id
                if bool(finished.all()):
                    return
            # a finished row keeps feeding eos (a real token id) so its cache stays valid; its output is ignored
            step_input = (next_token if eos_token_id is None else next_token.masked_fill(finished, eos_token_id))[:, None]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The new tokens only, (B, n_new); rows that stopped early are filled with pad_token_id.
        Takes the same keyword arguments as stream_generate."""
        steps = list(self.stream_generate(input_ids, **kwargs))
        if not steps:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(steps, dim=1)


def sample_next_token(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from float logits (B, V). seen (B, V) marks the tokens already in the context (needed
    only with a repetition penalty)."""
    if repetition_penalty != 1.0:
        # CTRL's rule, sign-aware: a penalised token always becomes less likely.
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # the tokens ranked after the nucleus is full
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
