"""Backends by name: a model config's `backend:` key -> the class that answers for it, as "module:Class"
strings imported on first use (as lm-evaluation-harness maps model names), so a run that uses only an API
never imports the local model stack, and a new backend is one line here and one class."""

from __future__ import annotations

import importlib
from functools import cache

BACKENDS = {
    "local": "pipeline.backends.local:LocalBackend",
    "openai": "pipeline.backends.openai:OpenAIBackend",
}


@cache
def backend_class(name: str) -> type:
    """The class registered for `name` (a config's `backend:` value, already validated)."""
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
