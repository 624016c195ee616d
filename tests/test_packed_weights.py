"""Packed weights on CPU: every bf16 linear layer of the real default model multiplies by its packed copy while the
local backend decodes, the answers are the plain weights' answers, and nothing stale or foreign is packed."""

import gc
import weakref

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
    layer = weakref.ref(model.lm_head)
    del model
    assert _gone(layer)


def _gone(layer: weakref.ref) -> bool:
    """Whether a layer is gone once nothing else holds its model: the fast forward kept for it must not keep it
    (and its packed copy) alive; each arm's model is freed after the arm."""
    gc.collect()
    return layer() is None


def test_fp32_layers_are_left_as_they_are():
    fp32 = _tiny(torch.float32)
    assert not packing_supported(fp32)
    with packed_linears(fp32) as layers:
        assert layers == 0
    assert packing_supported(_tiny())


class Int8Matmuls(TorchDispatchMode):
    """How many int8 matmuls ran on the int8 weight directly."""

    def __init__(self):
        super().__init__()
        self.direct = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.direct += func is torch.ops.aten._weight_int8pack_mm.default
        return func(*args, **(kwargs or {}))


def test_int8_layers_multiply_by_their_int8_weight_at_a_few_rows_and_by_torchaos_path_beyond():
    from pipeline.backends.packed_weights import INT8_DIRECT_ROWS
    from pipeline.models import quantize_int8

    int8 = quantize_int8(_tiny())
    generator = torch.Generator().manual_seed(2)
    few = torch.randint(0, 96, (2, INT8_DIRECT_ROWS // 2), generator=generator)  # 8 rows into each layer
    many = torch.randint(0, 96, (2, INT8_DIRECT_ROWS), generator=generator)
    with torch.inference_mode():
        torchao_few, torchao_many = int8(few).logits, int8(many).logits
        with packed_linears(int8) as layers, Int8Matmuls() as seen:
            direct_few = int8(few).logits
            calls_few = seen.direct
            direct_many = int8(many).logits
    assert layers == 2 * 7 + 1 and calls_few == layers and seen.direct == calls_few  # none for the 16 rows
    assert torch.equal(direct_many, torchao_many)
    # The same int8 weights and scales; the scale meets the fp32 sums rather than their bf16 rounding.
    assert not torch.equal(direct_few, torchao_few)
    assert (direct_few.float() - torchao_few.float()).abs().max() < 0.01 < torchao_few.float().std()
    assert not any("forward" in vars(m) for m in int8.modules())
    layer = weakref.ref(int8.lm_head)
    del int8
    assert _gone(layer)
