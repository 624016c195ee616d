"""Greedy decoding with continuous batching: a row leaves the batch when it has answered, the next prompts join.

`model.generate` keeps every row in the batch until the last one stops: on the default task the
answers average 7 tokens while each batch ran to its longest (24), so most of the decoding work went
to rows that had already finished. Here each step runs only the rows still answering (the KV cache
keeps their rows, `Cache.batch_select_indices`), the next prompts' prefill joins the running batch
once a quarter of it has left, each row's finishing time is recorded, and a constraint (`constraint.py`: one
label of a set, or JSON of a schema) masks all live rows' logits at once from their states, instead of a Python
callback per row and step. Greedy choice on the same logits as `generate` (a test holds it to `generate`'s answers):
sampling settings and penalties in a model's generation config are not applied; every arm answers greedily.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.backends.decoding.constraint import TokenConstraint


@dataclass
class Answer:
    """One prompt's generated tokens (through its stop token); when it joined the batch and when it was
    answered, in seconds of a clock that leaves out the caller's callbacks (`AnswerClock`)."""

    tokens: list[int]
    admitted_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class RowCaches:
    """Where each row's KV cache starts: `fresh(n)` makes the cache for `n` new rows, already holding the
    shared prefix (`prefix_length` positions, of which each row's own keys hold `held_per_row`: 0 when
    the prefix is held once, all of it when copied per row)."""

    fresh: Callable[[int], Any]
    prefix_length: int = 0
    held_per_row: int = 0


# Prompts join in order of length within windows of this many batches: rows of one prefill are padded to the
# longest of them, which on the default task wasted a third of the prefill. Answers are handed over in prompt
# order, so at most one window's answers wait for those before them.
WINDOW_BATCHES = 8
# The next prompts join once a quarter of the batch (1 / JOIN_WHEN_FREE) has answered. Waiting for half left
# decoding steps narrow (a third of the time went to passes of ~15 of 32 rows); joining at every free row would
# make each prefill a row or two wide.
JOIN_WHEN_FREE = 4


class _Rows:
    """The rows being answered together: their prompt indices, KV cache, attention mask (over what the
    cache holds), last chosen token and constraint states."""

    def __init__(self, prompts: list[int], cache: Any, mask: torch.Tensor, states: list[Any] | None):
        self.prompts, self.cache, self.mask, self.states = prompts, cache, mask, states
        self.last: torch.Tensor | None = None

    def select(self, indices: list[int]) -> None:
        """Keep only the rows at `indices` (those still answering)."""
        if len(indices) == len(self.prompts):
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.prompts = [self.prompts[i] for i in indices]
        self.states = [self.states[i] for i in indices] if self.states is not None else None

    def join(self, other: "_Rows", row_caches: RowCaches) -> "_Rows":
        """These rows and `other`'s in one batch: the shorter caches are padded (masked out) after the prefix."""
        if not self.prompts:
            return other
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = _cat_padded(mine.keys, theirs.keys, row_caches.held_per_row)
            mine.values = _cat_padded(mine.values, theirs.values, row_caches.held_per_row)
        self.mask = _cat_padded(self.mask, other.mask, row_caches.prefix_length)
        self.last = torch.cat([self.last, other.last])
        self.prompts += other.prompts
        self.states = self.states + other.states if self.states is not None else None
        return self


def _joinable(cache: Any) -> bool:
    """Whether rows can join a running batch of this cache: every layer holds all its keys in one tensor
    (`_Rows.join` pads them). A sliding-window layer keeps only its window and its own length count, so a
    model with one decodes each admitted group to its end before the next prompts start."""
    from transformers.cache_utils import DynamicLayer

    from pipeline.backends.decoding.shared_prefix import SharedPrefixLayer

    return all(type(layer) in (DynamicLayer, SharedPrefixLayer) for layer in cache.layers)


