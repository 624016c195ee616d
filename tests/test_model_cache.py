"""The embedded GGUF is dequantised once per machine: later loads read the kept safetensors copy, with the same
weights, and a damaged copy is replaced rather than trusted."""

import torch

from pipeline import models
from pipeline.config import ModelConfig


def _loads_from(monkeypatch):
    """The folder each `from_pretrained` call loads from."""
    from transformers import AutoModelForCausalLM

    folders = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, folder, *args, **kwargs):
        folders.append(str(folder))
        return original(cls, folder, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return folders


def test_a_dequantized_model_is_kept_and_loads_with_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = models.resolve_source(ModelConfig())
    kept = models.dequantized_cache(source, torch.bfloat16)
    assert kept.parent == tmp_path / "roi" / "dequantized" and not kept.exists()
    assert models.dequantized_cache(source, torch.float32) != kept  # one copy per dtype
    folders = _loads_from(monkeypatch)
    first = models.load_model(source, torch.bfloat16)
    second = models.load_model(source, torch.bfloat16)
    assert folders == [source.folder, str(kept)]  # the GGUF once, then the kept copy
    assert [p.name for p in tmp_path.glob("roi/dequantized/*")] == [kept.name]  # no half-written folder left
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    (kept / "model.safetensors").write_bytes(b"not a safetensors file")
    third = models.load_model(source, torch.bfloat16)
    assert folders[2:] == [str(kept), source.folder]  # the damaged copy failed, the GGUF was read again
    assert torch.equal(third(ids).logits, first(ids).logits)
    assert models.load_model(source, torch.bfloat16) is not None and folders[-1] == str(kept)  # and it was kept
