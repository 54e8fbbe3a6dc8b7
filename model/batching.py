"""Continuous batching: many generations share every decode step of one model.

A decode step costs about the same for 8 rows as for 1 (it is bound by reading the weights), so a server that
answers requests one after the other wastes most of the machine. `ContinuousBatcher` runs one background
thread that owns the model. Between two decode steps it admits waiting requests (up to `max_batch` rows): each
prompt is prefilled alone, which gives the request its first token and its KV cache, and that cache joins the
running batch. Every step then feeds each row its last token; each row samples with its own settings and random
generator, finished rows (eos, budget spent, cancelled) leave, and the others carry on.

Rows are aligned on the right: the batch cache holds S positions, a row of n tokens occupies the last n, and a
bool mask (B, S) marks them, so positions and attention of every row are those it would have alone. Columns that
no remaining row uses are dropped when rows leave.

    batcher = ContinuousBatcher(model, max_batch=8, eos_token_id=tokenizer.eos_token_id)
    handle = batcher.submit(prompt_ids, max_new_tokens=256, sampling=Sampling(temperature=0.7, seed=1),
                            on_token=print, on_error=print)   # called on the batcher's thread: token ids, then None
    handle.cancel()                                # optional: the row leaves before the next step
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from .model import KVCache, MiniMindLM, sample_next_token


@dataclass
class Sampling:
    """One request's sampling settings (see sample_next_token); temperature 0 is greedy."""

    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


def is_plain_greedy(sampling: Sampling) -> bool:
    """Greedy without a repetition penalty: the row's token is the argmax of its logits."""
    return sampling.temperature <= 0 and sampling.repetition_penalty == 1.0


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    on_token: Callable[[int | None], None]  # each new token, then None once the request is over
    on_error: Callable[[Exception], None]  # instead of None, if generation failed
    generated: int = 0
    cancelled: bool = False
    seen: torch.Tensor | None = None  # (1, vocab) bool: tokens in the context, kept for a repetition penalty only
    generator: torch.Generator | None = None


class RequestHandle:
    """What `submit` returns: cancel() makes the request leave the batch before the next decode step."""

    def __init__(self, request: Request, batcher: "ContinuousBatcher"):
        self._request, self._batcher = request, batcher

    def cancel(self) -> None:
        self._request.cancelled = True
        self._batcher.wake()


class ContinuousBatcher:
    def __init__(self, model: MiniMindLM, max_batch: int = 8, eos_token_id: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.eos = model, max_batch, eos_token_id
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the running batch, one request per row
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, S) bool: which cached positions belong to each row
        self.last_tokens: torch.Tensor | None = None  # (B,) the token each row feeds next
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="minimind-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------------------------
    # The caller's side

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: Sampling,
               on_token: Callable[[int | None], None], on_error: Callable[[Exception], None]) -> RequestHandle:
        """Queue a generation of up to max_new_tokens tokens after `prompt` (stopping after eos)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        request = Request(prompt, max_new_tokens, sampling, on_token, on_error)
        with self.condition:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(request)
            self.condition.notify()
        return RequestHandle(request, self)

    @property
    def active(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.rows)

    def wake(self) -> None:
        with self.condition:
            self.condition.notify()

    def close(self) -> None:
        """Stop the thread after the current step; requests still queued or running are dropped."""
        with self.condition:
            self.closed = True
            self.condition.notify()

    # ------------------------------------------------------------------------------------------------------------
    # The batcher's thread

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not self.waiting and not self.rows:
                    self.condition.wait()
                if self.closed:
                    return
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            for request in admitted:
                try:
                    self._prefill(request)
                except Exception as error:  # e.g. out of memory: this request fails, the batch goes on
                    request.on_error(error)
            if self.rows:
                try:
                    self._decode_step()
                except Exception as error:  # every running request fails; the batcher serves new ones
                    for request in self.rows:
                        request.on_error(error)
                    self._keep_rows([])

    @torch.inference_mode()
    def _prefill(self, request: Request) -> None:
        """Run the prompt alone, emit its first token and, if it goes on, add its cache to the batch."""
        if request.cancelled:
            request.on_token(None)
            return
        if request.sampling.repetition_penalty != 1.0:  # as in stream_generate: tracked only when it is used
            request.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            request.seen[0, torch.tensor(request.prompt, device=self.device)] = True
        if request.sampling.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        token = self._sample(request, out.logits[:, -1])
        if self._emit(request, token):
            self._join(request, out.past_key_values, token)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        B = len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        padded = not bool(self.mask.all())  # without padding, the plain causal path (as a lone request runs)
        out = self.model(self.last_tokens[:, None], attention_mask=self.mask if padded else None,
                         past_key_values=self.cache, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(dim=-1).tolist()  # one op for all plain greedy rows (usually most of them)
        tokens = [greedy[row] if is_plain_greedy(request.sampling) else self._sample(request, logits[row : row + 1])
                  for row, request in enumerate(self.rows)]
        self.last_tokens = torch.tensor(tokens, device=self.device)
        keep = [row for row, (request, token) in enumerate(zip(self.rows, tokens)) if self._emit(request, token)]
        if len(keep) < B:
            self._keep_rows(keep)

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        s = request.sampling
        token = sample_next_token(logits.float(), request.seen, s.temperature, s.top_p, s.top_k,
                                  s.repetition_penalty, request.generator)
        if request.seen is not None:
            request.seen[0, token] = True
        return int(token[0])

    def _emit(self, request: Request, token: int) -> bool:
        """Hand the token over; True if the request goes on."""
        request.generated += 1
        request.on_token(token)
        if request.cancelled or token == self.eos or request.generated >= request.max_new_tokens:
            request.on_token(None)
            return False
        return True

    # ------------------------------------------------------------------------------------------------------------
    # The batch cache: rows join on the right-aligned grid, leave, and unused columns go

    def _join(self, request: Request, cache: KVCache, token: int) -> None:
        n = cache.length
        token_tensor = torch.tensor([token], device=self.device)
        if not self.rows:
            self.rows, self.cache, self.last_tokens = [request], cache, token_tensor
            self.mask = torch.ones(1, n, dtype=torch.bool, device=self.device)
            return
        S = self.cache.length
        width = max(S, n)
        layers = [
            (torch.cat([pad_left(k_old, width - S), pad_left(k_new, width - n)]),
             torch.cat([pad_left(v_old, width - S), pad_left(v_new, width - n)]))
            for (k_old, v_old), (k_new, v_new) in (
                (self.cache.layer(i), cache.layer(i)) for i in range(len(self.model.layers)))
        ]
        new_mask = torch.zeros(1, width, dtype=torch.bool, device=self.device)
        new_mask[:, width - n:] = True
        self.mask = torch.cat([pad_left(self.mask, width - S, dim=1), new_mask])
        self.cache = KVCache.from_tensors(layers)
        self.rows.append(request)
        self.last_tokens = torch.cat([self.last_tokens, token_tensor])

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.mask, self.last_tokens = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        first_used = int(mask.any(dim=0).long().argmax())  # columns before it are padding in every row left
        self.mask = mask[:, first_used:]
        self.cache = KVCache.from_tensors([(k[index, :, first_used:], v[index, :, first_used:])
                                           for k, v in (self.cache.layer(i) for i in range(len(self.model.layers)))])
        self.rows = [self.rows[i] for i in keep]
        self.last_tokens = self.last_tokens[index]


def pad_left(x: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    """x with n zero (False) entries prepended along dim."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)
