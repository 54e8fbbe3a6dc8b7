"""MiniMind: a small Llama-style decoder, dense or mixture-of-experts, in plain PyTorch.

Reading order: RMSNorm -> rotary embeddings -> Attention -> FeedForward -> MoE gate and MoE block -> Block ->
MiniMindLM (forward, generation). Parameter names match the published MiniMind2 `.pth` checkpoints, so those
load with `strict=True`. The rotary embedding rotates interleaved pairs (dims 2i, 2i+1) as Meta's Llama code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .LMConfig import LMConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each (B, n_kv_heads, S, head_dim)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (bf16 squares overflow/round badly)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies 1/theta^(2i/head_dim) (i < head_dim/2), adjusted by an optional long-context scaling.

    Returns (inv_freq, attention_factor); cos/sin are multiplied by attention_factor (YaRN's "mscale", else 1).
    scaling: None, or {"type": "linear" | "ntk" | "yarn", "factor": f, ...}:
      linear: positions are divided by f (position interpolation).
      ntk:    theta is raised to theta * f^(d/(d-2)) (NTK-aware), stretching low frequencies, keeping high ones.
      yarn:   per-frequency blend of interpolated and original frequencies with a linear ramp between the
              dimensions that rotate beta_fast and beta_slow times over original_max_position_embeddings.
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
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq.float(), attention_factor
    raise ValueError(f"unknown rope_scaling type {kind!r}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by angles given as cos/sin (B, T, 1, hd/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Grouped-query causal self-attention with an optional KV cache."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # SDPA picks flash / memory-efficient kernels on GPU; the explicit path is the readable reference.
        self.flash = config.flash_attn

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """mask: None means plain causal attention over x alone (or, for one new token, over everything cached);
        else a bool (B, 1, T, S) tensor, True where a query may attend a key."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, n_kv, S, hd)
            v = torch.cat([past_kv[1], v], dim=2)
        present = (k, v) if use_cache else None

        dropout_p = self.dropout if self.training else 0.0
        causal = mask is None and T > 1
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=True)
        else:
            y = self.explicit_attention(q, k, v, mask, causal, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y)), present

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
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    """Softmax router: picks the top-k routed experts per token and computes the load-balancing loss."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (weights (B*T, k), expert ids (B*T, k), aux_loss scalar)."""
        B, T, D = x.shape
        scores = F.linear(x.reshape(-1, D), self.weight).softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
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

    def forward(self, x, cos, sin, mask, past_kv=None, use_cache=False):
        attn_out, present = self.attention(self.attention_norm(x), cos, sin, mask, past_kv, use_cache)
        h = x + attn_out
        if self.is_moe:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(h))
        else:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(h)), None
        return h + ffn_out, present, aux_loss


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, vocab)
    aux_loss: torch.Tensor  # scalar: summed MoE balancing loss (0 for dense models and in eval mode)
    past_key_values: KVCache | None


class MiniMindLM(nn.Module):
    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
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

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, 1, head_dim/2) for integer positions (B, T)."""
        device = position_ids.device
        if device not in self._inv_freq:
            cfg = self.config
            with torch.device("cpu"):
                inv_freq, self._rope_scale = rope_frequencies(cfg.dim // cfg.n_heads, cfg.rope_theta, cfg.inference_rope_scaling)
            self._inv_freq[device] = inv_freq.to(device)
        angles = position_ids[..., None].float() * self._inv_freq[device]  # (B, T, hd/2)
        return (angles.cos() * self._rope_scale).unsqueeze(2), (angles.sin() * self._rope_scale).unsqueeze(2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """input_ids (B, T). attention_mask (B, past + T), 1 for real tokens and 0 for (left) padding, covers the
        cached tokens too. logits_to_keep > 0 computes logits for the last that many positions only."""
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only, so padding does not shift positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(position_ids)
        mask = self.attention_mask(attention_mask, B, T, past_len, input_ids.device)

        h = self.dropout(self.tok_embeddings(input_ids))
        presents: KVCache = []
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, present, layer_aux = layer(h, cos, sin, mask, past_key_values[i] if past_key_values else None, use_cache)
            presents.append(present)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        h = self.norm(h)
        logits = self.output(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
        return LMOutput(logits=logits, aux_loss=aux_loss, past_key_values=presents if use_cache else None)

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
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.arange(B, device=device)[:, None].expand_as(input_ids)[real], input_ids[real]] = True
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        past, step_input = None, input_ids
        for _ in range(max_new_tokens):
            out = self(step_input, attention_mask=attention_mask, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_token = sample_next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator)
            next_token = next_token.masked_fill(finished, pad_token_id)
            yield next_token
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
    seen: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from float logits (B, V). seen (B, V) marks tokens already in the context."""
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
