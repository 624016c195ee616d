"""The dependency floors in pyproject.toml are the versions the code needs, and a too-old library fails loudly."""

import re
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_every_dependency_has_a_floor_that_this_environment_meets():
    for req in _requirements():
        floors = [s for s in req.specifier if s.operator == ">="]
        assert floors, f"{req.name}: no >= floor"
        installed = Version(version(req.name))
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is below {req.specifier}"


# Where a floor comes from: the API the code calls that older releases lack or ignore.
NEEDED = {
    "transformers": ("5.24", "generate()/forward take the KV cache as `cache=` (older 5.x ignore it)"),
    "scipy": ("1.15", "scipy.stats.bootstrap(rng=...)"),
    "torchao": ("0.18", "the int8 weight-only config the int8 arm uses"),
    "datasketch": ("2.0", "MinHash(scheme='affine32') for the near-duplicate sketches"),
    "trl": ("1.15", "SFTTrainer scores through a fused LM head (`fused_lm_head=True`), which completion_head "
                    "replaces on CPU"),
    "torch": ("2.4", "aten._scaled_dot_product_flash_attention_for_cpu with attn_mask, returning the log-sum-exp"),
}


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_the_floor_is_at_least_the_release_with_the_api_the_code_calls(name):
    floor = next(Version(s.version) for r in _requirements() if r.name == name for s in r.specifier if s.operator == ">=")
    assert floor >= Version(NEEDED[name][0]), f"{name}>={floor}, but the code needs {NEEDED[name]}"


def test_transformers_before_5_24_fails_with_one_line_instead_of_crashing_later():
    """What 5.17-5.23 did: the forward pass ignored `cache=`, the prefix cache stayed empty and the next call crashed
    deep in attention. Simulated by a model whose forward drops the argument; the real one fills the cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.backends.local import PrefixCache
    from pipeline.models.loading import ModelError

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    assert PrefixCache(model, list(range(10))).cache.get_seq_length() == 10  # this environment: filled
    forward = model.forward
    model.forward = lambda *args, cache=None, **kwargs: forward(*args, **kwargs)  # the old behaviour
    with pytest.raises(ModelError, match=re.escape("(need >= 5.24)")):
        PrefixCache(model, list(range(10)))
