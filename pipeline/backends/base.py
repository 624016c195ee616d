"""The one small interface every backend implements, and the call record they all return.

A backend answers a list of prompts (one timed pass) and reports each call as its caller
saw it. Everything else (warm-up, repeated passes, statistics, pricing) is the same for
every backend and lives in `pipeline.measure`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pipeline.task.prompts import Prompt


@dataclass
class Call:
    """One model call as a caller sees it.

    `error` is set when the call failed for good (after the retry budget): its output is
    empty and it is scored as wrong, never dropped. `cached_tokens` is what the server
    reported as read from its prompt cache (0 where it reports nothing).
    """

    output: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cached_tokens: int = 0
    error: str | None = None
    retries: int = 0
    ttft_ms: float | None = None


OnCalls = Callable[[list[Call]], None]


class Backend(Protocol):
    """Answers prompts. `kind` is the MLflow `backend` tag; `tokens_estimated` is true where
    token counts come from a local tokenizer rather than the server's own `usage`.

    Besides answering, a backend class says what the run needs to know of the model config it serves
    before building one (`backends.registry` finds the class from the config's `backend:` key)."""

    kind: str
    tokens_estimated: bool
    # How many calls warm-up runs at least: a local batch (allocations at the timed size); an API client, 1.
    calls_in_flight: int
    # Calls retried over all passes so far; None where the backend never retries (a local model).
    retries_total: int | None

    def run(self, prompts: list[Prompt], on_calls: OnCalls | None = None,
            max_new_tokens: int | None = None) -> list[Call]:
        """One pass: a Call per prompt, in prompt order. `on_calls` sees finished calls as they
        come, in prompt order (a backend that finishes calls out of order holds them back).
        `max_new_tokens`: this pass's longest answer, where it differs from the backend's own (a served
        request's `max_tokens`); a backend constrained to a label set keeps its own."""
        ...

    def uncached(self) -> Backend | None:
        """The same backend without its prefix cache, to time what the cache saves; None where it has none."""
        ...

    def at_batch_size(self, batch_size: int) -> Backend | None:
        """The same backend answering `batch_size` calls at a time; None where the batch is not the client's
        to choose (an API's server batches as it likes)."""
        ...

    def close(self) -> None:
        """Release connections or memory; the backend is not used again."""
        ...

    @staticmethod
    def preflight(models: dict[str, Any]) -> None:
        """Probe each model (key -> config) once before any data loads; raise one UserError line where one cannot
        answer. A model in this process has nothing to probe."""
        ...

    @staticmethod
    def check_model(model: Any, where: str) -> None:
        """Fail in one line, before any work, where the model config cannot be served (a missing key or source)."""
        ...

    @staticmethod
    def model_name(model: Any) -> str:
        """What reports call the model."""
        ...

    @staticmethod
    def model_identity(model: Any) -> dict[str, Any]:
        """What a stored measurement depends on, model-wise (never a secret)."""
        ...

    @staticmethod
    def tokenizer_source(model: Any, fallback: Any) -> Any:
        """The local model config whose tokenizer renders and counts this model's prompts: its own, or for a server
        without one configured, `fallback` (the top-level model: counts then are an estimate)."""
        ...
