"""Inference precisions (--infer_dtype): int8 weights against a dequantize-by-hand reference, and every precision
against float32 on the same model."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model
from model.common import ConfigError
from model.loading import add_model_args, resolve_infer_dtype, to_infer_dtype
from model.quantize import Int8Linear, quantize_rows


def test_rows_are_rounded_to_the_nearest_step_of_their_own_scale():
    weight = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 37)[:, None]
    quantized, scale = quantize_rows(weight)
    assert quantized.dtype == torch.int8 and int(quantized.abs().max()) == 127
    assert torch.equal(scale, weight.abs().amax(dim=1) / 127)  # the largest weight of each row maps to +-127
    error = (quantized.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())  # at most half a step, row by row
    quantized, scale = quantize_rows(weight, scale_dtype=torch.bfloat16)  # a coarse scale: rounded up, then used
    assert scale.dtype == torch.bfloat16 and bool((scale.float() >= weight.abs().amax(dim=1) / 127).all())
    error = (quantized.float() * scale.float()[:, None] - weight).abs()
    assert bool((error <= scale.float()[:, None] / 2 + 1e-7).all())


def test_int8_linear_multiplies_by_its_dequantized_weight():
    linear = nn.Linear(64, 48, bias=False)
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x.bfloat16().float(), layer.dequantized())  # the reference: float32 from the int8 values
    out = layer(x)
    assert out.shape == (3, 5, 48) and out.dtype == x.dtype  # float32 in, float32 out
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)  # the kernel rounds its output to bfloat16
    torch.testing.assert_close(layer.dequantized(), linear.weight.detach(), atol=float(layer.scale.max()) / 2, rtol=0)


@pytest.mark.parametrize("name, tolerance", [("bfloat16", 0.05), ("float16", 0.01), ("int8", 0.08)])
def test_each_precision_stays_close_to_float32(name, tolerance):
    torch.manual_seed(2)
    model = tiny_model().eval()
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = model(ids).logits.float()
    low = to_infer_dtype(copy.deepcopy(model), name)
    logits = low(ids).logits.float()
    relative = (logits - reference).norm() / reference.norm()
    assert relative < tolerance, f"{name}: relative logit error {relative:.4f}"
    if name == "int8":
        assert all(not isinstance(m, nn.Linear) for m in low.modules())  # every projection went to int8
        assert isinstance(low.layers[0].attention.wqkv, Int8Linear)
    assert low.num_parameters() == model.num_parameters()


def test_int8_is_for_the_cpu_and_auto_picks_per_device():
    with pytest.raises(ConfigError, match="int8 runs on the CPU only"):
        resolve_infer_dtype("int8", torch.device("cuda"))
    assert resolve_infer_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_infer_dtype("auto", torch.device("mps")) == "float16"
    assert resolve_infer_dtype("int8", torch.device("cpu")) == "int8"


def test_the_old_dtype_flag_still_works():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert parser.parse_args(["--dtype", "bfloat16"]).infer_dtype == "bfloat16"
    assert parser.parse_args(["--infer_dtype", "int8"]).infer_dtype == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8"])
def test_compiled_generation_gives_the_tokens_of_eager_generation(name):
    from model.loading import compile_for_generation
    torch.manual_seed(4)
    model = tiny_model()
    with torch.no_grad():  # wide weights: greedy replies that vary, so a wrong logit would show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model = to_infer_dtype(model, name)
    prompts = torch.randint(3, 6400, (1, 9), generator=torch.Generator().manual_seed(5))
    eager = model.generate(prompts, max_new_tokens=12, temperature=0)
    compiled = compile_for_generation(copy.deepcopy(model))
    assert torch.equal(compiled.generate(prompts, max_new_tokens=12, temperature=0), eager)
    torch._dynamo.reset()
