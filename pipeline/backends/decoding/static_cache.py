"""Greedy decoding on a GPU: fixed batches over a static KV cache, each decoding step replayed as a CUDA graph.

Launched op by op, a decoding step of a 135M model is bound by the host: ~20 ms for 30 layers of small
kernels, whatever the batch (an H200, bench/gpu.py). The step becomes one CUDA graph replay when every
shape and address is fixed, so this path trades `backends.decoding`'s continuous batching (rows leave and
join, the cache grows) for waves: `rows` prompts are prefilled together (left-padded, after the shared
prefix copied into every row once) and decoded in lockstep until all have answered; a finished row runs
on masked, its tokens unread. On a GPU a row costs little; a launch costs much.

Attention masks are additive and 4-D (built here, not by the model), so they can be updated in place
inside the graph: a row sees the prefix, its own real tokens and what it generated. The cache writes each
step at one shared position (`StaticCache`'s own counter); position ids are per row, counting only its
real tokens, so answers are the plain path's (a test holds them to `greedy_answers` on CPU, where the same
steps run without a graph).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.backends.decoding.constraint import TokenConstraint
from pipeline.backends.decoding.greedy import (WINDOW_BATCHES, Answer, AnswerClock, InOrder, by_length_in_windows,
                                               take_tokens)


def fits_static_cache(model: Any) -> bool:
    """Whether every layer of the model's static cache holds all positions (no sliding window)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in StaticCache(config=model.config, max_cache_len=1).layers)


class StaticDecoder:
    """Decodes waves of up to `rows` prompts over a static cache of `length` positions whose first
    `prefix_length` hold `prefix` (a batch-1 cache) in every row. With `graphs`, each decoding step after
    the first is a replay of a CUDA graph captured from it."""

    def __init__(self, model: Any, rows: int, length: int, prefix: Any = None, prefix_length: int = 0,
                 constraint: TokenConstraint | None = None, graphs: bool = False):
        from transformers import StaticCache

        self.model, self.rows, self.length, self.prefix, self.prefix_length = model, rows, length, prefix, prefix_length
        self.constraint, self.graphs = constraint, graphs
        device, dtype = model.device, model.dtype
        self.hidden = torch.finfo(dtype).min  # a masked key's additive score
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # each row's latest token
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # where the next token goes in the cache
        self.mask = torch.full((rows, 1, 1, length), self.hidden, dtype=dtype, device=device)
        # each row's allowed tokens, as wide as the logits (the output layer's rows): the constraint's, set from
        # the rows' states before each step (outside the graph, which reads this buffer)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.allowed = torch.ones(rows, self.vocab, dtype=torch.bool, device=device) if constraint else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures_failed = 0
        if prefix is not None and prefix_length:
            for layer, held in zip(self.cache.layers, prefix.layers):
                keys = held.keys.expand(rows, -1, -1, -1)
                values = held.values.expand(rows, -1, -1, -1)
                layer.lazy_initialization(keys, values)
                layer.keys[:, :, :prefix_length] = keys
                layer.values[:, :, :prefix_length] = values

    def answer(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], answers: list[Answer],
               indices: list[int], clock: AnswerClock, on_step: Callable[[], None]) -> None:
        """Greedy answers to one wave of prompts (token ids after the prefix) into `answers[indices]`."""
        states = [self.constraint.start(max_new_tokens) for _ in prompts] if self.constraint else None
        live = list(range(len(prompts)))
        if states is not None:
            self.allowed.fill_(True)  # rows past the wave's prompts: any token, unread
            self._restrict(states, live)
        tokens = self._prefill(prompts)
        while True:
            still = take_tokens(answers, indices, tokens, live, states, self.constraint, stop_ids, max_new_tokens,
                                clock())
            if len(still) < len(live):
                on_step()
            live = still
            if not live:
                return
            if states is not None:
                self._restrict(states, live)
            self._decode_step()
            tokens = self.last.tolist()

    def _restrict(self, states: list, live: list[int]) -> None:
        """The live rows' allowed tokens from their constraint states (a finished row keeps its last: unread)."""
        allowed = self.constraint.allowed([states[r] for r in live], self.vocab, self.model.device)
        self.allowed[torch.tensor(live, device=self.model.device)] = allowed

    def _prefill(self, prompts: list[list[int]]) -> list[int]:
        """Run the wave's prompts (left-padded; spare rows repeat the first) after the prefix; their first tokens."""
        rows, prefix, device = self.rows, self.prefix_length, self.model.device
        prompts = prompts + [prompts[0]] * (rows - len(prompts))
        width = max(len(p) for p in prompts)
        if prefix + width >= self.length:
            raise ValueError(f"prompts of {width} tokens after a {prefix}-token prefix overflow a static cache of "
                             f"{self.length}")
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(prefix)
        self.mask.fill_(self.hidden)
        self.mask[..., :prefix] = 0
        self.mask[:, 0, 0, prefix: prefix + width].masked_fill_(real, 0)
        # Query i (cache position prefix + i) sees the row's visible keys up to itself, and itself: a padding
        # query would otherwise see nothing when there is no prefix (a softmax over no key).
        keys = torch.arange(self.length, device=device)
        queries = prefix + torch.arange(width, device=device)
        after = (keys[None, :] > queries[:, None])
        mask = self.mask.expand(rows, 1, width, self.length).masked_fill(after, self.hidden)
        mask[:, 0, torch.arange(width, device=device), queries] = 0
        positions = prefix + real.long().cumsum(-1) - 1
        first = self._next_tokens(ids, mask, positions.clamp(min=0))
        self.last.copy_(first)
        self.positions.copy_(prefix + real.sum(-1, keepdim=True))
        self.at.fill_(prefix + width)
        return first.tolist()

    def _next_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                          cache=self.cache, use_cache=True).last_hidden_state[:, -1]
        logits = self.model.get_output_embeddings()(hidden)
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, torch.finfo(logits.dtype).min)
        return logits.argmax(-1)

    def _step(self) -> None:
        """One decoding step on the buffers, in place: what the graph holds."""
        self.mask.index_fill_(3, self.at, 0)  # the token written now is visible to its own row
        self.last.copy_(self._next_tokens(self.last[:, None], self.mask, self.positions))
        self.positions.add_(1)
        self.at.add_(1)

    def _decode_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.graphs or self.captures_failed:
            self._step()
            return
        # The first step runs eagerly on a side stream (the warm-up a capture needs); later steps replay it.
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._step()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except RuntimeError:
            self.captures_failed += 1  # an op that cannot be captured: decode on without a graph
            return
        self.graph = graph


@torch.inference_mode()
def greedy_answers_static(decoder: StaticDecoder, prompts: list[list[int]], max_new_tokens: int,
                          stop_ids: list[int], on_answers: Callable[[int, list[Answer]], None] | None = None,
                          window: int | None = None) -> list[Answer]:
    """Greedy answers to `prompts` in waves of `decoder.rows` (by length within windows of waves, so a wave's
    rows pad little); `on_answers(start, answers)` as in `greedy_answers`, its time left out of latencies."""
    clock, answers = AnswerClock(), [Answer([]) for _ in prompts]
    order = by_length_in_windows(prompts, window or WINDOW_BATCHES * decoder.rows)
    report = InOrder(answers, stop_ids, max_new_tokens, clock, on_answers)
    for start in range(0, len(order), decoder.rows):
        wave = order[start: start + decoder.rows]
        for i in wave:
            answers[i].admitted_at = clock()
        decoder.answer([prompts[i] for i in wave], max_new_tokens, stop_ids, answers, wave, clock, report)
    return answers