def _cat_padded(a: torch.Tensor, b: torch.Tensor, at: int) -> torch.Tensor:
    """`a` and `b` stacked on dim 0; the shorter one along its sequence dim (2 for a cache, 1 for a mask) is
    padded with zeros at position `at`."""
    dim = 2 if a.dim() == 4 else 1
    gap = a.shape[dim] - b.shape[dim]
    if gap:
        short = b if gap > 0 else a
        zeros = short.new_zeros(*short.shape[:dim], abs(gap), *short.shape[dim + 1:])
        padded = torch.cat([short.narrow(dim, 0, at), zeros, short.narrow(dim, at, short.shape[dim] - at)], dim)
        a, b = (a, padded) if gap > 0 else (padded, b)
    return torch.cat([a, b])


class AnswerClock:
    """`time.perf_counter()` less the time spent in the caller's callback, which a caller's wait excludes."""

    def __init__(self):
        self.outside = 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.outside

    def excluding(self, callback: Callable[..., None], *args: Any) -> None:
        started = time.perf_counter()
        callback(*args)
        self.outside += time.perf_counter() - started


@torch.inference_mode()
def greedy_answers(model: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], batch_size: int,
                   pad_id: int, row_caches: RowCaches | None = None, constraint: TokenConstraint | None = None,
                   on_answers: Callable[[int, list[Answer]], None] | None = None,
                   window: int | None = None) -> list[Answer]:
    """Greedy answers to `prompts` (token ids after the cached prefix), at most `batch_size` rows at a time.

    A row leaves the batch when it has answered; when a quarter of the batch has left (or all the prompts
    left fit), the next prompts' prefill runs and they join it (continuous batching), so decoding steps
    stay wide. `on_answers(start, answers)` receives answers in prompt order as soon as all before them
    are done; its time is left out of their latencies. Position ids follow the mask, so each row sees
    the positions it would unpadded. Prompts join by length within windows of `window` prompts (default
    `WINDOW_BATCHES` batches).
    """
    from transformers import DynamicCache

    if max_new_tokens < 1 or not all(prompts):
        raise ValueError("greedy_answers needs max_new_tokens >= 1 and at least one token in every prompt")
    row_caches = row_caches or RowCaches(lambda _n: DynamicCache(config=model.config))
    clock, answers = AnswerClock(), [Answer([]) for _ in prompts]
    pending = deque(by_length_in_windows(prompts, window or WINDOW_BATCHES * batch_size))
    rows = _Rows([], None, torch.zeros(0, 0, dtype=torch.long, device=model.device), None)
    report, joinable = InOrder(answers, stop_ids, max_new_tokens, clock, on_answers), True
    while pending or rows.prompts:
        free = batch_size - len(rows.prompts)
        enough = min(max(1, batch_size // JOIN_WHEN_FREE), len(pending))
        if pending and free >= enough and (joinable or not rows.prompts):
            joining = [pending.popleft() for _ in range(min(len(pending), free))]
            for i in joining:
                answers[i].admitted_at = clock()
            new, input_ids, positions = _prefill(model, [prompts[i] for i in joining], joining, pad_id, row_caches,
                                                 constraint, max_new_tokens)
            joinable = joinable and _joinable(new.cache)
            finished = _step(model, new, answers, stop_ids, max_new_tokens, constraint, input_ids, positions, clock)
            rows = rows.join(new, row_caches) if new.prompts else rows
        else:
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.prompts), 1)], dim=-1)
            positions = rows.mask.sum(-1, keepdim=True) - 1
            finished = _step(model, rows, answers, stop_ids, max_new_tokens, constraint, rows.last[:, None],
                             positions, clock)
        if finished:
            report()
    return answers


