"""A backend for any OpenAI-compatible HTTP API (OpenAI, a gateway, vLLM, llama.cpp, `roi serve`).

Retries, backoff with jitter and `Retry-After` / `retry-after-ms` are the official SDK's own
(`max_retries`); this module bounds concurrency and rate, times each call as the client sees it,
and turns every outcome, failures included, into one `Call` per prompt in prompt order.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any, Callable

import openai
from aiolimiter import AsyncLimiter

from pipeline.backends.base import Call, OnCalls
from pipeline.backends.preflight import check_api_key, probe_models
from pipeline.experiment.config import ModelConfig, OpenAIModelConfig
from pipeline.task.prompts import Prompt

# Servers that need no key still get one: the SDK refuses to start without any, and an explicit
# placeholder keeps it from silently sending the user's OPENAI_API_KEY to a third-party URL.
_NO_KEY = "not-needed"
_MAX_ERROR = 200


def _json_schema(labels: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
              "required": ["label"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The structured-output request for JSON that validates against `schema`, named after its title (a name
    the API accepts: letters, digits, `_` and `-`, at most 64), in strict mode's form (`strict_schema`)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(schema.get("title") or "")).strip("_")[:64] or "answer"
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": strict_schema(schema)}}


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as strict structured outputs require it: every object lists all its properties in `required`
    and allows no others. A property the schema left optional becomes nullable instead: null and an absent
    field score the same, so the answers it allows are the ones the schema allows."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if "properties" in schema:
        required = set(schema.get("required", []))
        out["properties"] = {name: strict_schema(prop) if name in required else _nullable(strict_schema(prop))
                             for name, prop in schema["properties"].items()}
        out["required"], out["additionalProperties"] = list(schema["properties"]), False
    return out


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    if "enum" in prop:
        return prop if None in prop["enum"] else {**prop, "enum": [*prop["enum"], None],
                                                   **({"type": _with_null(prop["type"])} if "type" in prop else {})}
    return {**prop, "type": _with_null(prop["type"])} if "type" in prop else prop


def _with_null(kind: str | list[str]) -> list[str]:
    kinds = [kind] if isinstance(kind, str) else list(kind)
    return kinds if "null" in kinds else [*kinds, "null"]


def _parse_label(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value["label"] if isinstance(value, dict) and isinstance(value.get("label"), str) else text


def _retries_of(exc: BaseException, default: int) -> int:
    """The SDK numbers each attempt in the `x-stainless-retry-count` header of the request it
    sends; an exception carries the last request, so this is exactly the retries it took."""
    try:  # httpx errors raise RuntimeError, not AttributeError, for a missing `request`
        return int(exc.request.headers["x-stainless-retry-count"])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no request to read: keep what is known
        return default


class OpenAIBackend:
    """Answers prompts through an OpenAI-compatible API: chats via chat completions, plain text
    via completions, greedy, at most `max_concurrency` in flight and `requests_per_minute`."""

    kind = "openai"

    @staticmethod
    def preflight(models: dict[str, OpenAIModelConfig]) -> None:
        probe_models(models)

    @staticmethod
    def check_model(model: OpenAIModelConfig, where: str) -> None:
        check_api_key(model, where)

    @staticmethod
    def model_name(model: OpenAIModelConfig) -> str:
        return model.model

    @staticmethod
    def model_identity(model: OpenAIModelConfig) -> dict[str, Any]:
        return {"backend": "openai", "base_url": model.base_url, "model": model.model, "stream": model.stream,
                "constrained_via": model.constrained_via}

    @staticmethod
    def tokenizer_source(model: OpenAIModelConfig, fallback: ModelConfig) -> ModelConfig:
        return ModelConfig(source=model.tokenizer) if model.tokenizer else fallback

    @classmethod
    def for_eval(cls, model: OpenAIModelConfig, max_new_tokens: int, labels: list[str] | None,
                 tokenizer: Any | None, schema: dict[str, Any] | None = None) -> "OpenAIBackend":
        """The backend an arm is measured with: constrained to `labels` (or to JSON of `schema`) unless the model
        says not to ask the server (`constrained_via: none`), counting tokens with `tokenizer` where the server
        reports no usage."""
        counting: dict[str, Any] = {}
        if tokenizer is not None:
            counting = {"count_tokens": lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                        "chat_to_text": lambda messages: tokenizer.apply_chat_template(
                            messages, tokenize=False, add_generation_prompt=True)}
        asked = model.constrained_via != "none"
        return cls(model, max_new_tokens, labels if asked else None, schema=schema if asked else None, **counting)

    def __init__(self, spec: OpenAIModelConfig, max_new_tokens: int, labels: list[str] | None = None,
                 count_tokens: Callable[[str], int] | None = None,
                 chat_to_text: Callable[[list[dict]], str] | None = None, schema: dict[str, Any] | None = None):
        """`schema`: every answer is asked for as JSON that validates against it (`response_format` json_schema,
        strict, whatever `constrained_via` names but none); not with `labels`."""
        if labels and schema:
            raise ValueError("OpenAIBackend: constrain answers to labels or to a schema, not both")
        check_api_key(spec, "model")
        self.spec = spec
        # Warm-up opens the connection; a full round of concurrent calls would only cost money.
        self.calls_in_flight = 1
        self.max_new_tokens = max_new_tokens
        self.labels = list(labels) if labels else None
        self.schema = schema
        self.count_tokens = count_tokens
        self.chat_to_text = chat_to_text
        self.tokens_estimated = False
        self.retries_total = 0
        self._key = os.environ[spec.api_key_env] if spec.api_key_env else None

    def run(self, prompts: list[Prompt], on_calls: OnCalls | None = None,
            max_new_tokens: int | None = None) -> list[Call]:
        """One pass: a Call per prompt, in prompt order; failures are Calls with `error` set."""
        if max_new_tokens is not None and max_new_tokens != self.max_new_tokens:
            longer = OpenAIBackend(self.spec, max_new_tokens, self.labels, self.count_tokens, self.chat_to_text,
                                   self.schema)
            calls = longer.run(prompts, on_calls)
            self.retries_total += longer.retries_total
            return calls
        calls = asyncio.run(self._pass(list(prompts), on_calls))
        self.retries_total += sum(c.retries for c in calls)
        return calls

    def uncached(self) -> None:
        """None: a server's prompt cache is its own (its hits are reported as `cached_tokens`)."""
        return None

    def at_batch_size(self, batch_size: int) -> None:
        """None: the server batches concurrent requests as it likes."""
        return None

    def close(self) -> None:
        """Nothing to release: each pass opens and closes its own client inside its event loop."""

    async def _pass(self, prompts: list[Prompt], on_calls: OnCalls | None) -> list[Call]:
        spec = self.spec
        semaphore = asyncio.Semaphore(spec.max_concurrency)
        # One request per 60/rpm seconds, no burst: a bucket of `rpm` would fire a whole
        # minute's budget at once, which servers enforcing the limit per second reject.
        limiter = AsyncLimiter(1, 60.0 / spec.requests_per_minute) if spec.requests_per_minute else None
        client = openai.AsyncOpenAI(base_url=spec.base_url, api_key=self._key or _NO_KEY,
                                    timeout=spec.timeout_s, max_retries=spec.max_retries)
        calls: list[Call | None] = [None] * len(prompts)
        emitted = 0

        async def one(i: int) -> None:
            nonlocal emitted
            async with semaphore:
                if limiter is not None:
                    await limiter.acquire()
                calls[i] = await self._call(client, prompts[i])
            # Hand on the longest finished run in prompt order; later calls wait for earlier ones.
            start = emitted
            while emitted < len(calls) and calls[emitted] is not None:
                emitted += 1
            if on_calls is not None and emitted > start:
                on_calls(calls[start:emitted])

        try:
            await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await client.close()
        return calls  # type: ignore[return-value]

    def _request(self, client: Any, prompt: Prompt) -> tuple[Callable, dict[str, Any]]:
        """The SDK method and its arguments for one prompt."""
        kwargs: dict[str, Any] = {"model": self.spec.model, "temperature": 0, "max_tokens": self.max_new_tokens}
        extra: dict[str, Any] = {}
        if self.labels and self.spec.constrained_via == "guided_choice":
            # vLLM >= 0.12 removed the old top-level `guided_choice` (ignored silently if sent).
            extra["structured_outputs"] = {"choice": self.labels}
        response_format = None
        if self.labels and self.spec.constrained_via == "json_schema":
            response_format = _json_schema(self.labels)
        if self.schema is not None and self.spec.constrained_via != "none":
            response_format = _schema_format(self.schema)
        if response_format is not None:
            if prompt.messages is not None:
                kwargs["response_format"] = response_format
            else:  # the SDK's completions method has no such parameter; vLLM reads it from the body
                extra["response_format"] = response_format
        if extra:
            kwargs["extra_body"] = extra
        if self.spec.stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        if prompt.messages is not None:
            return client.chat.completions.with_raw_response.create, {**kwargs, "messages": prompt.chat()}
        return client.completions.with_raw_response.create, {**kwargs, "prompt": prompt.text or ""}

    async def _call(self, client: Any, prompt: Prompt) -> Call:
        create, kwargs = self._request(client, prompt)
        chat = prompt.messages is not None
        retries, ttft_ms = 0, None
        start = time.perf_counter()
        try:
            raw = await create(**kwargs)
            retries = raw.retries_taken  # set by the SDK's retry loop on raw responses
            if self.spec.stream:
                text, usage, ttft_ms = await self._read_stream(raw.parse(), chat, start)
            else:
                text, usage = self._read(raw.parse(), chat)
        except Exception as exc:  # noqa: BLE001 - any failure is a row scored wrong, never a crashed pass
            latency_ms = (time.perf_counter() - start) * 1000
            return Call(output="", prompt_tokens=self._count(self._prompt_text(prompt)), completion_tokens=0,
                        latency_ms=latency_ms, error=self._error_text(exc),
                        retries=_retries_of(exc, retries))
        latency_ms = (time.perf_counter() - start) * 1000
        if usage is None:
            self.tokens_estimated = True
            prompt_tokens, completion_tokens, cached = self._count(self._prompt_text(prompt)), self._count(text), 0
        else:
            details = getattr(usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", None) if details is not None else None) or 0
            prompt_tokens, completion_tokens = usage.prompt_tokens or 0, usage.completion_tokens or 0
        if self.labels and self.spec.constrained_via == "json_schema":
            text = _parse_label(text)
        return Call(output=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    latency_ms=latency_ms, cached_tokens=cached, retries=retries, ttft_ms=ttft_ms)

    @staticmethod
    def _read(response: Any, chat: bool) -> tuple[str, Any]:
        if not response.choices:
            raise ValueError("the response has no choices")
        choice = response.choices[0]
        text = choice.message.content if chat else choice.text
        return text or "", getattr(response, "usage", None)

    @staticmethod
    async def _read_stream(stream: Any, chat: bool, start: float) -> tuple[str, Any, float | None]:
        parts: list[str] = []
        usage, ttft_ms = None, None
        try:
            async for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage  # the last chunk, when include_usage
                for choice in chunk.choices or ():
                    piece = choice.delta.content if chat else choice.text
                    if piece:
                        if ttft_ms is None:
                            ttft_ms = (time.perf_counter() - start) * 1000
                        parts.append(piece)
        finally:
            await stream.close()
        return "".join(parts), usage, ttft_ms

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.messages is None:
            return prompt.text or ""
        if self.chat_to_text is not None:
            return self.chat_to_text(prompt.chat())
        return "\n".join(content for _, content in prompt.messages)

    def _count(self, text: str) -> int:
        return self.count_tokens(text) if self.count_tokens is not None and text else 0

    def _error_text(self, exc: BaseException) -> str:
        """`Type: message` on one line, the cause of a connection error added, the key masked."""
        message = getattr(exc, "message", None) or str(exc) or "no message"
        cause = exc.__cause__
        if isinstance(exc, openai.APIConnectionError) and cause is not None:  # the SDK's text is generic
            message += f" ({type(cause).__name__}: {cause})" if str(cause) else f" ({type(cause).__name__})"
        message = " ".join(str(message).split())
        if self._key:
            message = message.replace(self._key, "***")  # before truncating, so no prefix of it survives
        return f"{type(exc).__name__}: {message[:_MAX_ERROR]}"
