"""On CUDA, a LoRA training step's forward and backward replayed as one CUDA graph per padded batch shape.

A 135M model with LoRA on every linear layer launches thousands of small kernels a step (30 layers, 210
adapters, their casts), each a few microseconds of GPU work: launched one by one from Python the GPU
sits idle most of the step, whatever the batch. Captured once as a CUDA graph, the step's kernels are
replayed with one launch. Graphs need fixed shapes and no host syncs, so:

- each batch is padded to `rows` rows and to its length rounded up to `length_multiple`, at most to the
  longest row of the training set (one graph per length bucket: a capture costs about two eager steps);
  extra rows and columns carry no labels. The collator pads on the right, so with a
  causal mask a row's real tokens never see its padding, and no padding mask is needed;
- the loss projects a fixed number of positions (the labelled ones first, found by a stable sort rather
  than a data-dependent index), so its shape does not depend on how many positions the batch labels.

The loss is SFT's completion-only loss: the mean over labelled tokens of the next-token cross-entropy.
The optimizer step, gradient clipping and logging stay the Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def completion_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, positions: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100, projecting only `positions`
    of them through the output layer (`positions` must be at least the number labelled). Shapes are fixed by
    the inputs' and `positions`, and no value is read back to the host."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:].reshape(-1)  # position t predicts token t + 1
    labelled = targets != -100
    # The labelled positions first, in order; the rest of the `positions` slots hold targets of -100.
    order = torch.argsort(labelled.to(torch.int8), descending=True, stable=True)[:positions]
    logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[order]).float()
    return F.cross_entropy(logits, targets[order], ignore_index=-100, reduction="sum") / labelled.sum().clamp(min=1)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor]


class GraphedTrainingStep:
    """`Trainer.training_step` for one CUDA process without gradient accumulation: forward and backward of
    `completion_loss` as a CUDA graph per length bucket, captured after that bucket's first (eager) step.

    `labelled_per_row` bounds the completion tokens of any row (the longest in the training set), so a
    batch's labelled positions always fit the `rows * labelled_per_row` slots the loss projects.
    """

    def __init__(self, model: Any, rows: int, labelled_per_row: int, autocast_dtype: torch.dtype | None,
                 longest: int | None = None, length_multiple: int = 32):
        self.model, self.rows, self.longest, self.length_multiple = model, rows, longest, length_multiple
        self.positions = rows * labelled_per_row
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[int, _Captured] = {}
        self.captures_failed = 0

    def __call__(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        rows, length = input_ids.shape
        if rows > self.rows:
            raise ValueError(f"a batch of {rows} rows for a step graphed at {self.rows}")
        padded = -(-length // self.length_multiple) * self.length_multiple
        if self.longest is not None and length <= self.longest:
            padded = min(padded, self.longest)
        captured = self.graphs.get(padded)
        if captured is None:
            return self._first_step(padded, input_ids, labels)
        captured.input_ids[:rows, :length].copy_(input_ids, non_blocking=True)
        captured.labels.fill_(-100)
        captured.labels[:rows, :length].copy_(labels, non_blocking=True)
        captured.graph.replay()
        for param, grad in zip(self.params, captured.grads):
            param.grad = grad  # the Trainer sets gradients to None after each optimizer step
        return captured.loss.detach().clone()

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # cache_enabled=False: autocast's cast cache must not outlive a graph capture
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            return completion_loss(self.model, input_ids, labels, self.positions)

    def _first_step(self, length: int, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The bucket's first batch, run eagerly on a side stream (the warm-up a capture needs), then its graph."""
        device = input_ids.device
        for param in self.params:
            param.grad = None  # the eager backward would add to another bucket's graph-held gradients
        static_ids = torch.full((self.rows, length), 0, dtype=input_ids.dtype, device=device)
        static_labels = torch.full((self.rows, length), -100, dtype=labels.dtype, device=device)
        static_ids[: input_ids.shape[0], : input_ids.shape[1]].copy_(input_ids)
        static_labels[: labels.shape[0], : labels.shape[1]].copy_(labels)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            loss = self._loss(static_ids, static_labels)
            loss.backward()
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        eager_grads = [p.grad for p in self.params]
        for tensor in [loss] + [g for g in eager_grads if g is not None]:
            tensor.record_stream(main)  # made on the side stream, used on this one: not reused before it has
        if self.captures_failed:
            return loss.detach()
        try:
            self.graphs[length] = self._capture(static_ids, static_labels)
        except RuntimeError:
            # An operation that cannot be captured (a host sync in the model's code): train on without graphs.
            self.captures_failed += 1
            self.graphs.clear()
        for param, grad in zip(self.params, eager_grads):
            param.grad = grad
        return loss.detach()

    def _capture(self, input_ids: torch.Tensor, labels: torch.Tensor) -> _Captured:
        for param in self.params:
            param.grad = None  # so the captured backward writes gradients into the graph's own memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._loss(input_ids, labels)
            loss.backward()
        return _Captured(graph, input_ids, labels, loss, [p.grad for p in self.params])