def take_tokens(answers: list[Answer], prompts: list[int], tokens: list[int], rows: Any, states: list[Any] | None,
                constraint: TokenConstraint | None, stop_ids: list[int], max_new_tokens: int, now: float) -> list[int]:
    """Append each of `rows`' token to its prompt's answer, answered at `now`; the rows still answering, their
    constraint states moved on. Row r answers prompt `prompts[r]` with `tokens[r]`."""
    answering = []
    for row in rows:
        answer = answers[prompts[row]]
        answer.tokens.append(tokens[row])
        answer.finished_at = now
        if not _finished(answer, stop_ids, max_new_tokens):
            answering.append(row)
            if states is not None:
                states[row] = constraint.advance(states[row], tokens[row])
    return answering


class InOrder:
    """Hands finished answers to `on_answers(start, answers)` in prompt order, as soon as all before them are
    done; the time that takes is left out of `clock`."""

    def __init__(self, answers: list[Answer], stop_ids: list[int], max_new_tokens: int, clock: AnswerClock,
                 on_answers: Callable[[int, list[Answer]], None] | None):
        self.answers, self.stop_ids, self.max_new_tokens = answers, stop_ids, max_new_tokens
        self.clock, self.on_answers = clock, on_answers
        self.reported = 0

    def __call__(self) -> None:
        if not self.on_answers:
            return
        done = self.reported
        while done < len(self.answers) and _finished(self.answers[done], self.stop_ids, self.max_new_tokens):
            done += 1
        if done > self.reported:
            self.clock.excluding(self.on_answers, self.reported, self.answers[self.reported:done])
            self.reported = done


def by_length_in_windows(prompts: list[list[int]], window: int) -> list[int]:
    order = []
    for start in range(0, len(prompts), window):
        order += sorted(range(start, min(start + window, len(prompts))), key=lambda i: len(prompts[i]))
    return order


def _finished(answer: Answer, stop_ids: list[int], max_new_tokens: int) -> bool:
    return bool(answer.tokens) and (answer.tokens[-1] in stop_ids or len(answer.tokens) >= max_new_tokens)


def _prefill(model: Any, suffixes: list[list[int]], indices: list[int], pad_id: int, row_caches: RowCaches,
             constraint: TokenConstraint | None, max_new_tokens: int) -> tuple[_Rows, torch.Tensor, torch.Tensor]:
    """New rows, left-padded after the prefix, and their prefill's input ids and position ids."""
    width = max(len(s) for s in suffixes)
    device = model.device
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes], device=device)
    mask = torch.tensor([[1] * row_caches.prefix_length + [0] * (width - len(s)) + [1] * len(s) for s in suffixes],
                        device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    states = [constraint.start(max_new_tokens) for _ in suffixes] if constraint else None
    rows = _Rows(list(indices), row_caches.fresh(len(suffixes)), mask, states)
    return rows, input_ids, positions


def _step(model: Any, rows: _Rows, answers: list[Answer], stop_ids: list[int], max_new_tokens: int,
          constraint: TokenConstraint | None, input_ids: torch.Tensor, positions: torch.Tensor, clock: AnswerClock) -> bool:
    """One forward pass of `rows`: each row's next token; rows that have answered leave. Whether any did.

    The output projection runs on the last position only, as a [rows, hidden] matmul: torch.matmul takes
    a slow batched path for a [rows, 1, hidden] slice through a frozen weight (a copy of the vocabulary
    matrix per row)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=rows.mask, position_ids=positions,
                                 cache=rows.cache, use_cache=True).last_hidden_state[:, -1]
    logits = model.get_output_embeddings()(hidden)
    if constraint:
        allowed = constraint.allowed(rows.states, logits.shape[-1], logits.device)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    # Through fp32 (exact, and the same first index on ties): on CPU argmax over bf16 is not vectorised.
    rows.last = logits.float().argmax(-1)
    answering = take_tokens(answers, rows.prompts, rows.last.tolist(), range(len(rows.prompts)), rows.states,
                            constraint, stop_ids, max_new_tokens, clock())
    answered = len(answering) < len(rows.prompts)
    rows.select(answering)
    return answered
