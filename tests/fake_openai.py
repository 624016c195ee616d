"""A real local OpenAI-compatible HTTP server for tests, with deterministic, configurable faults.

    with FakeOpenAI(Faults(rate_429=0.15, always_fail={"bad input"})) as server:
        ... OpenAIModelConfig(backend="openai", base_url=server.base_url, model="fake") ...
        server.requests  # every request: path, headers (lower-cased names), JSON body, fault

It serves POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as SSE) and
GET /v1/models on 127.0.0.1; a model id it does not serve gets OpenAI's 404 `model_not_found`. The answer is the input (the last user message, or the prompt)
upper-cased; under vLLM's `structured_outputs.choice` or a `json_schema` response format it is
the first label named in the input (as `{"label": ...}` for the schema). A request's fault is
drawn from (seed, input, attempt), the attempt being the SDK's `x-stainless-retry-count`, so a
run is the same whatever order the client sends in.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Faults:
    """Shares of requests that fail, per attempt. Random faults only hit the first
    `fault_attempts` attempts, so a client with more retries than that always gets through;
    `always_fail` inputs get `fail_status` on every attempt and exhaust any retry budget."""

    seed: int = 0
    rate_429: float = 0.0       # 429 with `retry-after-ms` (the SDK waits that long)
    retry_after_ms: int = 5
    rate_5xx: float = 0.0       # 500 or 503, no Retry-After: the SDK's exponential backoff
    rate_drop: float = 0.0      # the connection closed without an answer
    rate_hang: float = 0.0      # answer only after `hang_s` (past the client's timeout)
    hang_s: float = 2.0
    rate_delay: float = 0.0     # answer after `delay_s` (any attempt, not a failure)
    delay_s: float = 0.05
    fault_attempts: int = 3
    always_fail: set[str] = field(default_factory=set)
    fail_status: int = 503


class FakeOpenAI:
    """The server; a context manager that runs it in a background thread."""

    def __init__(self, faults: Faults | None = None, *, usage: bool = True, api_key: str | None = None,
                 work_s: float = 0.0, stream_gap_s: float = 0.01, garbage_json: bool = False,
                 model: str = "fake", also_serves: tuple[str, ...] = (), models_route: bool = True,
                 answers: Callable[[str], str] | None = None):
        self.faults = faults or Faults()
        self.usage = usage                # False: responses carry no `usage`
        self.api_key = api_key            # set: any other bearer token gets a 401 that echoes it
        self.work_s = work_s              # time each answer takes (to observe concurrency)
        self.stream_gap_s = stream_gap_s  # between streamed chunks
        self.garbage_json = garbage_json  # json_schema answers that are not JSON
        self.model = model
        self.served = (model, *also_serves)  # other ids get a 404 `model_not_found`, as OpenAI answers
        self.models_route = models_route  # False: no GET /v1/models, as some gateways
        self.answers = answers  # set: the answer to each input (the last user message), scripted by the test
        self.gets: list[dict[str, Any]] = []  # GET requests: path, headers (lower-cased names)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def inputs(self) -> list[str]:
        return [r["input"] for r in self.requests if "input" in r]

    # --- answering -----------------------------------------------------------------------

    def fault(self, text: str, attempt: int) -> tuple[str | None, bool]:
        f = self.faults
        rng = random.Random(f"{f.seed}:{attempt}:{text}")
        r, delayed = rng.random(), rng.random() < f.rate_delay
        if text in f.always_fail:
            return "fail", delayed
        if attempt < f.fault_attempts:
            for name, rate in (("429", f.rate_429), ("5xx", f.rate_5xx), ("drop", f.rate_drop),
                               ("hang", f.rate_hang)):
                if r < rate:
                    return name, delayed
                r -= rate
        return None, delayed

    def answer(self, body: dict[str, Any], text: str) -> str:
        if self.answers is not None:
            return self.answers(text)
        choices = (body.get("structured_outputs") or {}).get("choice")
        schema = body.get("response_format") or {}
        if schema.get("type") == "json_schema":
            choices = schema["json_schema"]["schema"]["properties"]["label"]["enum"]
        if not choices:
            return text.upper()
        label = next((c for c in choices if c.lower() in text.lower()), choices[0])
        if schema.get("type") == "json_schema":
            return "not json {" if self.garbage_json else json.dumps({"label": label})
        return label

    def usage_of(self, body: dict[str, Any], answer: str) -> dict[str, Any]:
        prompt = " ".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
        n = len(prompt.split())
        return {"prompt_tokens": n, "completion_tokens": len(answer.split()), "total_tokens": n + len(answer.split()),
                "prompt_tokens_details": {"cached_tokens": n // 2}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 would refuse connections under 16-way concurrency
    fake: FakeOpenAI

    def handle_error(self, request, client_address):  # dropped and abandoned connections are the point
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _refuse_key(self, fake: FakeOpenAI) -> bool:
        """A 401 that echoes the token (as OpenAI's does) where the server wants another; True if sent."""
        if fake.api_key is None or self.headers.get("Authorization") == f"Bearer {fake.api_key}":
            return False
        got = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self._send_json(401, {"error": {"message": f"Incorrect API key provided: {got}",
                                        "type": "invalid_request_error", "code": "invalid_api_key"}})
        return True

    def do_GET(self) -> None:
        fake = self.server.fake
        fake.gets.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        if self.path.rstrip("/") != "/v1/models" or not fake.models_route:
            return self._send_json(404, {"error": {"message": "not found"}})
        if self._refuse_key(fake):
            return
        self._send_json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                          "owned_by": "fake"} for m in fake.served]})

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                  "t": time.perf_counter()}
        with fake._lock:
            fake.requests.append(record)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._answer(fake, body, record)
        except OSError:  # the client gave up (its timeout) before we answered
            self.close_connection = True
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _answer(self, fake: FakeOpenAI, body: dict[str, Any], record: dict[str, Any]) -> None:
        if self._refuse_key(fake):
            return
        if body.get("model") not in fake.served:
            return self._send_json(404, {"error": {
                "message": f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                "type": "invalid_request_error", "code": "model_not_found"}})
        if self.path == "/v1/chat/completions":
            text = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        elif self.path == "/v1/completions":
            text = body["prompt"]
        else:
            return self._send_json(404, {"error": {"message": "not found"}})
        record["input"] = text
        kind, delayed = fake.fault(text, int(self.headers.get("x-stainless-retry-count", 0)))
        record["fault"] = kind
        time.sleep(fake.work_s + (fake.faults.delay_s if delayed else 0.0))
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "hang":
            time.sleep(fake.faults.hang_s)
        if kind == "429":
            return self._send_json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                   {"retry-after-ms": str(fake.faults.retry_after_ms)})
        if kind in ("5xx", "fail"):
            status = fake.faults.fail_status if kind == "fail" else random.Random(text).choice((500, 503))
            return self._send_json(status, {"error": {"message": f"server error {status}", "type": "server_error"}})
        answer = fake.answer(body, text)
        if body.get("stream"):
            return self._stream(fake, body, answer)
        chat = self.path == "/v1/chat/completions"
        choice = ({"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None})
        payload = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion", "created": 0,
                   "model": fake.model, "choices": [choice]}
        if fake.usage:
            payload["usage"] = fake.usage_of(body, answer)
        self._send_json(200, payload)

    def _stream(self, fake: FakeOpenAI, body: dict[str, Any], answer: str) -> None:
        chat = self.path == "/v1/chat/completions"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        base = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 0, "model": fake.model}

        def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        if chat:  # vLLM's first chunk carries the role and no content
            send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for piece in re.findall(r"\S+\s*|\s+", answer):
            time.sleep(fake.stream_gap_s)
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            send({**base, "choices": [{**choice, "finish_reason": None}]})
        if fake.usage and (body.get("stream_options") or {}).get("include_usage"):
            send({**base, "choices": [], "usage": fake.usage_of(body, answer)})
        send("[DONE]")
