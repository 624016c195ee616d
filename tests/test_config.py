import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi
from pipeline.cli import main
from pipeline.config import ConfigError, apply_overrides, load_config

DEFAULT = ROOT / "experiments" / "default.yaml"


def test_default_config_loads_and_resolves_paths():
    cfg = load_config(DEFAULT)
    assert cfg.arms == ["naive", "engineered", "finetuned"]
    assert cfg.task.path == ROOT / "datasets" / "support_tickets"
    assert cfg.prompts.engineered.is_file()


def test_overrides_are_typed_and_dotted():
    cfg = load_config(DEFAULT, ["finetune.epochs=1", "eval.limit=50", "finetune.lora.r=4", "arms=[naive]"])
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
    (_set("arms", ["naive", "zero_shot"]), "arms.1"),
    (_set("arms", []), "at least one arm"),
    (_set("model.dtype", "float8"), "model.dtype"),
    (_set("eval.limit", 0), "eval.limit"),
    (_set("eval.batch_size", -2), "eval.batch_size"),
    (_set("pricing.arms.naive", {"kind": "per_call", "usd": 1}), "pricing.arms.naive"),
    (_set("pricing.arms.naive", {"kind": "per_token", "input_usd_per_mtok": -1, "output_usd_per_mtok": 1}),
     "pricing.arms.naive.per_token.input_usd_per_mtok"),
    (_delete("pricing.arms.finetuned"), "pricing.arms has no price for arm(s) finetuned"),
    (_delete("pricing"), "pricing: required key is missing"),
    (_delete("experiment"), "experiment: required key is missing"),
    (_set("prompts.engineered", "prompts/missing.yaml"), "prompts.engineered: prompt file"),
    (_set("task.path", "datasets/nowhere"), "task.path: folder"),
    (_set("task.format", "xlsx"), "task.format"),
    (_set("pricing.baseline_arm", "finetuned"), "pricing.baseline_arm"),
    (_set("model.trust_remote_code", "sometimes"), "model.trust_remote_code"),
    (_set("eval.decoding", "beam"), "eval.decoding: 'beam' is not allowed (expected 'free' or 'constrained')"),
    (_set("eval.repeats", 0), "eval.repeats"),
    (_set("finetune.adapter", "adapters/nowhere"), "finetune.adapter: folder"),
]


@pytest.mark.parametrize("mutate, expected", CASES)
def test_bad_config_is_one_line_exit_2_naming_the_key(tmp_path, capsys, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("roi: error: ") and expected in err
    assert "Traceback" not in err


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
