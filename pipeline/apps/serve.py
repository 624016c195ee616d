"""`roi serve`: an OpenAI-compatible API (FastAPI + uvicorn) for a local model, with an optional LoRA
adapter merged into its weights. Routes: GET /health, /v1/models, /v1/stats; POST /v1/chat/completions,
/v1/completions. Greedy decoding only; vLLM's `guided_choice: [labels]` and `structured_outputs:
{"choice": [labels]}` constrain each answer to one of the labels, and `response_format: {"type": "json_schema",
"json_schema": {"schema": ...}}` to JSON that validates against the schema.

Batching: requests that arrive within `batch_window_ms` of the first waiting one, up to `max_batch`,
run as one `LocalBackend.run` call on the single generation thread, grouped by constraint (label set or
schema), prompt kind (chat or text) and max_tokens, so each answer is the one the request gets alone. Each answer has the
header `x-roi-batch-size` (rows of the generation call that answered it); GET /v1/stats counts
`requests`, generation calls (`batches`) and the `rows` they ran. One `LocalBackend` per constraint
and prompt kind stays alive, so its prefix cache serves the system prompt requests share.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from pipeline.backends.base import Call
from pipeline.backends.local import LocalBackend, LocalSettings
from pipeline.backends.decoding.packed_weights import PackedWeights
from pipeline.errors import UserError
from pipeline.experiment.config import ConfigError, ModelConfig
from pipeline.models.loading import ModelError, load_model, load_tokenizer, resolve_source
from pipeline.models.dtype import pick_dtype
from pipeline.task.prompts import Prompt

DEFAULT_MAX_TOKENS, MAX_TOKENS_CAP = 16, 512
MAX_BACKENDS = 8  # label sets and schemas come from clients: bound how many prefix caches stay alive


class _Strict(BaseModel):
    # Unknown fields (top_p, seed, user, ...) are ignored; known ones must have their JSON types.
    model_config = ConfigDict(extra="allow", strict=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class _Generation(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str = Field(min_length=1)


class APIError(HTTPException):
    """A request the server refuses, with OpenAI's error `code`."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(status, message)
        self.code = code


@dataclass
class Result:
    call: Call
    rows: int  # rows of the generation call that answered this request
    finish_reason: str


@dataclass(frozen=True)
class Constraint:
    """What a request restricts its answer to: one of `labels`, or JSON valid against `schema` (its JSON text,
    so that requests with the same schema share a backend); neither: free decoding."""

    labels: tuple[str, ...] | None = None
    schema: str | None = None


@dataclass
class _Job:
    prompt: Prompt
    constraint: Constraint
    max_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Queues requests from the event loop; the main thread answers them in batches (torch is never
    called concurrently). Generation runs on the main thread because there it was measured faster than on
    a thread started later (bench/serve.py); uvicorn's event loop, which only queues and answers, gets the
    background thread."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int, window_s: float):
        self.model, self.tokenizer, self.max_batch, self.window_s = model, tokenizer, max_batch, window_s
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.backends: dict[tuple, LocalBackend] = {}
        self.packed = PackedWeights()  # one packed copy of the weights for every constraint's backend
        self.stats = {"requests": 0, "batches": 0, "rows": 0}

    async def submit(self, prompt: Prompt, constraint: Constraint, max_tokens: int) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.stats["requests"] += 1
        self.queue.put(_Job(prompt, constraint, max_tokens, future, loop))
        return await future

    def stop(self) -> None:
        self.queue.put(None)

    def _collect(self) -> list[_Job] | None:
        """The first waiting job and what arrives within the window after it (None: stop)."""
        first = self.queue.get()
        batch, deadline = [first], (first.arrived + self.window_s if first else 0)
        while first is not None and len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the window (the thread was busy), take only what already waits
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # answer this batch, then stop
                break
            batch.append(job)
        return batch if first is not None else None

    def run_forever(self) -> None:
        """Answer batches until `stop` (call it on the main thread)."""
        while (batch := self._collect()) is not None:
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                # A label constraint fixes the answer length, so max_tokens does not split those.
                labels = job.constraint.labels
                key = (job.constraint, job.prompt.messages is not None, 0 if labels else job.max_tokens)
                groups.setdefault(key, []).append(job)
            for (constraint, chat, max_tokens), jobs in groups.items():
                try:
                    results: list[Any] = self._run(constraint, chat, max_tokens, [job.prompt for job in jobs])
                except UserError as exc:  # a schema the decoder cannot use: the request's fault
                    results = [APIError(400, str(exc))] * len(jobs)
                except Exception as exc:  # noqa: BLE001 - the waiting requests get the failure; the thread lives on
                    results = [exc] * len(jobs)
                for job, result in zip(jobs, results):
                    job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _run(self, constraint: Constraint, chat: bool, max_tokens: int, prompts: list[Prompt]) -> list[Result]:
        key = (constraint, chat)
        labels = constraint.labels
        if key not in self.backends:
            settings = LocalSettings(batch_size=self.max_batch, max_new_tokens=DEFAULT_MAX_TOKENS,
                                     labels=list(labels) if labels else None,
                                     schema=json.loads(constraint.schema) if constraint.schema else None,
                                     auto_prefix=True, remember_prompts=False)
            backend = LocalBackend(self.model, self.tokenizer, settings, packed=self.packed)  # a bad schema fails here
            if len(self.backends) >= MAX_BACKENDS:  # the oldest constrained one goes (free ones are at most two)
                self.backends.pop(next(k for k in self.backends if k[0] != Constraint()))
            self.backends[key] = backend
        backend = self.backends[key]
        calls = backend.run(prompts, max_new_tokens=max_tokens or None)
        self.stats["batches"] += 1
        self.stats["rows"] += len(prompts)
        return [Result(c, len(prompts), self._finish_reason(c, labels, max_tokens)) for c in calls]

    def _finish_reason(self, call: Call, labels: Any, max_tokens: int) -> str:
        """'length' when cut at max_tokens. A Call counts its stop token without saying whether it
        has one, so a full-length answer is re-encoded: one token fewer means a stop token ended it."""
        if labels or call.completion_tokens < max_tokens:
            return "stop"
        text_tokens = len(self.tokenizer(call.output, add_special_tokens=False)["input_ids"])
        return "stop" if text_tokens < call.completion_tokens else "length"


