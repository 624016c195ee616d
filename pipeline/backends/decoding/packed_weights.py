"""Local decoding on CPU with linear kernels fit for a few rows: weights packed once for oneDNN, int8 direct.

A plain `F.linear` on a CPU tensor hands MKL (fp32) or oneDNN (bf16) the row-major weight on every call. At the
row counts decoding runs (1 to 64) each matmul is bound by reading its weight. A copy packed once in oneDNN's
blocked layout (what torch.compile's CPU freezing pass builds: `mkldnn._reorder_linear_weight`, then
`mkldnn._linear_pointwise`) reads it faster: in bf16 with the same bits, in fp32 with sums in another order than
MKL's (logits differ in the last bits). The figures, measured alternating in one process on the default model's
shapes, are in the README ("How each number is measured") and `bench/prompt_arm.py`'s output.
Inference only (the packed op has no backward), and bf16 only on CPUs whose oneDNN has bf16 kernels. The packed
copies double the weights in memory while a `PackedWeights` holds them (a backend, until it closes).

torchao's int8 weight-only layers cast the whole int8 weight to bf16 on every call, then multiply: at a few rows
that is slower than bf16, the opposite of what int8 weights are for. At up to `INT8_DIRECT_ROWS` rows they
multiply by the int8 weight directly (`aten._weight_int8pack_mm`, torch's CPU kernel for int8 weight-only
matmuls); beyond the measured crossover torchao's path stays. The same weights and scales; the scale is applied to
the fp32 sums rather than to their bf16 rounding, so outputs differ from torchao's by bf16 rounding. bf16 only:
with fp32 inputs that kernel was slower than torchao's path.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Any, Callable, ContextManager

import torch

from pipeline.models.replaced_forwards import forwards_replaced

# Rows up to which an int8 layer multiplies by its int8 weight directly (below the measured crossover).
INT8_DIRECT_ROWS = 8
# Packed copies double a model's weights in memory while they are held: only when that fits in this
# share of the memory available.
MEMORY_SHARE = 0.5


def packing_supported(model: Any) -> bool:
    """Whether `model` runs on CPU in fp32, or in bf16 where oneDNN has bf16 kernels, and a packed copy of its
    weights fits in memory: where packed weights apply."""
    if not (model.device.type == "cpu" and torch.backends.mkldnn.is_available() and _packable_dtype(model.dtype)):
        return False
    weights = sum(m.weight.nbytes for m in model.modules() if _identity(m) and _plain_float(m.weight))
    return weights <= MEMORY_SHARE * _available_memory()


def _packable_dtype(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_kernels())


@cache
def _bf16_kernels() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels: asked once, not for every layer on every pass. Not what
    `dtype: auto` picks by (`models.dtype`: which dtype is faster here, measured): oneDNN has bf16 kernels from
    AVX-512 on, native or not, so a model a user put in bf16 there is packed too."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _available_memory() -> float:
    """Bytes of memory available without swapping (free memory and what the page cache would give up)."""
    import psutil

    return psutil.virtual_memory().available


def _plain_float(weight: Any) -> bool:
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and _packable_dtype(weight.dtype)


def _int8_per_row(weight: Any) -> bool:
    """torchao's int8 weight-only, per-row, symmetric weight (what `models.quantize_int8` makes)."""
    if type(weight).__name__ != "Int8Tensor":
        return False
    qdata = weight.qdata
    return (qdata.dim() == 2 and weight.dtype == torch.bfloat16 and weight.act_quant_kwargs is None
            and weight.act_pre_scale is None and list(weight.block_size) == [1, qdata.shape[1]]
            and (weight.zero_point is None or not weight.zero_point.any()))


def _identity(module: Any) -> tuple | None:
    """What the layer's fast forward is made from, or None for a layer left as it is: not a plain CPU linear
    layer (a subclass, a peft layer), another dtype or quantization, or a forward something else replaced."""
    weight = getattr(module, "weight", None)
    if type(module) is not torch.nn.Linear or "forward" in vars(module) or weight.device.type != "cpu":
        return None
    data = weight.qdata if _int8_per_row(weight) else weight if _plain_float(weight) else None
    if data is None:
        return None
    # An in-place change to the parameter (an optimizer step) bumps its version; inference tensors have none.
    version = None if data.is_inference() else data._version
    return type(weight).__name__, id(weight), data.data_ptr(), version, tuple(data.shape), id(module.bias)


def _fast_forward(module: torch.nn.Linear) -> Callable:
    weight, bias = module.weight, module.bias
    if _plain_float(weight):
        return partial(_packed_forward, torch.ops.mkldnn._reorder_linear_weight(weight.detach()), weight, bias)
    scales = weight.scale.reshape(-1).to(torch.bfloat16)
    return partial(_int8_forward, weight.qdata.contiguous(), scales, weight, bias)


def _packed_forward(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    x: torch.Tensor) -> torch.Tensor:
    if x.dtype != weight.dtype or torch.is_grad_enabled():  # the packed op has no backward
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _int8_forward(qdata: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
    if x.numel() > INT8_DIRECT_ROWS * x.shape[-1] or x.dtype != torch.bfloat16:
        return torch.nn.functional.linear(x, weight, bias)  # torchao's own path
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), qdata, scales)
    y = y.reshape(*x.shape[:-1], qdata.shape[0])
    return y if bias is None else y + bias


class PackedWeights:
    """The fast forwards of one model's layers, made on first use and kept while the holder lives (a backend,
    or a server's backends on one model) and each layer's weight stays the same parameter, unchanged in place.
    Weights changed behind autograd's back (`weight.data += ...`, as peft's merge does) are not seen: make a
    new holder after changing a model's weights that way. `clear()` frees the packed copies."""

    def __init__(self):
        self._kept: dict[torch.nn.Linear, tuple[tuple, Callable]] = {}

    def applied(self, model: Any) -> ContextManager[int]:
        """Within the block (inference only), every plain fp32 or bf16 linear layer of `model` multiplies by a packed
        copy of its weight, and every torchao int8 one, at a few rows, by its int8 weight directly; yields how
        many layers do either. Their own forward comes back on exit, so training, merging, copying and saving
        never see the packed copies."""
        return forwards_replaced((module, self._forward(module, identity)) for module in model.modules()
                                 if (identity := _identity(module)) is not None)

    def _forward(self, module: torch.nn.Linear, identity: tuple) -> Callable:
        """The layer's kept fast forward, made again if its weight is not the one it was made from."""
        kept = self._kept.get(module)
        if kept is None or kept[0] != identity or identity[3] is None:
            kept = self._kept[module] = identity, _fast_forward(module)
        return kept[1]

    @property
    def layers_kept(self) -> int:
        """How many layers have a fast forward kept."""
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
