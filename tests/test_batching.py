"""Continuous batching (model/batching.py): every request gets exactly what it would get alone, whatever joins or
leaves the batch around it, with its own sampling settings; max_batch bounds the batch; cancel and errors."""
from __future__ import annotations

import queue
import threading

import pytest
import torch

from conftest import tiny_model
from model.batching import ContinuousBatcher, Sampling

EOS = 2


def wide_tiny_model(seed: int = 0, **overrides):
    """A tiny random model whose greedy replies vary (std-0.02 weights make it repeat one token forever)."""
    torch.manual_seed(seed)
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


class Collector:
    """on_token/on_error callbacks of one request, and a way to wait for its end."""

    def __init__(self):
        self.tokens: list[int] = []
        self.error: Exception | None = None
        self.done = threading.Event()

    def on_token(self, token: int | None) -> None:
        if token is None:
            self.done.set()
        else:
            self.tokens.append(token)

    def on_error(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(60), "the request never finished"
        assert self.error is None, self.error
        return self.tokens


def alone(model, prompt: list[int], max_new_tokens: int, sampling: Sampling) -> list[int]:
    """The reference: model.generate on this prompt alone (stops after eos, which is included)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                         top_p=sampling.top_p, top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                         eos_token_id=EOS, pad_token_id=-1, seed=sampling.seed)[0].tolist()
    return [t for t in out if t != -1]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=generator).tolist()
    return [torch.randint(3, 6400, (length,), generator=generator).tolist() for length in lengths]


@pytest.mark.parametrize("use_moe", [False, True])
def test_concurrent_greedy_requests_each_get_what_they_would_get_alone(use_moe):
    model = wide_tiny_model(use_moe=use_moe)
    batcher = ContinuousBatcher(model, max_batch=4, eos_token_id=EOS)
    greedy = Sampling(temperature=0.0)
    cases = [(p, 5 + 7 * i) for i, p in enumerate(prompts(10))]  # budgets differ: rows leave at different steps
    collectors = []
    for prompt, budget in cases:  # 10 requests into 4 rows: later ones join as earlier ones leave
        collectors.append(Collector())
        batcher.submit(prompt, budget, greedy, collectors[-1].on_token, collectors[-1].on_error)
    try:
        for (prompt, budget), collector in zip(cases, collectors):
            assert collector.wait() == alone(model, prompt, budget, greedy)
    finally:
        batcher.close()


def test_each_request_samples_with_its_own_settings_and_seed():
    model = wide_tiny_model(seed=1)
    batcher = ContinuousBatcher(model, max_batch=8, eos_token_id=EOS)
    settings = [Sampling(temperature=1.0, top_p=0.9, seed=7), Sampling(temperature=0.0),
                Sampling(temperature=0.8, top_k=5, repetition_penalty=1.3, seed=11), Sampling(temperature=1.2, seed=7)]
    cases = list(zip(prompts(4, seed=3), settings))
    collectors = [Collector() for _ in cases]
    try:
        for (prompt, sampling), collector in zip(cases, collectors):
            batcher.submit(prompt, 24, sampling, collector.on_token, collector.on_error)
        for (prompt, sampling), collector in zip(cases, collectors):
            assert collector.wait() == alone(model, prompt, 24, sampling)
    finally:
        batcher.close()


def test_max_batch_bounds_the_rows_of_every_step():
    model = wide_tiny_model(seed=2)
    batch_sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    batcher = ContinuousBatcher(model, max_batch=3, eos_token_id=None)
    collectors = [Collector() for _ in range(7)]
    try:
        for prompt, collector in zip(prompts(7, seed=4), collectors):
            batcher.submit(prompt, 6, Sampling(temperature=0.0), collector.on_token, collector.on_error)
        assert all(len(c.wait()) == 6 for c in collectors)
    finally:
        batcher.close()
        handle.remove()
    assert max(batch_sizes) == 3  # full batches happened, and none was larger


def test_a_cancelled_request_leaves_and_the_others_go_on():
    model = wide_tiny_model(seed=3)
    batcher = ContinuousBatcher(model, max_batch=4, eos_token_id=None)
    tokens: queue.Queue = queue.Queue()
    first = prompts(2, seed=5)
    handle = batcher.submit(first[0], 10_000, Sampling(temperature=0.0), tokens.put, tokens.put)
    other = Collector()
    try:
        batcher.submit(first[1], 40, Sampling(temperature=0.0), other.on_token, other.on_error)
        for _ in range(3):
            assert isinstance(tokens.get(timeout=30), int)
        handle.cancel()
        while (item := tokens.get(timeout=30)) is not None:  # at most one more step, then the end
            assert isinstance(item, int)
        assert other.wait() == alone(model, first[1], 40, Sampling(temperature=0.0))
        assert batcher.active == 0
    finally:
        batcher.close()


def test_a_failing_step_fails_its_requests_and_the_batcher_serves_the_next():
    model = wide_tiny_model(seed=4)
    calls = {"n": 0}

    def fail_once(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(fail_once)
    batcher = ContinuousBatcher(model, max_batch=2, eos_token_id=None)
    try:
        broken = Collector()
        batcher.submit([5, 6, 7], 20, Sampling(temperature=0.0), broken.on_token, broken.on_error)
        assert broken.done.wait(30) and isinstance(broken.error, RuntimeError)
        healthy = Collector()
        batcher.submit([5, 6, 7], 4, Sampling(temperature=0.0), healthy.on_token, healthy.on_error)
        assert healthy.wait() == alone(model, [5, 6, 7], 4, Sampling(temperature=0.0))
    finally:
        batcher.close()
        handle.remove()
