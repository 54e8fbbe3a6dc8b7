"""Int8 weights for fast CPU decoding.

Generating one token multiplies every weight matrix by one vector, so a decode step is bound by how fast the
weights stream from memory: float32 reads 4 bytes per weight, bfloat16 2 and int8 1. `Int8Linear` keeps each
linear layer's weight as int8 with one float scale per output row (symmetric, round to nearest: w ~ scale * q with
q in [-127, 127]), and multiplies with torch's int8-weight kernel, which takes its input in bfloat16; the rest
of the model (norms, rotary embeddings, attention, the residual stream) stays in float32. Only the weights are
quantized, never the activations, so the error is the weights' rounding (at most half a scale step per weight)
plus the bfloat16 rounding of each layer's input.

    model = quantize_linear_layers(model)   # every nn.Linear of the model, in place
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MATMUL_DTYPE = torch.bfloat16  # what the int8 kernel multiplies the weights with (fast on CPUs)


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale per row in scale_dtype) with weight ~ scale[:, None] * int8 weight, rounding to nearest.

    Each row's scale is its largest magnitude / 127, rounded up to scale_dtype (so no weight needs more than
    127 steps); the weights are then rounded against that stored scale: every error is at most half a step."""
    exact = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    scale = exact.to(scale_dtype)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    quantized = torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and a scale per output feature (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free layers only (MiniMind has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        quantized, scale = quantize_rows(linear.weight.detach(), scale_dtype=MATMUL_DTYPE)
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer actually multiplies by, in float32 (for checks)."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(MATMUL_DTYPE)
        if flat.device.type == "cpu":
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:  # the same product, written out, for devices without the fused kernel
            out = F.linear(flat, self.weight_int8.to(flat.dtype)) * self.scale
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` by an Int8Linear (in place). A tied output layer gets its own int8 copy;
    the embedding keeps its table. Everything else (embedding, norms, attention) stays in the model's dtype."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