def _settle(future: asyncio.Future, result: Any) -> None:
    if not future.done():  # the client may have gone away
        (future.set_exception if isinstance(result, BaseException) else future.set_result)(result)


def _check(req: _Generation, name: str) -> tuple[Constraint, int]:
    """The constraint (label set or JSON Schema) and max_tokens of a request; refuses what this server cannot
    honour."""
    if req.model is not None and req.model != name:
        raise APIError(404, f"model {req.model!r} is not served here (this server serves {name!r})", "model_not_found")
    refusals = {"only greedy decoding is served: set temperature to 0 or leave it out": req.temperature,
                "only n=1 is served": req.n != 1, "stop sequences are not supported": req.stop,
                "response_format: only text and json_schema are supported":
                    (req.response_format or {}).get("type", "text") not in ("text", "json_schema")}
    for message, refused in refusals.items():
        if refused:
            raise APIError(400, message)
    labels = req.guided_choice
    if req.structured_outputs is not None:
        if set(req.structured_outputs) != {"choice"}:
            raise APIError(400, "structured_outputs: only 'choice' is supported")
        labels = req.structured_outputs["choice"]
    if labels is not None and not (isinstance(labels, list) and labels
                                   and all(isinstance(x, str) and x for x in labels)):
        raise APIError(400, "guided_choice: expected a non-empty list of non-empty strings")
    schema = _schema_of(req.response_format)
    if labels and schema:
        raise APIError(400, "constrain an answer to a label set or to a JSON schema, not both")
    # A JSON answer closes itself validly within its limit: without one it gets the cap, not a sentence's room.
    max_tokens = req.max_completion_tokens or req.max_tokens or (MAX_TOKENS_CAP if schema else DEFAULT_MAX_TOKENS)
    return Constraint(tuple(labels) if labels else None, schema), min(max_tokens, MAX_TOKENS_CAP)


