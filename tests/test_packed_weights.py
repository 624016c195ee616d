"""Packed weights on CPU: every bf16 linear layer of the real default model multiplies by its packed copy while the
local backend decodes, the answers are the plain weights' answers, and nothing stale or foreign is packed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.backends.local import LocalBackend, LocalSettings
from pipeline.backends.packed_weights import packed_linears, packing_supported
from test_local_backend import engineered  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="this CPU's oneDNN has no bf16 kernels: weights are not packed here")

PACKED = torch.ops.mkldnn._linear_pointwise.default
PLAIN = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default}


class Matmuls(TorchDispatchMode):
    """How many packed and plain linear matmuls ran inside the block."""

    def __init__(self):
        super().__init__()
        self.packed = self.plain = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.packed += func is PACKED
        self.plain += func in PLAIN
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model_bf16():
    from pipeline.config import ModelConfig
    from pipeline.models import load_model, resolve_source

    return load_model(resolve_source(ModelConfig()), torch.bfloat16)


def _tiny(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_decoding_runs_every_linear_layer_packed_with_the_plain_weights_answers(model_bf16, tokenizer, engineered):
    renderer, prompts = engineered
    answers, counts = {}, {}
    for packed in (False, True):
        settings = LocalSettings(batch_size=2, max_new_tokens=12, packed_weights=packed)
        backend = LocalBackend(model_bf16, tokenizer, settings, prefix_probe=renderer.prefix_probe())
        backend.run(prompts[:1])  # builds the prefix cache
        passes = []
        hook = model_bf16.get_decoder().register_forward_pre_hook(lambda *_: passes.append(1))
        try:
            with Matmuls() as seen:
                answers[packed] = [c.output for c in backend.run(prompts)]
        finally:
            hook.remove()
        counts[packed] = seen.packed, seen.plain, len(passes)
    assert any(answers[False]) and answers[True] == answers[False]
    linears = sum(type(m) is torch.nn.Linear for m in model_bf16.modules())  # 7 a block x 30, and the output head
    assert linears == 211
    packed, plain, passes = counts[True]
    assert (packed, plain) == (linears * passes, 0)
    assert counts[False][:2] == (0, linears * counts[False][2])
    assert not any("forward" in vars(m) for m in model_bf16.modules())  # the layers' own forward is back


def test_a_weight_changed_in_place_is_packed_again():
    model = _tiny()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(ids).logits
        with packed_linears(model) as layers:
            packed = model(ids).logits
        assert layers == 2 * 7 + 1 and torch.equal(packed, plain)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(-2)  # what a merge or an optimizer step does
        changed = model(ids).logits
        with packed_linears(model):
            assert torch.equal(model(ids).logits, changed) and not torch.equal(changed, plain)


def test_fp32_and_int8_layers_are_left_as_they_are():
    from pipeline.models import quantize_int8

    fp32 = _tiny(torch.float32)
    assert not packing_supported(fp32)
    with packed_linears(fp32) as layers:
        assert layers == 0
    bf16 = _tiny()
    assert packing_supported(bf16)
    int8 = quantize_int8(bf16)
    with packed_linears(int8) as layers:
        assert layers == 0  # torchao's int8 weights keep their own kernel
