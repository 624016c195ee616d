"""The local backend: a model in this process, batched greedy decoding with a prefix KV cache.

Prompt arms and fine-tuned arms differ only in the text they send and in the weights
(base vs base + merged adapter); both go through `LocalBackend`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.backends.base import Call, OnCalls
from pipeline.backends.decoding.constraint import LabelConstraint, TokenConstraint
from pipeline.backends.decoding.greedy import Answer, RowCaches, greedy_answers
from pipeline.backends.decoding.json_schema import JsonSchemaConstraint
from pipeline.backends.decoding.packed_weights import PackedWeights, packing_supported
from pipeline.experiment.config import ModelConfig
from pipeline.models.loading import ModelError, resolve_source
from pipeline.models.dtype import pick_dtype
from pipeline.task.prompts import Prompt, static_prefix


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the model's end-of-turn ids and the tokenizer's eos."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def shared_prefix_length(prefix_ids: list[int], encoded: list[list[int]]) -> int:
    """Tokens every prompt shares with the static prefix (tokens can merge across the boundary),
    leaving at least one token per prompt to run."""
    length = len(prefix_ids)
    for ids in encoded:
        n = 0
        limit = min(length, len(ids) - 1)
        while n < limit and ids[n] == prefix_ids[n]:
            n += 1
        length = n
    return max(length, 0)


class PrefixCache:
    """The KV cache of a shared prompt prefix, computed once at batch 1.

    With `shared`, batches attend to it through shared-prefix attention (`backends.shared_prefix`): it is
    never copied per row. Otherwise (the GPU default, models whose attention it does not compute, and the
    benchmark's reference) each new row starts from a copy.
    """

    def __init__(self, model: Any, prefix_ids: list[int], shared: bool = True):
        from transformers import DynamicCache

        from pipeline.backends.decoding.shared_prefix import SharedPrefixCache

        self.length, self.config = len(prefix_ids), model.config
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([prefix_ids], device=model.device), cache=self.cache,
                  use_cache=True)
        if self.cache.get_seq_length() != self.length:
            # transformers before 5.24 ignored `cache=` and left it empty: every call would then crash.
            raise ModelError(f"the prefix KV cache holds {self.cache.get_seq_length()} of {self.length} tokens: "
                               "this transformers version does not fill a cache passed as `cache=` (need >= 5.24)")
        self.shared = SharedPrefixCache(self.cache) if shared else None

    @contextmanager
    def rows(self, model: Any):
        """Where each new row's cache starts, on this prefix, and the attention it needs, for one pass."""
        if self.shared is None:
            yield RowCaches(self._copied, self.length, held_per_row=self.length)
            return
        from pipeline.backends.decoding.shared_prefix import SharedPrefixCache, attending_shared_prefix

        with attending_shared_prefix(model, self.shared):
            yield RowCaches(lambda _n: SharedPrefixCache(self.cache), self.length, held_per_row=0)

    def _copied(self, rows: int) -> Any:
        """A cache for `rows` new rows, each with its own copy of the prefix. The layers are copied whole, so
        what a layer counts besides its keys (a sliding window's length seen) carries over."""
        import copy

        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            row_layer = copy.copy(layer)
            row_layer.keys = layer.keys.expand(rows, -1, -1, -1).contiguous()
            row_layer.values = layer.values.expand(rows, -1, -1, -1).contiguous()
            cache.layers.append(row_layer)
        return cache


@dataclass
class LocalSettings:
    """How a local arm generates: batch size, answer length, prefix cache and constraint (labels or a schema)."""

    batch_size: int
    max_new_tokens: int
    prefix_cache: bool = True
    labels: list[str] | None = None  # constrained decoding: every answer is one of these
    # Constrained decoding (not with labels): every answer is compact JSON that validates against this JSON
    # Schema, closed in time to fit max_new_tokens (backends.decoding.json_schema).
    schema: dict[str, Any] | None = None
    min_prefix_tokens: int = 16
    # Attend to one batch-1 copy of the prefix (shared-prefix attention) rather than a copy per row.
    # None: per device, as bench/prompt_arm.py measured (README, "How each number is measured"): shared on CPU,
    # where copying the prefix per row costs more than it saves; copied on a GPU, where the copy is cheap and
    # the extra small kernels are not.
    shared_prefix: bool | None = None
    # Without a template's static prefix (a server sees only requests), cache what a pass's prompts share.
    auto_prefix: bool = False
    # Keep each prompt's token ids for the next pass (an eval set repeats; a server's requests do not).
    remember_prompts: bool = True
    # Decode in fixed waves over a static cache, each step a CUDA graph replay (backends.decoding.static_cache),
    # rather than with rows leaving and joining. None: on CUDA, where a small model's step launched op by op is
    # bound by the host (bench/gpu.py); the graph is captured only on CUDA.
    static_decoding: bool | None = None
    # On CPU, fp32 and bf16 linear layers multiply by copies of their weights packed once in oneDNN's layout (bf16:
    # the same bits; fp32: sums in another order), and torchao int8 ones, at a few rows, by their int8 weight
    # directly (backends.decoding.packed_weights). False: each layer's own forward (the benchmark's reference).
    packed_weights: bool = True
    # Prompts join by length within windows of this many (None: decoding's WINDOW_BATCHES batches); answers come
    # back in prompt order window by window, so a sequential evaluation sets its check interval here.
    window_rows: int | None = None


class LocalBackend:
    """Answers prompts with a model in this process.

    With a prefix shared by all prompts (system text, label list, few-shot examples), its KV
    cache is computed once and each call runs only its own suffix. With `labels`, every
    answer is one of them; with `schema`, every answer is JSON that validates against it. Up to
    `batch_size` prompts are answered together; a row leaves when it has answered and the next
    prompts join (`backends.decoding`). Each call's latency runs from the moment it joined to the
    step that gave its last token: what its caller waits when answers are returned as they finish.
    """

    kind = "local"
    tokens_estimated = False
    retries_total = None  # a local model call is not retried

    @staticmethod
    def preflight(models: dict[str, ModelConfig]) -> None:
        """Nothing to probe: `check_model` finds the weights."""

    @staticmethod
    def check_model(model: ModelConfig, where: str) -> None:
        resolve_source(model)

    @staticmethod
    def model_name(model: ModelConfig) -> str:
        return resolve_source(model).display_name

    @staticmethod
    def model_identity(model: ModelConfig) -> dict[str, Any]:
        source = resolve_source(model)
        return {"backend": "local", "model": source.folder if model.source != "embedded" else "embedded",
                "gguf": source.gguf_file, "dtype": str(pick_dtype(model.dtype))}

    @staticmethod
    def tokenizer_source(model: ModelConfig, fallback: ModelConfig) -> ModelConfig:
        return model

    def __init__(self, model: Any, tokenizer: Any, settings: LocalSettings, prefix_probe: Prompt | None = None,
                 packed: PackedWeights | None = None):
        """`packed`: the packed weights of backends on the same model (a server's), to share; else its own."""
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        if settings.packed_weights and packing_supported(model):
            self.packed: PackedWeights | None = packed if packed is not None else PackedWeights()
        else:
            self.packed = None
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.constraint = _constraint(tokenizer, settings, self.stop_ids)
        self.max_new_tokens = self._answer_tokens(settings.max_new_tokens)
        self.prefix = static_prefix(prefix_probe, tokenizer) if prefix_probe and settings.prefix_cache else ""
        self._encoded: dict[Prompt, list[int]] = {}
        self._cache: PrefixCache | None = None
        self._cache_for: tuple[int, ...] | None = None
        self._static: dict[int, Any] = {}  # batch size -> StaticDecoder (its CUDA graph outlives a pass)

    @property
    def calls_in_flight(self) -> int:
        return self.settings.batch_size

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, as the model sees them (special tokens come from the chat template)."""
        ids = self._encoded.get(prompt)
        if ids is None:
            ids = self.tokenizer(prompt.to_string(self.tokenizer), add_special_tokens=False)["input_ids"]
            if self.settings.remember_prompts:
                self._encoded[prompt] = ids
        return ids

    @property
    def prefix_tokens(self) -> int:
        """Tokens served from the prefix cache on each call (0 without one)."""
        return self._cache.length if self._cache else 0

    def run(self, prompts: list[Prompt], on_calls: OnCalls | None = None,
            max_new_tokens: int | None = None) -> list[Call]:
        encoded = [self.encode(p) for p in prompts]
        with self.packed.applied(self.model) if self.packed is not None else nullcontext():
            return self._run(encoded, on_calls, max_new_tokens)

    def _run(self, encoded: list[list[int]], on_calls: OnCalls | None, max_new_tokens: int | None) -> list[Call]:
        cache = self._prefix_cache(encoded)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else self._answer_tokens(max_new_tokens)
        shared = cache.length if cache else 0
        calls: list[Call] = []

        def answered(start: int, answers: list[Answer]) -> None:
            done = [Call(self.tokenizer.decode(a.tokens, skip_special_tokens=True), len(encoded[start + i]),
                         len(a.tokens), (a.finished_at - a.admitted_at) * 1000, cached_tokens=shared)
                    for i, a in enumerate(answers)]
            calls.extend(done)
            if on_calls:
                on_calls(done)

        suffixes = [ids[shared:] for ids in encoded]
        decoder = self._static_decoder(cache, suffixes, max_new_tokens)
        if decoder is not None:
            from pipeline.backends.decoding.static_cache import greedy_answers_static

            greedy_answers_static(decoder, suffixes, max_new_tokens, self.stop_ids, answered,
                                  self.settings.window_rows)
            return calls
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        with cache.rows(self.model) if cache else nullcontext() as caches:
            greedy_answers(self.model, suffixes, max_new_tokens, self.stop_ids, self.settings.batch_size, pad, caches,
                           self.constraint, answered, self.settings.window_rows)
        return calls

    def _answer_tokens(self, max_new_tokens: int) -> int:
        """What an answer may take: `max_new_tokens`, or what the constraint fixes (a label's longest + 1)."""
        return self.constraint.answer_tokens(max_new_tokens) if self.constraint else max_new_tokens

    def _static_decoder(self, cache: PrefixCache | None, suffixes: list[list[int]], max_new_tokens: int) -> Any:
        """The static-cache decoder for this pass (kept for the next at the same batch size), or None where
        this backend decodes with continuous batching: off in the settings, or a model with sliding-window
        layers, whose static cache keeps only its window."""
        from pipeline.backends.decoding.static_cache import StaticDecoder, fits_static_cache

        static = self.settings.static_decoding
        if not (self.model.device.type == "cuda" if static is None else static):
            return None
        prefix_length = cache.length if cache else 0
        # Room for the longest prompt and answer, rounded up so that a slightly longer pass reuses the graph.
        length = -(-(prefix_length + max(map(len, suffixes)) + max_new_tokens + 1) // 64) * 64
        rows = self.settings.batch_size
        decoder = self._static.get(rows)
        if (decoder is None or decoder.length < length or decoder.prefix is not (cache.cache if cache else None)
                or decoder.constraint is not self.constraint):
            self._static.pop(rows, None)  # its cache and graph memory go before the new one's
            if not fits_static_cache(self.model):  # asked only when a decoder is to be built, not every pass
                return None
            decoder = StaticDecoder(self.model, rows, length, cache.cache if cache else None, prefix_length,
                                    self.constraint, graphs=self.model.device.type == "cuda")
            self._static[rows] = decoder
        return decoder

    def _prefix_cache(self, encoded: list[list[int]]) -> PrefixCache | None:
        """The cache of what these prompts share with the static prefix; built once, reused by later passes.

        In `auto_prefix` mode the prefix is what the prompts share with each other (and with the
        cached prefix, once there is one), so a server's stream of requests with one system
        prompt settles on caching exactly that.
        """
        if not encoded or not (self.prefix or self.settings.auto_prefix):
            return None
        cached = list(self._cache_for or ())
        if self.prefix:
            prefix_ids = self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]
        elif cached and all(len(ids) > len(cached) and ids[: len(cached)] == cached for ids in encoded):
            return self._cache
        else:
            prefix_ids = cached or encoded[0]
        shared = tuple(prefix_ids[: shared_prefix_length(prefix_ids, encoded)])
        if len(shared) < self.settings.min_prefix_tokens and not self.prefix and cached:
            # The system prompt changed: start again from what this batch shares.
            shared = tuple(encoded[0][: shared_prefix_length(encoded[0], encoded)])
        if len(shared) < self.settings.min_prefix_tokens:
            return None
        if shared != self._cache_for:
            from pipeline.backends.decoding.shared_prefix import fits

            use_shared = self.settings.shared_prefix
            if use_shared is None:
                use_shared = self.model.device.type == "cpu"
            use_shared = use_shared and fits(self.model.config)
            self._cache = PrefixCache(self.model, list(shared), shared=use_shared)
            self._cache_for = shared
        return self._cache

    def uncached(self) -> "LocalBackend | None":
        """The same model and settings without the prefix cache (None when there is no cache to compare)."""
        if not self.prefix:
            return None
        plain = LocalBackend(self.model, self.tokenizer, self.settings, packed=self.packed)
        plain._encoded = self._encoded
        return plain

    def at_batch_size(self, batch_size: int) -> "LocalBackend":
        """The same model, prefix cache and settings, answering up to `batch_size` prompts at a time."""
        import copy
        import dataclasses

        other = copy.copy(self)  # shares the encoded prompts and the prefix cache
        other.settings = dataclasses.replace(self.settings, batch_size=batch_size)
        return other

    def close(self) -> None:
        self._cache = None
        self._static.clear()
        self._encoded.clear()
        if self.packed is not None:
            self.packed.clear()  # the model's weights again, not twice


def _constraint(tokenizer: Any, settings: LocalSettings, stop_ids: list[int]) -> TokenConstraint | None:
    """The constraint `settings` asks for: a label of `labels`, JSON of `schema`, or none."""
    if settings.labels and settings.schema:
        raise ValueError("LocalSettings: constrain answers to labels or to a schema, not both")
    if settings.labels:
        return LabelConstraint(tokenizer, settings.labels, stop_ids)
    if settings.schema:
        return JsonSchemaConstraint(tokenizer, settings.schema, stop_ids)
    return None


def measure_local(model: Any, tokenizer: Any, prompts: list[Prompt | str], batch_size: int, max_new_tokens: int,
                  prefix_probe: Prompt | None = None, labels: list[str] | None = None, warmup: int = 0,
                  repeats: int = 1, on_calls: OnCalls | None = None, schema: dict[str, Any] | None = None):
    """Measure prompts (or already rendered strings) on a model in one call: the benches' and tests' entry.

    With `prefix_probe` (a renderer's `prefix_probe()`), the static prefix's KV cache is used;
    with `labels`, answers are constrained to them; with `schema`, to JSON that validates against it.
    """
    from pipeline.measure.timing import measure

    prompts = [p if isinstance(p, Prompt) else Prompt(text=p) for p in prompts]
    settings = LocalSettings(batch_size, max_new_tokens, prefix_cache=prefix_probe is not None, labels=labels,
                             schema=schema)
    backend = LocalBackend(model, tokenizer, settings, prefix_probe=prefix_probe)
    return measure(backend, prompts, warmup=warmup, repeats=repeats, on_calls=on_calls)
