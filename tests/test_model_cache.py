"""The embedded GGUF is dequantised once per machine: later loads read the kept safetensors copy, with the same
weights, and a damaged copy is replaced rather than trusted."""

from pathlib import Path

import torch

from pipeline.models import loading as models
from pipeline.experiment.config import ModelConfig


import pytest

pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


def _loads_from(monkeypatch, auto_class=None):
    """The folder each `auto_class.from_pretrained` call loads from (default: AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    folders = []
    original = auto_class.from_pretrained.__func__

    def spy(cls, folder, *args, **kwargs):
        folders.append(str(folder))
        return original(cls, folder, *args, **kwargs)

    monkeypatch.setattr(auto_class, "from_pretrained", classmethod(spy))
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


def test_a_gguf_tokenizer_is_kept_and_encodes_and_templates_the_same(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = models.resolve_source(ModelConfig())
    kept = models.kept_copy(source, "tokenizers")
    assert kept.parent == tmp_path / "roi" / "tokenizers"
    folders = _loads_from(monkeypatch, AutoTokenizer)
    first, second = models.load_tokenizer(source), models.load_tokenizer(source)
    assert folders == [source.folder, str(kept)]  # the GGUF's metadata once, then the kept copy
    chat = [{"role": "system", "content": "Pick a team."}, {"role": "user", "content": "My card was charged twice"}]
    text = first.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert second.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert "Pick a team." in text and first(text)["input_ids"] == second(text)["input_ids"]
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "vocab_size"):
        assert getattr(first, name) == getattr(second, name), name
    assert first.pad_token is not None

    (kept / "tokenizer.json").write_text("{not json")
    third = models.load_tokenizer(source)
    assert folders[2:] == [str(kept), source.folder]  # the damaged copy failed, the GGUF was read again
    assert third(text)["input_ids"] == first(text)["input_ids"]


def test_the_same_gguf_in_another_checkout_finds_the_kept_copy_and_a_changed_one_does_not(tmp_path, monkeypatch):
    """A fresh clone's virtual environment installs the same GGUF at another path, with another time: its kept
    copy is keyed by the file's bytes, so the dequantising is not paid again; other bytes get their own copy."""
    import shutil
    from dataclasses import replace

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = models.resolve_source(ModelConfig())
    other = tmp_path / "clone" / "site-packages"
    other.mkdir(parents=True)
    copy = other / source.gguf_file
    shutil.copyfile(Path(source.folder) / source.gguf_file, copy)
    moved = replace(source, folder=str(other))
    assert models.dequantized_cache(moved, torch.bfloat16) == models.dequantized_cache(source, torch.bfloat16)
    with copy.open("r+b") as f:  # one byte differs: another model
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert models.dequantized_cache(moved, torch.bfloat16) != models.dequantized_cache(source, torch.bfloat16)
