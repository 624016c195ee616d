"""fp32 LoRA adapters on a bf16 base, trained on CPU: their matmuls run in bf16, forward and backward, while
their weights and gradients stay fp32 and agree with peft's fp32 computation to bf16 precision."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.training.adapter_matmuls import adapter_matmuls_in_input_dtype

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of every matmul that runs inside the block."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                           autocast_adapter_dtype=True)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter's is not
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    with MatmulDtypes() as seen:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, seen.dtypes


def test_adapters_compute_in_bf16_with_the_same_loss_and_fp32_gradients(lora_model):
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    loss, grads, dtypes = _loss_and_grads(lora_model, ids)
    assert torch.float32 in dtypes  # peft's own layers: the adapters' matmuls in fp32

    with adapter_matmuls_in_input_dtype(lora_model) as layers:
        fast_loss, fast_grads, fast_dtypes = _loss_and_grads(lora_model, ids)
    assert layers == 2 * 7  # every linear layer of both blocks
    assert set(fast_dtypes) == {torch.bfloat16} and len(fast_dtypes) == len(dtypes)
    assert torch.allclose(fast_loss, loss, rtol=1e-2)
    for name, grad in grads.items():
        assert fast_grads[name].dtype == torch.float32, name
        scale = grad.abs().max()
        assert (fast_grads[name] - grad).abs().max() <= 0.05 * scale, name

    # Out of the block, peft's layers are back: the same loss and gradients as before, bit for bit.
    again, again_grads, again_dtypes = _loss_and_grads(lora_model, ids)
    assert torch.equal(again, loss) and again_dtypes == dtypes
    assert all(torch.equal(again_grads[n], g) for n, g in grads.items())


def test_a_merged_adapter_is_left_to_peft(lora_model):
    from peft.tuners.lora import Linear

    layer = next(m for m in lora_model.modules() if isinstance(m, Linear))
    layer.merge()
    try:
        with adapter_matmuls_in_input_dtype(lora_model) as layers:
            assert layers == 2 * 7 - 1 and "forward" not in vars(layer)
    finally:
        layer.unmerge()
