"""`roi serve` as a client sees it: a real server process on the real default model (float32)."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai SDK is built on
import pytest

from conftest import ROOT, free_port, roi

NAME = "SmolLM2-135M-Instruct"
SYSTEM = ("You are the support assistant of Acme Cloud, a hosting company. Answer in one short sentence, "
          "politely, without greetings. Customers ask about billing (invoices, refunds, payment methods), "
          "technical problems (outages, slow servers, DNS, SSL certificates, deployments) and their account "
          "(passwords, two-factor login, team members, closing the account). Never invent prices or dates.")
QUESTIONS = ["How do I get a refund?", "My site is down.", "How do I reset my password?", "Is DNS slow today?",
             "Can I pay by card?", "How do I add a team member?", "My SSL certificate expired.",
             "How do I close my account?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """A running `roi serve`; a wide batch window so concurrent test requests surely share a batch.

    One torch thread: on a small shared machine two threads contending for a core run ~10x slower.
    """
    logs = tmp_path_factory.mktemp("serve")
    port = free_port()
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model", "embedded", "--dtype", "float32",
             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8", "--batch-window-ms", "200"],
            cwd=ROOT, stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        request.getfixturevalue("model_fp32")  # load the in-process model while the server starts
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (logs / "stderr").read_text()[-2000:]
            assert time.monotonic() < deadline, "roi serve did not start"
            time.sleep(0.5)
        client.ready_line = (logs / "stdout").read_text()
        client.port = port
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _chat(client, question: str, **extra) -> httpx.Response:
    body = {"model": NAME, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": 6, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_chat_and_its_usage_equal_the_local_backend_in_process(server, model_fp32, tokenizer):
    import torch

    from pipeline.backends.local import LocalBackend, LocalSettings
    from pipeline.task.prompts import Prompt, count_tokens

    assert server.ready_line.strip() == f"serving {NAME} on http://127.0.0.1:{server.port}/v1"
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [NAME]
    messages = [{"role": "user", "content": "Name a primary colour."}]
    body = server.post("/v1/chat/completions",
                       json={"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0}).json()
    prompt = Prompt(messages=(("user", "Name a primary colour."),))
    local = LocalBackend(model_fp32, tokenizer, LocalSettings(batch_size=1, max_new_tokens=8, auto_prefix=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs: same kernels, same sums
    try:
        [call] = local.run([prompt])
    finally:
        torch.set_num_threads(threads)
    assert body["object"] == "chat.completion" and body["model"] == NAME
    assert body["choices"][0]["message"] == {"role": "assistant", "content": call.output}
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
    assert usage["prompt_tokens"] == count_tokens(tokenizer, prompt.to_string(tokenizer))
    assert usage["total_tokens"] == call.prompt_tokens + call.completion_tokens
    assert body["choices"][0]["finish_reason"] in ("stop", "length")

    # The same request streamed: OpenAI's SSE chunks, a usage chunk, then [DONE].
    streamed = server.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 8,
                                                         "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == call.output
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == call.prompt_tokens


def test_concurrent_requests_are_batched_and_answer_as_alone_with_the_shared_prefix_cached(server, tokenizer):
    _chat(server, "Hello.")  # an earlier request with this system prompt: the cache settles on it
    before = server.get("/v1/stats").json()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: _chat(server, q), QUESTIONS))
    after = server.get("/v1/stats").json()
    sizes = [int(r.headers["x-roi-batch-size"]) for r in together]
    assert max(sizes) > 1
    assert after["rows"] - before["rows"] == len(QUESTIONS)
    assert after["batches"] - before["batches"] < len(QUESTIONS)

    alone = [_chat(server, q) for q in QUESTIONS]
    assert all(r.headers["x-roi-batch-size"] == "1" for r in alone)
    answers = lambda rs: [r.json()["choices"][0]["message"]["content"] for r in rs]  # noqa: E731
    assert answers(together) == answers(alone)
    system_tokens = len(tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    for response in together + alone:
        usage = response.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= system_tokens, usage
        assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_plain_text_completions_and_guided_choice_labels(server, tokenizer):
    text = "The capital of France is"
    body = server.post("/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 4}).json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 1 <= body["usage"]["completion_tokens"] <= 4

    labels = ["billing", "technical", "account"]
    asks = [{"guided_choice": labels}, {"structured_outputs": {"choice": labels}}]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: _chat(server, QUESTIONS[i], **asks[i % 2]), range(4)))
    for response in responses:
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] in labels and choice["finish_reason"] == "stop"


def test_json_schema_answers_validate_and_a_schema_it_cannot_compile_is_a_400(server):
    from jsonschema import Draft202012Validator

    schema = json.loads((ROOT / "datasets" / "support_fields" / "schema.json").read_text())
    ask = {"response_format": {"type": "json_schema", "json_schema": {"name": "fields", "strict": True,
                                                                      "schema": schema}}}
    # no max_tokens: a JSON answer gets room to close itself, not a sentence's 16 tokens
    response = server.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "user", "content": QUESTIONS[0]}], **ask})
    assert response.status_code == 200, response.text
    with ThreadPoolExecutor(2) as pool:
        responses = [response] + list(pool.map(lambda q: _chat(server, q, **ask, max_tokens=80), QUESTIONS[1:3]))
    assert responses[-1].headers["x-roi-batch-size"] == "2"  # the same schema: one batch
    for response in responses:
        answer = json.loads(response.json()["choices"][0]["message"]["content"])
        assert not list(Draft202012Validator(schema).iter_errors(answer)), answer
        assert list(answer) == list(schema["properties"])  # in the schema's order, as the fine-tune learned
    bad = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(?=x)x$"}}}
    response = server.post("/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}}})
    assert response.status_code == 400 and "look-around" in response.json()["error"]["message"]
    both = server.post("/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a", "b"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema}}})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


@pytest.mark.parametrize("request_args, status", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ({"json": {"model": NAME}}, 400),
    ({"json": {"model": NAME, "messages": "hello"}}, 400),
    ({"json": {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}}, 400),
    ({"json": {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}}, 404),
])
def test_bad_requests_get_openai_style_errors_and_the_server_lives_on(server, request_args, status):
    response = server.post("/v1/chat/completions", **request_args)
    assert response.status_code == status
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error and "code" in error
    if "temperature" in json.dumps(request_args.get("json", {})):
        assert "greedy" in error["message"]
    unknown = server.post("/v1/nope", json={})
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert server.get("/health").json() == {"status": "ok"}


def test_a_folder_that_is_not_an_adapter_is_one_line_and_exit_2(tmp_path, roi_env):
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = roi("serve", "--adapter", str(tmp_path), "--port", str(free_port()), env=roi_env, timeout=180)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roi: error:") and str(tmp_path) in lines[0]
