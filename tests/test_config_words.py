"""Config errors in the user's words: every section fed malformed values gives one line with the key path and
what is expected, never pydantic's own wording; a price's kind follows from its keys."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import ROOT
from pipeline.cli import main
from pipeline.experiment.config import ConfigError
from pipeline.experiment.load import load_experiment

PYDANTIC_WORDS = ("discriminator", "Input should be", "validation error for", "type=", "Field required",
                  "Unable to extract", "pydantic")
BASE = {"experiment": "words", "task": {"path": str(ROOT / "datasets" / "support_tickets"), "labels": "labels.json"},
        "arms": ["naive", "engineered"]}
API = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}


def _with(path: str, value):
    def mutate(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def _arm(**keys):
    return _with("arms", [{"name": "x", "prompt": "naive", **keys}])


# (mutation, the start of what the line says after the file name)
CASES = [
    (_with("experiment", ""), "experiment: must not be empty"),
    (_with("experiment", ["a"]), "experiment: expected text"),
    (_with("task.path", 5), "task.path: expected a path (got 5)"),
    (_with("task.labels", 5), "task.labels: expected text or a list (got 5)"),
    (_with("task.splits", {"dev": "dev.jsonl"}), "task.splits: 'dev' is not an allowed key (expected 'train', "),
    (_with("task.test_size", 2), "task.test_size: must be less than 1 (got 2)"),
    (_with("task.format", "xlsx"), "task.format: 'xlsx' is not allowed (expected 'auto', "),
    (_with("task.extra", 1), "task.extra: unknown key"),
    (_with("data.train_limit", "many"), "data.train_limit: expected a whole number (got 'many')"),
    (_with("data.seed", 1.5), "data.seed: expected a whole number (got 1.5)"),
    (_with("models", ["a"]), "models: expected a mapping of keys"),
    (_with("models", {"api": 5}), "models.api: expected a mapping of keys (got 5)"),
    (_with("models", {"api": {"backend": "grpc"}}), "models.api.backend: 'grpc' is not allowed (expected 'local', "),
    (_with("models", {"api": {"backend": "openai", "model": "m"}}), "models.api.base_url: required key is missing"),
    (_with("models", {"api": {**API, "max_concurrency": 0}}), "models.api.max_concurrency: must be greater than 0"),
    (_with("models", {"api": {**API, "base_url": "localhost:8000/v1"}}),
     "models.api.base_url: a base_url needs a scheme: did you mean http://localhost:8000/v1?"),
    (_with("models", {"api": {**API, "base_url": "api.openai.com/v1"}}),
     "models.api.base_url: a base_url needs a scheme: did you mean https://api.openai.com/v1?"),
    (_with("models", {"api": {**API, "stream": "sometimes"}}), "models.api.stream: expected true or false"),
    (_with("models", {"small": {"dtype": "fp8"}}), "models.small.dtype: 'fp8' is not allowed (expected "),
    (_with("arms", "naive"), "arms: expected a list (got 'naive')"),
    (_arm(name="a b"), "arms[0].name: use letters, digits, '.', '_' and '-', starting with a letter or digit"),
    (_arm(kind="tuned"), "arms[0].kind: 'tuned' is not allowed (expected 'prompt' or 'finetuned')"),
    (_arm(price={"input_usd_per_mtok": 0.15}), "arms[0].price.output_usd_per_mtok: required key is missing"),
    (_arm(price={"usd": 1}), "arms[0].price: cannot tell what kind of price this is: give catalog: NAME, "),
    (_arm(price={"kind": "per_call", "usd": 1}), "arms[0].price.kind: 'per_call' is not allowed (expected "),
    (_arm(price={"usd_per_hour": -1}), "arms[0].price.usd_per_hour: must be at least 0"),
    (_arm(price={"catalog": 7}), "arms[0].price.catalog: expected text (got 7)"),
    (_arm(eval={"batch_size": "big"}), "arms[0] (x).eval.batch_size: expected a whole number (got 'big')"),
    (_arm(finetune={"lora": {"r": -1}}), "arms[0] (x).finetune.lora.r: must be greater than 0 (got -1)"),
    (_with("compare.baseline", 3), "compare.baseline: expected text (got 3)"),
    (_with("model.source", ["x"]), "model.source: expected text"),
    (_with("model.trust_remote_code", "sometimes"), "model.trust_remote_code: expected true or false"),
    (_with("prompts.few_shot_k", -1), "prompts.few_shot_k: must be at least 0 (got -1)"),
    (_with("finetune.epochs", "many"), "finetune.epochs: expected a number (got 'many')"),
    (_with("finetune.lora.r", 0), "finetune.lora.r: must be greater than 0 (got 0)"),
    (_with("finetune.lora.target_modules", 5), "finetune.lora.target_modules: expected a list or 'all-linear' (got 5)"),
    (_with("finetune.lora.dropout", 1), "finetune.lora.dropout: must be less than 1 (got 1)"),
    (_with("eval.max_failed_rate", 1.5), "eval.max_failed_rate: must be at most 1 (got 1.5)"),
    (_with("eval.decoding", "beam"), "eval.decoding: 'beam' is not allowed (expected 'free' or 'constrained')"),
    (_with("pricing.arms", {"naive": 0.1}), "pricing.arms.naive: cannot tell what kind of price this is"),
    (_with("pricing.arms", {"naive": {"kind": "per_hour"}}), "pricing.arms.naive: give usd_per_hour or hardware"),
    (_with("pricing.arms", {"naive": {"usd_per_hour": 1, "target_utilisation": 2}}),
     "pricing.arms.naive.target_utilisation: must be at most 1 (got 2)"),
    (_with("pricing.monthly_calls", 0), "pricing.monthly_calls: must be greater than 0 (got 0)"),
    (_with("pricing.finetune.usd_per_hour", "cheap"), "pricing.finetune.usd_per_hour: expected a number"),
    (_with("pricing.catalog", 5), "pricing.catalog: expected a path (got 5)"),
    (_with("stats.confidence", 95), "stats.confidence: must be less than 1 (got 95)"),
    (_with("stats", "fast"), "stats: expected a mapping of keys (got 'fast')"),
    (_with("output_dir", 5), "output_dir: expected a path (got 5)"),
]


@pytest.mark.parametrize("mutate, expected", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_a_malformed_section_names_the_key_and_what_is_expected_in_our_words(tmp_path, mutate, expected):
    data = copy.deepcopy(BASE)
    mutate(data)
    path = tmp_path / "words.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert not [w for w in PYDANTIC_WORDS if w in message], message
    assert "\n" not in message


def test_the_cli_line_is_the_same_one_line(tmp_path, capsys):
    path = tmp_path / "words.yaml"
    path.write_text(yaml.safe_dump({**BASE, "arms": [{"name": "x", "prompt": "naive", "price": {"usd": 1}}]}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"roi: error: {path}: arms[0].price: cannot tell what kind of price") and err.count("\n") == 1


@pytest.mark.parametrize("price, kind", [
    ({"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}, "per_token"),
    ({"kind": "per_token", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}, "per_token"),
    ({"usd_per_hour": 0.5}, "per_hour"),
    ({"hardware": "t4", "min_replicas": 0}, "per_hour"),
    ({"catalog": "gpt-4o-mini"}, "per_token"),  # a catalog row becomes its per-token prices
])
def test_a_prices_kind_follows_from_its_keys(tmp_path, price, kind):
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump({**BASE, "models": {"api": API},
                                    "arms": [{"name": "x", "model": "api", "prompt": "naive", "price": price}]}))
    arm = load_experiment(path).arms[0]
    assert arm.price.kind == kind
    if "input_usd_per_mtok" in price:
        assert (arm.price.input_usd_per_mtok, arm.price.output_usd_per_mtok) == (0.15, 0.6)
    if "usd_per_hour" in price:
        assert arm.price.usd_per_hour == 0.5
