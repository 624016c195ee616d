"""The OpenAI-compatible backend against a real local HTTP server (tests/fake_openai.py)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from fake_openai import FakeOpenAI, Faults
from pipeline.backends.openai import OpenAIBackend
from pipeline.backends.preflight import check_api_key
from pipeline.experiment.config import ConfigError, OpenAIModelConfig
from pipeline.task.prompts import Prompt

LABELS = ["card_arrival", "balance", "refund"]


def spec(server: FakeOpenAI, **kw) -> OpenAIModelConfig:
    return OpenAIModelConfig(backend="openai", base_url=server.base_url, model="fake", **kw)


def chat(text: str) -> Prompt:
    return Prompt(messages=(("system", "Classify the query."), ("user", text)))


def test_faults_keep_every_row_in_order_and_count_retries():
    n = 500
    texts = [f"query {i} about my card" for i in range(n)]
    doomed = {texts[i] for i in (3, 111, 250, 499)}
    faults = Faults(seed=1, rate_429=0.15, rate_5xx=0.10, rate_drop=0.05, rate_hang=0.01, hang_s=1.5,
                    rate_delay=0.1, delay_s=0.05, fault_attempts=3, always_fail=doomed, fail_status=503)
    batches: list[list] = []
    with FakeOpenAI(faults) as server:
        backend = OpenAIBackend(spec(server, max_concurrency=16, max_retries=4, timeout_s=1.0), max_new_tokens=8)
        calls = backend.run([chat(t) if i % 2 else Prompt(text=t) for i, t in enumerate(texts)], batches.append)
    assert len(calls) == n
    assert [c for b in batches for c in b] == calls and all(batches)
    sent = Counter(server.inputs())
    for text, call in zip(texts, calls):
        assert call.retries == sent[text] - 1  # the SDK's own count matches what the server saw
        if text in doomed:
            assert call.output == "" and "503" in call.error and call.retries == 4
        else:
            assert call.error is None and call.output == text.upper()
    kinds = Counter(r.get("fault") for r in server.requests)
    assert all(kinds[k] > 0 for k in ("429", "5xx", "drop", "hang", "fail"))
    assert backend.retries_total == sum(c.retries for c in calls) > 0


def test_tokens_come_from_usage_else_from_the_counter():
    prompts = [chat("two words"), Prompt(text="three plain words")]
    with FakeOpenAI() as server:
        backend = OpenAIBackend(spec(server), max_new_tokens=8)
        calls = backend.run(prompts)
    assert [(c.prompt_tokens, c.completion_tokens, c.cached_tokens) for c in calls] == [(5, 2, 2), (3, 3, 1)]
    assert backend.tokens_estimated is False

    def count(s: str) -> int:
        return len(s.split())

    def to_text(messages: list[dict]) -> str:
        return "<s> " + " ".join(m["content"] for m in messages)

    with FakeOpenAI(usage=False) as server:
        backend = OpenAIBackend(spec(server), max_new_tokens=8, count_tokens=count, chat_to_text=to_text)
        calls = backend.run(prompts)
        assert [(c.prompt_tokens, c.completion_tokens, c.cached_tokens) for c in calls] == [(6, 2, 0), (3, 3, 0)]
        assert backend.tokens_estimated is True
        bare = OpenAIBackend(spec(server), max_new_tokens=8)
        assert [(c.prompt_tokens, c.completion_tokens) for c in bare.run(prompts)] == [(0, 0), (0, 0)]
        assert bare.tokens_estimated is True


def test_text_goes_to_completions_and_chats_to_chat_completions():
    prompts = [Prompt(text="raw input ->"), chat("hello there")]
    with FakeOpenAI() as server:
        calls = OpenAIBackend(spec(server), max_new_tokens=7).run(prompts)
    # The two requests are concurrent: their arrival order is not fixed.
    by_path = {r["path"]: r for r in server.requests}
    assert len(by_path) == 2
    text_req, chat_req = by_path["/v1/completions"], by_path["/v1/chat/completions"]
    assert text_req["path"] == "/v1/completions" and text_req["body"]["prompt"] == "raw input ->"
    assert chat_req["path"] == "/v1/chat/completions"
    assert chat_req["body"]["messages"] == prompts[1].chat()
    for r in server.requests:
        assert r["body"]["model"] == "fake" and r["body"]["temperature"] == 0 and r["body"]["max_tokens"] == 7
        assert "stream" not in r["body"] and "structured_outputs" not in r["body"]
    assert [c.output for c in calls] == ["RAW INPUT ->", "HELLO THERE"]


@pytest.mark.parametrize("via", ["guided_choice", "json_schema", "none"])
def test_constrained_decoding_payloads(via):
    prompts = [chat("where is my refund"), Prompt(text="what is my balance")]
    with FakeOpenAI() as server:
        calls = OpenAIBackend(spec(server, constrained_via=via), max_new_tokens=8, labels=LABELS).run(prompts)
    bodies = [r["body"] for r in server.requests]
    if via == "guided_choice":
        assert all(b["structured_outputs"] == {"choice": LABELS} and "guided_choice" not in b for b in bodies)
        assert [c.output for c in calls] == ["refund", "balance"]
    elif via == "json_schema":
        expected = {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {
            "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
            "required": ["label"], "additionalProperties": False}}}
        assert all(b["response_format"] == expected for b in bodies)
        assert [c.output for c in calls] == ["refund", "balance"]  # parsed out of {"label": ...}
    else:
        assert not any("structured_outputs" in b or "response_format" in b for b in bodies)
        assert [c.output for c in calls] == ["WHERE IS MY REFUND", "WHAT IS MY BALANCE"]


def test_json_schema_answer_that_is_not_json_is_kept_raw():
    with FakeOpenAI(garbage_json=True) as server:
        calls = OpenAIBackend(spec(server, constrained_via="json_schema"), 8, labels=LABELS).run([chat("refund")])
    assert calls[0].output == "not json {" and calls[0].error is None


def test_concurrency_and_rate_limits():
    with FakeOpenAI(work_s=0.05) as server:
        OpenAIBackend(spec(server, max_concurrency=4), max_new_tokens=4).run([chat(f"q{i}") for i in range(24)])
    assert 2 <= server.max_in_flight <= 4

    with FakeOpenAI() as server:  # 600 a minute: one every 0.1 s, so 11 calls span >= 1 s
        start = time.perf_counter()
        OpenAIBackend(spec(server, max_concurrency=8, requests_per_minute=600), 4).run(
            [chat(f"q{i}") for i in range(11)])
        elapsed = time.perf_counter() - start
    arrivals = sorted(r["t"] for r in server.requests)
    assert elapsed >= 0.95
    # No burst: any half second holds at most the 5 requests the limit allows, plus 2 that thread
    # scheduling on a busy machine can bunch into it (all 11 at once would be 11). Single gaps are not
    # checked: a request delayed 70 ms on its way in arrives 30 ms before the next, whatever the client did.
    assert max(sum(t <= a < t + 0.5 for a in arrivals) for t in arrivals) <= 7


def test_stream_measures_ttft_and_gives_the_same_text():
    prompts = [chat("stream these four words"), Prompt(text="and a plain prompt")]
    with FakeOpenAI(stream_gap_s=0.02) as server:
        plain = OpenAIBackend(spec(server), max_new_tokens=8).run(prompts)
        streamed = OpenAIBackend(spec(server, stream=True), max_new_tokens=8).run(prompts)
    assert [c.output for c in streamed] == [c.output for c in plain] == [
        "STREAM THESE FOUR WORDS", "AND A PLAIN PROMPT"]
    for s, p in zip(streamed, plain):
        assert s.error is None and p.ttft_ms is None
        assert 0 < s.ttft_ms < s.latency_ms
        assert (s.prompt_tokens, s.completion_tokens, s.cached_tokens) == (
            p.prompt_tokens, p.completion_tokens, p.cached_tokens)
    stream_bodies = [r["body"] for r in server.requests[2:]]
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in stream_bodies)


def test_api_key_is_sent_and_never_shown(monkeypatch):
    marker = "sk-test-MARKER-7f3a9c"
    monkeypatch.setenv("ROI_TEST_KEY", marker)
    with FakeOpenAI(api_key=marker) as server:
        calls = OpenAIBackend(spec(server, api_key_env="ROI_TEST_KEY"), 4).run([chat("hi")])
    assert calls[0].error is None
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {marker}"

    # A server that rejects the key and echoes it back: the error names the status, masks the key.
    with FakeOpenAI(api_key="the-right-key") as server:
        backend = OpenAIBackend(spec(server, api_key_env="ROI_TEST_KEY", max_retries=3), 4)
        calls = backend.run([chat("a"), Prompt(text="b")])
    assert len(server.requests) == 2  # a 401 is not retried
    for c in calls:
        assert c.output == "" and c.retries == 0 and "401" in c.error and "***" in c.error
        assert marker not in c.error and len(c.error) <= 250

    with FakeOpenAI() as server:  # a key that is required but missing: one line, the name only
        for value in (None, ""):
            if value is None:
                monkeypatch.delenv("ROI_TEST_KEY")
            else:
                monkeypatch.setenv("ROI_TEST_KEY", value)
            with pytest.raises(ConfigError) as err:
                check_api_key(spec(server, api_key_env="ROI_TEST_KEY"), "arms.api.model")
            assert str(err.value) == "arms.api.model.api_key_env: environment variable ROI_TEST_KEY is not set"
            with pytest.raises(ConfigError):
                OpenAIBackend(spec(server, api_key_env="ROI_TEST_KEY"), 4)
        check_api_key(spec(server), "model")  # no key needed
