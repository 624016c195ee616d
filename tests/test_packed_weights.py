"""Packed weights on CPU: every linear layer of the real default model multiplies by its packed copy while the
local backend decodes (in fp32, and in bf16 where this CPU's oneDNN has bf16 kernels), the answers are the plain
weights' answers, and nothing stale or foreign is packed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.backends.local import LocalBackend, LocalSettings
from pipeline.backends.decoding.packed_weights import PackedWeights, packing_supported
from test_local_backend import engineered  # noqa: F401  (fixture)

BF16_KERNELS = torch.ops.mkldnn._is_mkldnn_bf16_supported()
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_KERNELS, reason="this CPU's oneDNN has no bf16 kernels: bf16 weights are not packed here"))]

PACKED = torch.ops.mkldnn._linear_pointwise.default
PACKING = torch.ops.mkldnn._reorder_linear_weight.default
PLAIN = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default}
INT8_DIRECT = torch.ops.aten._weight_int8pack_mm.default


class Matmuls(TorchDispatchMode):
    """How many packed, plain and int8-direct linear matmuls ran inside the block, and how many weights were
    packed."""

    def __init__(self):
        super().__init__()
        self.packed = self.plain = self.packings = self.direct = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.packed += func is PACKED
        self.plain += func in PLAIN
        self.packings += func is PACKING
        self.direct += func is INT8_DIRECT
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=DTYPES, ids=["fp32", "bf16"])
def model(request, model_fp32):
    from pipeline.experiment.config import ModelConfig
    from pipeline.models.loading import load_model, resolve_source

    return model_fp32 if request.param == torch.float32 else load_model(resolve_source(ModelConfig()), request.param)


def _tiny(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_decoding_runs_every_linear_layer_packed_with_the_plain_weights_answers(model, tokenizer, engineered):
    renderer, prompts = engineered
    answers, counts = {}, {}
    for packed in (False, True):
        settings = LocalSettings(batch_size=2, max_new_tokens=12, packed_weights=packed)
        backend = LocalBackend(model, tokenizer, settings, prefix_probe=renderer.prefix_probe())
        backend.run(prompts[:1])  # builds the prefix cache (and packs the weights)
        passes = []
        hook = model.get_decoder().register_forward_pre_hook(lambda *_: passes.append(1))
        try:
            with Matmuls() as seen:
                answers[packed] = [c.output for c in backend.run(prompts)]
        finally:
            hook.remove()
        counts[packed] = seen.packed, seen.plain, len(passes), seen.packings
        assert (backend.packed is not None) == packed
        backend.close()
        assert not packed or backend.packed.layers_kept == 0  # the packed copies go with the backend
    assert any(answers[False]) and answers[True] == answers[False]
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())  # 7 a block x 30, and the output head
    assert linears == 211
    packed, plain, passes, packings = counts[True]
    assert (packed, plain, packings) == (linears * passes, 0, 0)  # packed once, by the first run
    assert counts[False][:2] == (0, linears * counts[False][2])
    assert not any("forward" in vars(m) for m in model.modules())  # the layers' own forward is back


def _same(packed: torch.Tensor, plain: torch.Tensor) -> bool:
    """bf16: the same bits. fp32: oneDNN's sums differ from MKL's in the last bits (a relative ~1e-6)."""
    if packed.dtype == torch.bfloat16:
        return torch.equal(packed, plain)
    return torch.allclose(packed, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_weight_changed_in_place_or_replaced_is_packed_again_and_an_error_restores_the_layers(dtype):
    model = _tiny(dtype)
    packed = PackedWeights()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    down = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        plain = model(ids).logits
        with packed.applied(model) as layers:
            assert layers == 2 * 7 + 1 and _same(model(ids).logits, plain)
        with torch.no_grad():
            down.weight.mul_(-2)  # what an optimizer step does
        changed = model(ids).logits
        with packed.applied(model):
            assert _same(model(ids).logits, changed) and not _same(changed, plain)
        down.weight = torch.nn.Parameter(down.weight.detach() * 3)
        replaced = model(ids).logits
        with packed.applied(model):
            assert _same(model(ids).logits, replaced) and not _same(replaced, changed)
        with pytest.raises(RuntimeError), packed.applied(model):
            raise RuntimeError("a failed pass")
    assert not any("forward" in vars(m) for m in model.modules())


def test_fp16_layers_are_left_as_they_are_and_no_copy_is_packed_where_it_would_not_fit(monkeypatch):
    from pipeline.backends.decoding import packed_weights

    fp16 = _tiny(torch.float16)  # oneDNN has no packed fp16 linear on CPU
    assert not packing_supported(fp16)
    with PackedWeights().applied(fp16) as layers:
        assert layers == 0
    fp32 = _tiny(torch.float32)
    weights = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(packed_weights, "_available_memory", lambda: 2 * weights)
    assert packing_supported(fp32)
    monkeypatch.setattr(packed_weights, "_available_memory", lambda: 2 * weights - 4)
    assert not packing_supported(fp32)  # a second copy would take over half of what is left


@pytest.mark.skipif(not BF16_KERNELS, reason="torchao's int8 layers run in bf16; this CPU has no bf16 kernels")
def test_int8_layers_multiply_by_their_int8_weight_at_a_few_rows_and_by_torchaos_path_beyond():
    from pipeline.backends.decoding.packed_weights import INT8_DIRECT_ROWS
    from pipeline.models.loading import quantize_int8

    int8 = quantize_int8(_tiny())
    generator = torch.Generator().manual_seed(2)
    few = torch.randint(0, 96, (2, INT8_DIRECT_ROWS // 2), generator=generator)  # 8 rows into each layer
    many = torch.randint(0, 96, (2, INT8_DIRECT_ROWS), generator=generator)
    with torch.inference_mode():
        torchao_few, torchao_many = int8(few).logits, int8(many).logits
        with PackedWeights().applied(int8) as layers, Matmuls() as seen:
            direct_few = int8(few).logits
            calls_few = seen.direct
            direct_many = int8(many).logits
    assert layers == 2 * 7 + 1 and calls_few == layers and seen.direct == calls_few  # none for the 16 rows
    assert torch.equal(direct_many, torchao_many)
    # The same int8 weights and scales; the scale meets the fp32 sums rather than their bf16 rounding.
    assert (direct_few.float() - torchao_few.float()).abs().max() < 0.01 < torchao_few.float().std()
    assert not any("forward" in vars(m) for m in int8.modules())
