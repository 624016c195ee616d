"""Constrained decoding on a JSON Schema (backends.decoding.json_schema): every answer is JSON that validates,
closed in time when max_new_tokens runs short; the OpenAI backend asks the server for the same schema."""

from __future__ import annotations

import json

import pytest
import torch
from jsonschema import Draft202012Validator

from conftest import ROOT
from fake_openai import FakeOpenAI
from pipeline.backends.decoding.greedy import greedy_answers
from pipeline.backends.decoding.json_schema import JsonSchemaConstraint, SchemaError
from pipeline.backends.decoding.static_cache import StaticDecoder, greedy_answers_static
from pipeline.backends.local import LocalBackend, LocalSettings, stop_token_ids
from pipeline.backends.openai import OpenAIBackend
from pipeline.errors import UserError
from pipeline.experiment.config import OpenAIModelConfig
from pipeline.task.prompts import Prompt

SCHEMA = json.loads((ROOT / "datasets" / "support_fields" / "schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
SYSTEM = ("Extract the support ticket's fields as one JSON object: product (web_app, mobile_app, desktop_app, api, "
          "dock, headset, card_reader, subscription or null), order_id (a string or null), urgency (low, normal, high "
          "or critical), requested_action (refund, replacement, cancellation, troubleshooting, information, "
          "account_change or delivery_status) and error_codes (a list of strings).")
TICKETS = [
    "My dock stopped charging my laptop after the update. Order ORD-58213. Please send a replacement, demo tomorrow.",
    "Hi, I was charged twice for my subscription this month. I want a refund of the second charge.",
    "The mobile app crashes on login with error E-1043. Nothing urgent, just letting you know.",
    "Where is my headset? Order 4471920 was supposed to arrive last week.",
    "Our whole team cannot reach the API since this morning, every call returns 502. Production is down!",
    "Can you tell me whether the web app supports single sign-on?",
    "Please cancel my plan at the end of the month.",
    "I need to change the billing email on our account to finance@example.com.",
    "The card reader shows 0x80070005 when I plug it in, and payments fail. We are losing sales right now.",
    "Webhook deliveries fail with 401 and 403 since yesterday, our integration is blocked.",
    "My order #ORD-77120 arrived with a broken headset, I'd like a new one.",
    "The desktop app freezes when exporting reports, error code E-2210. Deadline on Friday.",
]


def _prompts(tokenizer, tickets):
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}],
                                           add_generation_prompt=True, tokenize=False) for t in tickets]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _valid(text: str) -> bool:
    try:
        return VALIDATOR.is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


@pytest.fixture(scope="module")
def constraint(model_fp32, tokenizer):
    return JsonSchemaConstraint(tokenizer, SCHEMA, stop_token_ids(model_fp32, tokenizer))


def test_constrained_answers_validate_and_end_where_free_answers_mostly_do_not(model_fp32, tokenizer, constraint):
    stop, prompts = constraint.stop_ids, _prompts(tokenizer, TICKETS)
    constrained = greedy_answers(model_fp32, prompts, 64, stop, batch_size=len(prompts), pad_id=stop[0],
                                 constraint=constraint)
    free = greedy_answers(model_fp32, prompts, 64, stop, batch_size=len(prompts), pad_id=stop[0])
    for answer in constrained:
        text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
        assert _valid(text), text
        assert answer.tokens[-1] in stop  # ended by a stop token once the JSON was complete, not cut at the limit
    valid_free = [_valid(tokenizer.decode(a.tokens, skip_special_tokens=True)) for a in free]
    assert sum(valid_free) <= len(TICKETS) // 2, valid_free  # without the constraint this model rarely complies


def test_a_limit_too_short_for_the_answer_closes_the_json_in_time(model_fp32, tokenizer, constraint):
    """Each row writes the closing (open string closed, the rest null or short) once its remaining tokens call for
    it: the answer validates and fits the limit. A limit below the shortest answer is a one-line error."""
    stop, limit = constraint.stop_ids, constraint.shortest + 3
    answers = greedy_answers(model_fp32, _prompts(tokenizer, TICKETS[:6]), limit, stop, batch_size=6,
                             pad_id=stop[0], constraint=constraint)
    for answer in answers:
        assert len(answer.tokens) <= limit and answer.tokens[-1] in stop
        assert _valid(tokenizer.decode(answer.tokens, skip_special_tokens=True))
    with pytest.raises(SchemaError, match=f"max_new_tokens={constraint.shortest - 1} is below"):
        constraint.start(constraint.shortest - 1)


