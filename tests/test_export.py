"""`roi export`: the adapter as vLLM loads it (the peft layout, checked by loading it back with peft on
the real base model), the exact `vllm serve` command, and the GGUF LoRA for llama.cpp read back with
gguf-py against the real base GGUF. Real model, real adapters, real MLflow store."""

import copy
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import roi

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


@pytest.fixture(scope="module")
def source(model_fp32, tmp_path_factory):
    """A LoRA adapter on the real default model, saved as this tool saves them (with its training record):
    r=4 (no vLLM rank bucket) and seeded nonzero B, so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tuned = get_peft_model(copy.deepcopy(model_fp32), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
    for name, param in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    folder = tmp_path_factory.mktemp("source") / "adapter"
    # No embedding is tuned. "auto" would look for the base's config.json to see whether the vocabulary grew, and
    # warn where it cannot: a model read straight from the GGUF (a fresh clone's first load) is named by the
    # package's folder, which has none, and the hub is offline.
    tuned.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    (folder / "training.json").write_text(json.dumps({"base_model": "SmolLM2-135M-Instruct", "train_time_s": 1.0}))
    return tuned.eval(), folder


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    from pipeline.apps.export import export

    out = tmp_path_factory.mktemp("export")
    export(str(source[1]), out, name="triage")
    return out


def _command(script: Path) -> list[str]:
    return shlex.split(script.read_text().strip().splitlines()[-1])


def test_the_exported_folder_loads_back_with_peft_and_gives_the_source_logits(source, exported, model_fp32,
                                                                             tokenizer):
    from peft import PeftModel

    cfg = json.loads((exported / "triage" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == HUB_ID
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], set(cfg["target_modules"])) == ("LORA", 4, 8, LINEAR)
    assert not cfg["modules_to_save"] and not cfg["use_dora"] and not cfg["lora_bias"] and cfg["bias"] == "none"
    assert json.loads((exported / "triage" / "training.json").read_text())["train_time_s"] == 1.0

    loaded = PeftModel.from_pretrained(copy.deepcopy(model_fp32), str(exported / "triage")).eval()
    ids = tokenizer(["Hi, my invoice shows the wrong amount."], return_tensors="pt")
    with torch.no_grad():
        expected, got, base = source[0](**ids).logits, loaded(**ids).logits, model_fp32(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (expected - base).abs().max() > 1e-2  # the adapter does change the answer


def test_the_vllm_command_names_the_exported_folder_and_a_rank_bucket_that_holds_r(exported):
    command = _command(exported / "serve_vllm.sh")
    assert command[:4] == ["exec", "vllm", "serve", HUB_ID] and "--enable-lora" in command
    name, path = command[command.index("--lora-modules") + 1].split("=", 1)
    assert name == "triage" and Path(path) == exported / "triage" and (Path(path) / "adapter_config.json").is_file()
    rank = int(command[command.index("--max-lora-rank") + 1])
    assert rank in VLLM_RANKS and rank >= 4 and rank == 8
    readme = (exported / "README.md").read_text()
    assert "backend: openai" in readme and "model: triage" in readme and "kind: finetuned" in readme


def test_vllm_rank_buckets_by_hand():
    from pipeline.apps.export import vllm_max_lora_rank
    from pipeline.models.loading import ModelError

    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 64, 300, 320, 512)] == \
        [1, 8, 8, 16, 16, 32, 64, 320, 320, 512]
    with pytest.raises(ModelError, match="513"):
        vllm_max_lora_rank(513)


def _gguf_fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's q/k rows in GGUF's rotary order."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_the_gguf_lora_fits_the_base_gguf_and_holds_the_peft_tensors(source, exported, model_fp32):
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from pipeline.experiment.config import ModelConfig
    from pipeline.models.loading import resolve_source

    base_source = resolve_source(ModelConfig())
    base = gguf.GGUFReader(str(Path(base_source.folder) / base_source.gguf_file))
    lora = gguf.GGUFReader(str(exported / "triage.gguf"))
    fields, base_fields = _gguf_fields(lora), _gguf_fields(base)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    command = _command(exported / "serve_llama_cpp.sh")
    assert command[:4] == ["exec", "llama-server", "-m", str(Path(base_source.folder) / base_source.gguf_file)]
    assert command[command.index("--lora") + 1] == str(exported / "triage.gguf")

    base_tensors = {t.name: t for t in base.tensors}
    pairs: dict[str, dict[str, object]] = {}
    for t in lora.tensors:
        stem, _, half = t.name.rpartition(".")
        pairs.setdefault(stem, {})[half] = t
    n_layers = base_fields["llama.block_count"]
    assert len(pairs) == n_layers * len(LINEAR) and all(set(p) == {"lora_a", "lora_b"} for p in pairs.values())
    for stem, pair in pairs.items():
        in_features, out_features = (int(n) for n in base_tensors[stem].shape[:2])  # ggml order: ne0 = in
        assert [int(n) for n in pair["lora_a"].shape] == [in_features, 4]  # numpy: A is rank x in
        assert [int(n) for n in pair["lora_b"].shape] == [4, out_features]  # numpy: B is out x rank

    # Values: peft's A as is; B too, except q/k rows, permuted as the base GGUF's own q/k weights are.
    heads = {"q_proj": base_fields["llama.attention.head_count"],
             "k_proj": base_fields["llama.attention.head_count_kv"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    peft = load_file(str(source[1] / "adapter_model.safetensors"))
    for key, tensor in peft.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        stem, leaf, half = names.get_name(module + ".weight", (".weight",)), module.rsplit(".", 1)[-1], key[-8]
        expected = tensor.float().numpy()
        if half == "B" and leaf in heads:
            expected = _permute(expected, heads[leaf])
        written = np.asarray(pairs[stem]["lora_" + half.lower()].data)
        assert written.dtype == np.float32
        np.testing.assert_array_equal(written, expected)

    # That permutation is the base GGUF's own: its dequantized q/k weights are the HF ones permuted.
    for leaf, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        t = base_tensors[f"blk.0.{gguf_name}.weight"]
        hf = getattr(model_fp32.model.layers[0].self_attn, leaf).weight.detach().numpy()
        in_gguf = dequantize(t.data, t.tensor_type).reshape(hf.shape)
        np.testing.assert_array_equal(in_gguf, _permute(hf, heads[leaf]))
        assert not np.array_equal(in_gguf, hf)


def test_what_vllm_cannot_load_is_refused_in_one_line(source, tmp_path):
    import shutil

    from pipeline.apps.export import check_for_vllm
    from pipeline.models.loading import ModelError

    for change, message in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"bias": "all"}, "bias=all"), ({"init_lora_weights": "pissa"}, "init_lora_weights=pissa")):
        folder = tmp_path / message
        shutil.copytree(source[1], folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ModelError, match=f"vLLM cannot load an adapter with {message}") as error:
            check_for_vllm(folder)
        assert "\n" not in str(error.value)


def test_roi_export_by_run_id_on_the_tiny_run(tiny_run, tmp_path):
    from mlflow.tracking import MlflowClient

    env, _, _, _ = tiny_run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent").info.run_id
    arm = next(r for r in runs if r.data.tags.get("arm") == "finetuned").info.run_id

    several = roi("export", parent, "--to", str(tmp_path / "x"), env=env)
    assert several.returncode == 2 and several.stderr.count("\n") == 1, several.stderr
    assert "several arms have adapters (finetuned, finetuned-int8): choose one with --arm NAME" in several.stderr
    no_adapter = roi("export", parent, "--arm", "naive", "--to", str(tmp_path / "x"), env=env)
    assert no_adapter.returncode == 2 and no_adapter.stderr.count("\n") == 1, no_adapter.stderr
    assert "--arm naive: no such arm with an adapter (arms with one: finetuned, finetuned-int8)" in no_adapter.stderr

    result = roi("export", parent, "--arm", "finetuned", "--to", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "out" / "finetuned"
    artifact = Path(client.download_artifacts(arm, "adapter", str(tmp_path)))
    assert (folder / "adapter_model.safetensors").read_bytes() == (artifact / "adapter_model.safetensors").read_bytes()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    command = _command(tmp_path / "out" / "serve_vllm.sh")
    assert command[command.index("--lora-modules") + 1] == f"finetuned={folder}"
    assert command[command.index("--max-lora-rank") + 1] == "16"  # the default config's r=16
    assert (tmp_path / "out" / "finetuned.gguf").stat().st_size > 0

    by_arm = roi("export", arm, "--name", "triage-ft", "--to", str(tmp_path / "arm"), env=env)
    assert by_arm.returncode == 0, by_arm.stderr[-2000:]
    assert (tmp_path / "arm" / "triage-ft" / "adapter_model.safetensors").read_bytes() == \
        (folder / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("what", ["missing folder", "unknown run", "not a LoRA folder", "no adapter config"])
def test_bad_input_is_one_line_and_exit_2(what, tmp_path, roi_env):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes(b"")
    source, expected = {"missing folder": (str(tmp_path / "nowhere"), "no such adapter folder"),
                        "unknown run": ("0" * 32, f"run {'0' * 32} not found"),
                        "not a LoRA folder": (str(tmp_path / "ia3"), "peft_type must be LORA"),
                        "no adapter config": (str(tmp_path), "not a LoRA adapter folder")}[what]
    result = roi("export", source, "--to", str(tmp_path / "out"), env=roi_env)
    assert result.returncode == 2 and result.stderr.startswith("roi: error: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and expected in result.stderr


def test_an_export_never_replaces_its_source_or_a_folder_it_did_not_write(source, tmp_path):
    import shutil

    from pipeline.apps.export import export
    from pipeline.models.loading import ModelError

    adapter = tmp_path / "adapter"
    shutil.copytree(source[1], adapter)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ModelError, match="would replace the adapter being exported"):
        export(str(adapter), tmp_path)  # TO/NAME is the source itself
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="exists and is not an earlier export"):
        export(str(adapter), tmp_path, name="notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