def _schema_of(response_format: dict[str, Any] | None) -> str | None:
    """The JSON Schema a `response_format: {type: json_schema, json_schema: {schema}}` asks for, as JSON text."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema: expected a JSON Schema object")
    return json.dumps(schema)  # as sent: the order of `properties` is the order the answer writes its keys in


def _answer(req: _Generation, name: str, result: Result, chat: bool) -> Any:
    """The response in OpenAI's format: one JSON object, or SSE chunks ending in `data: [DONE]`."""
    call, finish, headers = result.call, result.finish_reason, {"x-roi-batch-size": str(result.rows)}
    usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
             "total_tokens": call.prompt_tokens + call.completion_tokens,
             "prompt_tokens_details": {"cached_tokens": call.cached_tokens}}
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": name, "object": "chat.completion" if chat else "text_completion"}
    if not req.stream:
        choice = {"message": {"role": "assistant", "content": call.output}} if chat else {"text": call.output}
        return JSONResponse({**base, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
                             "usage": usage}, headers=headers)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    base["object"] += ".chunk" if chat else ""
    pieces = ([({"delta": {"role": "assistant", "content": ""}}, None), ({"delta": {"content": call.output}}, None),
               ({"delta": {}}, finish)] if chat else [({"text": call.output}, None), ({"text": ""}, finish)])
    events = [{**base, "choices": [{"index": 0, **fields, "logprobs": None, "finish_reason": reason}],
               **({"usage": None} if include_usage else {})} for fields, reason in pieces]
    events += [{**base, "choices": [], "usage": usage}] if include_usage else []
    lines = [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(lines), media_type="text/event-stream", headers=headers)


def _error(status: int, message: str, code: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    """Every refusal is OpenAI's `{"error": {...}}` object; nothing answers with a traceback."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}", "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404 and not isinstance(exc, APIError):
            return _error(404, f"unknown route: {request.method} {request.url.path}", "not_found")
        return _error(exc.status_code, str(exc.detail), getattr(exc, "code", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {_first_line(exc)}", None, "server_error")


def create_app(batcher: Batcher, name: str) -> FastAPI:
    """The FastAPI app serving the batcher's model as `name`."""
    app = FastAPI(title="roi serve", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/stats")(lambda: dict(batcher.stats))
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                                "owned_by": "roi"}]})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        constraint, max_tokens = _check(req, name)
        prompt = Prompt(messages=tuple((m.role, m.content) for m in req.messages))
        return _answer(req, name, await batcher.submit(prompt, constraint, max_tokens), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        constraint, max_tokens = _check(req, name)
        return _answer(req, name, await batcher.submit(Prompt(text=req.prompt), constraint, max_tokens),
                       chat=False)

    return app


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def load_served_model(model: str, gguf_file: str | None, dtype: str, adapter: str | None) -> tuple[Any, Any, str]:
    """Model, tokenizer and served name; the adapter, if any, merged into the weights."""
    from pipeline.training.lora import load_adapter
    from pipeline.tracking.mlflow_store import download_adapter

    source = resolve_source(ModelConfig(source=model, gguf_file=gguf_file, dtype=dtype))
    name = source.display_name.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="roi-serve-") as tmp:
        adapter_dir = download_adapter(adapter, Path(tmp)) if adapter else None  # fail before the slow model load
        tokenizer, lm = load_tokenizer(source), load_model(source, pick_dtype(dtype))
        if adapter_dir is not None:
            try:
                lm = load_adapter(lm, adapter_dir).merge_and_unload().eval()
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken adapter file is still one line
                raise ModelError(f"--adapter {adapter}: cannot load it ({_first_line(exc)})") from None
            name += "+adapter"
    return lm, tokenizer, name


def _bind(host: str, port: int) -> socket.socket:
    """Bind ourselves, before the slow load, so a busy port is a one-line error at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


class _Server(uvicorn.Server):
    ready_line = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:  # listening now
            print(self.ready_line, flush=True)


def serve(model: str = "embedded", gguf_file: str | None = None, dtype: str = "auto", adapter: str | None = None,
          name: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
          batch_window_ms: float = 10) -> int:
    """`roi serve`: load, print `serving NAME on http://HOST:PORT/v1` once listening, serve until stopped."""
    if max_batch < 1 or batch_window_ms < 0 or not 0 <= port <= 65535:
        raise ConfigError("roi serve: --max-batch must be >= 1, --batch-window-ms >= 0, --port 0..65535")
    sock = _bind(host, port)
    lm, tokenizer, served = load_served_model(model, gguf_file, dtype, adapter)
    batcher = Batcher(lm, tokenizer, max_batch, batch_window_ms / 1000)
    server = _Server(uvicorn.Config(create_app(batcher, name or served), log_level="warning", access_log=False,
                                    lifespan="off"))
    shown = f"[{host}]" if ":" in host else host
    server.ready_line = f"serving {name or served} on http://{shown}:{sock.getsockname()[1]}/v1"

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            batcher.stop()  # the HTTP side ended (or failed to start): so does generation

    http = threading.Thread(target=serve_http, name="roi-http", daemon=True)
    http.start()
    try:
        batcher.run_forever()  # until Ctrl-C (KeyboardInterrupt) or the HTTP side ends
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0
