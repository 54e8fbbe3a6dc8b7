"""Reinforcement learning from rewards: the quantities GRPO (and Dr. GRPO, CISPO) and PPO optimise, written out.

Shapes: a batch of B completions of T tokens each (right-padded), `mask` (B, T) is 1 on completion tokens.
`logp`, `old_logp`, `ref_logp` (B, T) are the log-probabilities of the sampled tokens under the policy being
trained, the policy that sampled them (fixed for the several updates one batch of rollouts gets) and the frozen
reference model.

GRPO (DeepSeekMath): G completions per prompt; a completion's advantage is its reward relative to its group's,
A_i = (r_i - mean(r)) / (std(r) + eps); every token of the completion gets A_i. The objective per token is
PPO's clipped one, min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) with rho = exp(logp - old_logp), minus
beta * KL(policy || reference) by the k3 estimator exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).
  * loss_type "grpo":    token mean per completion, then mean over completions;
  * loss_type "dr_grpo": (Dr. GRPO, "Understanding R1-Zero-Like Training") no std in the advantage and no
    per-completion length normalisation: the token sum divided by a constant (B * max_new_tokens);
  * loss_type "cispo":   (MiniMax-M1) every token keeps its gradient: the clipped importance weight, with its
    gradient stopped, multiplies A * logp (a REINFORCE term); token mean over the whole batch.

PPO: per-token rewards (the KL penalty at every token, the sequence's reward added at its last token), a value
V_t per token from a critic, generalised advantage estimation (GAE), the clipped policy loss and the clipped
value loss.
"""
from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "cispo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is 1 (over `dim`, or everything); 0 where the mask is empty."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits: logits (B, T, V) predicting tokens (B, T). Computed in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Rewards (B,) of consecutive groups of `group_size` completions of one prompt -> advantages (B,): reward
    minus its group's mean, divided by the group's (unbiased) standard deviation + eps when scale_by_std."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps) if group_size > 1 else centred
    return centred.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str = "grpo", epsilon: float = 0.2, epsilon_high: float | None = None,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                max_new_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO / Dr. GRPO / CISPO loss (to minimise) of a batch, and its metrics (ratio mean, clip fraction,
    KL mean). advantages: (B,) per completion, or (B, T) per token (PPO)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: choose one of {LOSS_TYPES}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    if loss_type == "cispo":
        per_token = -clipped.detach() * adv * logp
    else:
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo normalises by max_new_tokens: pass it")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    else:
        loss = masked_mean(per_token, mask)
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        metrics = {"ratio": masked_mean(ratio, mask), "clip_fraction": masked_mean(is_clipped.to(mask.dtype), mask),
                   "kl": masked_mean(kl, mask)}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# PPO: per-token rewards, GAE, the value loss


def per_token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                      beta: float = 0.0) -> torch.Tensor:
    """(B, T) rewards: -beta * KL at every completion token, plus each completion's score at its last token."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    if kl is not None and beta:
        rewards = rewards - beta * kl * mask
    last = mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last completion token of each row
    rewards[torch.arange(mask.shape[0]), last] += scores.float()
    return rewards * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens: delta_t = r_t + gamma V_{t+1} - V_t
    (V after the last token is 0), A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V),
    both 0 outside the mask."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Padding after a row's end passes nothing back: the next row-token's value and advantage start at 0.
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), token mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask.to(values.dtype))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    mask = mask.bool()
    residual, target = (returns - values)[mask], returns[mask]
    return 1 - residual.var(unbiased=False) / target.var(unbiased=False).clamp(min=1e-8)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries (PPO normalises its advantages so)."""
    mean = masked_mean(values, mask.to(values.dtype))
    var = masked_mean((values - mean) ** 2, mask.to(values.dtype))
    return (values - mean) * torch.rsqrt(var + eps) * mask
