"""LoRA adapters computed in the base model's bf16 while their weights, gradients and optimizer stay fp32.

On a GPU the Trainer's autocast already runs the adapters' matmuls in bf16. On CPU there is no autocast (the
base weights are bf16 already, and autocast would add a cast to every other op), so peft casts each layer's
input to fp32 and runs the adapter's two skinny matmuls, forward and backward, in fp32: a sizeable share of a
step for the default model, plus the casts (bench/train.py). Here each adapter's weights are cast to bf16 instead
(16 x 576 and 1536 x 16 values, not the batch's activations), as autocast would: the gradients still reach
the fp32 weights through the cast, so the optimizer's small updates do not round away.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ContextManager, Iterator

import torch
import torch.nn.functional as F

from pipeline.models.replaced_forwards import forwards_replaced


def _plain_lora(module: Any) -> bool:
    """A peft LoRA linear layer with one active, unmerged, plain adapter (no DoRA or other variant, no LoRA bias)
    whose forward nothing else has replaced (accelerate's offloading hooks do)."""
    from peft.tuners.lora import Linear

    if not isinstance(module, Linear) or module.merged or module.disable_adapters or module.fan_in_fan_out:
        return False
    active = module.active_adapters
    return (len(active) == 1 and active[0] in module.lora_A and active[0] not in module.lora_variant
            and not module.lora_bias.get(active[0], False) and "forward" not in vars(module)
            and isinstance(module.base_layer, torch.nn.Linear))


def _forward(base: Any, down: Any, up: Any, dropout: Any, scaling: float, x: torch.Tensor, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    result = base(x, *args, **kwargs)
    # The scaling goes on the rank-r activations, not on the layer-wide output.
    hidden = F.linear(dropout(x), down.weight.to(x.dtype)) * scaling
    return result + F.linear(hidden, up.weight.to(x.dtype))


def adapter_matmuls_in_input_dtype(model: Any) -> ContextManager[int]:
    """Within the block, every plain LoRA linear layer of `model` computes its adapter in its input's dtype;
    yields how many layers do. Their own forward comes back on exit (a merge or a save sees peft's layers).
    The adapter, its scaling and dropout are read on entry: the block is for training, which changes none."""

    def replacements() -> Iterator[tuple[Any, Any]]:
        for module in model.modules():
            if _plain_lora(module):
                name = module.active_adapters[0]
                yield module, partial(_forward, module.base_layer, module.lora_A[name], module.lora_B[name],
                                      module.lora_dropout[name], module.scaling[name])

    return forwards_replaced(replacements())