def test_the_closing_from_any_point_of_an_answer_validates_and_stays_the_same(tokenizer):
    constraint = JsonSchemaConstraint(tokenizer, SCHEMA, [tokenizer.eos_token_id])
    answers = [{"product": "dock", "order_id": "ORD-58213", "urgency": "high", "requested_action": "replacement",
                "error_codes": []},
               {"product": None, "order_id": None, "urgency": "low", "requested_action": "information",
                "error_codes": ["E-1043", "0x80070005", 'quote " and \\ backslash']}]
    for value in answers:
        ids = tokenizer(json.dumps(value, separators=(",", ":")), add_special_tokens=False)["input_ids"]
        row = constraint.start(10_000)  # room enough: the model's token is never overruled by the closing
        for k in range(len(ids) + 1):
            closing = constraint._closing(row)
            assert closing == constraint._closing(row) and closing[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(ids[:k] + closing[:-1])
            assert _valid(text), (k, text)
            if k < len(ids):
                allowed = constraint.allowed([row], len(tokenizer), torch.device("cpu"))
                assert allowed[0, ids[k]] and not allowed[0, tokenizer.eos_token_id]
                constraint.advance(row, ids[k])
        assert constraint.may_stop(row)


@pytest.mark.parametrize("schema, reason", [
    ({"title": "broken ref", "type": "object", "properties": {"a": {"$ref": "#/definitions/nope"}}}, "does not exist"),
    ({"title": "lookbehind", "type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"title": "typo", "type": "strin"}, "Invalid type"),
])
def test_a_schema_llguidance_cannot_compile_is_one_user_error(tokenizer, schema, reason):
    with pytest.raises(UserError) as raised:
        JsonSchemaConstraint(tokenizer, schema, [tokenizer.eos_token_id])
    message = str(raised.value)
    assert "\n" not in message and repr(schema["title"]) in message and reason in message, message


def test_both_local_decoders_answer_the_same_valid_json(model_fp32, tokenizer, constraint):
    """Continuous batching and the static-cache waves (the GPU path; on CPU without a graph) mask alike, the
    closing included (a limit most answers need it for)."""
    stop, prompts, limit = constraint.stop_ids, _prompts(tokenizer, TICKETS[:3]), constraint.shortest + 6
    expected = greedy_answers(model_fp32, prompts, limit, stop, batch_size=2, pad_id=stop[0], constraint=constraint)
    waves = greedy_answers_static(StaticDecoder(model_fp32, 2, 192, constraint=constraint), prompts, limit, stop)
    assert [a.tokens for a in waves] == [a.tokens for a in expected]  # waves of 2 and of 1 (a spare row)
    assert all(_valid(tokenizer.decode(a.tokens, skip_special_tokens=True)) for a in waves)


def test_the_local_backend_takes_a_schema_or_labels_not_both(model_fp32, tokenizer):
    prompt = Prompt(messages=(("system", SYSTEM), ("user", TICKETS[4])))
    backend = LocalBackend(model_fp32, tokenizer, LocalSettings(1, 60, schema=SCHEMA))
    (call,) = backend.run([prompt])
    assert _valid(call.output), call.output
    with pytest.raises(ValueError, match="not both"):
        LocalBackend(model_fp32, tokenizer, LocalSettings(1, 60, labels=["a", "b"], schema=SCHEMA))


def test_the_openai_backend_asks_for_json_of_the_schema():
    answer = {"product": "api", "order_id": None, "urgency": "critical", "requested_action": "troubleshooting",
              "error_codes": ["502"]}
    prompts = [Prompt(messages=(("system", SYSTEM), ("user", TICKETS[4]))), Prompt(text=TICKETS[4])]
    expected = {"type": "json_schema", "json_schema": {"name": "support_ticket_fields", "strict": True,
                                                       "schema": SCHEMA}}
    for via in ("guided_choice", "json_schema", "none"):
        with FakeOpenAI(answers=lambda _text: json.dumps(answer)) as server:
            spec = OpenAIModelConfig(backend="openai", base_url=server.base_url, model="fake", constrained_via=via)
            calls = OpenAIBackend.for_eval(spec, 64, None, None, schema=SCHEMA).run(prompts)
        bodies = [r["body"] for r in server.requests]
        assert [json.loads(c.output) for c in calls] == [answer, answer]  # the JSON text as the server wrote it
        if via == "none":  # free decoding: nothing asked
            assert not any("response_format" in b or "structured_outputs" in b for b in bodies)
        else:  # chat and completions alike (the latter through the body), whatever `via` names for labels
            assert [b["response_format"] for b in bodies] == [expected, expected]
            assert not any("structured_outputs" in b for b in bodies)
    with pytest.raises(ValueError, match="not both"):
        OpenAIBackend(spec, 8, labels=["a"], schema=SCHEMA)
