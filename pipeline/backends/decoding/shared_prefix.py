"""Shared-prefix attention for a batch of prompts that start with the same prefix (Hydragen; cascade inference).

Every prompt of a prompt arm starts with the same system text, label list and few-shot examples
(hundreds of tokens) and ends with its own short message. A plain KV cache holds the prefix once per
batch row and copies all of it on every decoding step (`torch.cat` onto the cache), which on this CPU
took half of the wall time. Here the prefix's keys and values are computed once, at batch 1, and never
copied: in each layer the batch's queries attend to them in one matmul (batch and grouped heads folded
into the query length, no mask, since every row sees the whole prefix), and to each row's own suffix
keys (with the causal and padding mask). The two partial results are merged by their log-sum-exp,
as vLLM's `merge_attn_states` and FlashInfer's `merge_state` do:

    out = (out_p * exp(lse_p - m) + out_s * exp(lse_s - m)) / (exp(lse_p - m) + exp(lse_s - m)),  m = max(lse_p, lse_s)

which is exactly softmax attention over the concatenated keys. It plugs into transformers through
`AttentionInterface` / `AttentionMaskInterface` and a cache whose layers keep the suffix only.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

IMPLEMENTATION = "roi_shared_prefix"
_ACTIVE: ContextVar["SharedPrefixCache | None"] = ContextVar("roi_shared_prefix_cache", default=None)


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache: the prefix's keys and values at batch 1 (read, never copied) and each row's suffix."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_length = prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class SharedPrefixCache(Cache):
    """The cache a batch decodes on: positions and masks count the prefix; `update` returns the suffix only."""

    def __init__(self, prefix: Cache):
        super().__init__(layers=[SharedPrefixLayer(layer.keys, layer.values) for layer in prefix.layers])


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            scaling: float, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` [N, H, q, D] over `keys` [N, H, k, D] with an additive `mask`
    [N, 1, q, k]: the output and the log-sum-exp of the scores [N, H, q, 1], in at least fp32.

    On CPU (`fused` None or True) both come from torch's flash-attention kernel for CPU, the one
    `scaled_dot_product_attention` runs there, called directly because it also returns the log-sum-exp:
    4x faster than the matmuls below at a prefill. It is CPU-only, so elsewhere (`fused` None or False)
    the matmuls run, with the softmax at least in fp32 as eager attention does.
    """
    exact = torch.promote_types(query.dtype, torch.float32)
    if fused or (fused is None and query.device.type == "cpu"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, attn_mask=None if mask is None else mask.to(query.dtype), scale=scaling)
        return out.to(exact), lse.unsqueeze(-1).to(exact)
    scores = torch.matmul(query, keys.transpose(-1, -2)).to(exact) * scaling
    if mask is not None:
        scores = scores + mask.to(exact)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(values.dtype), values).to(exact), lse


def _merged_attention(query: torch.Tensor, layer: SharedPrefixLayer, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None, scaling: float, fused: bool | None = None) -> torch.Tensor:
    """Softmax attention of `query` [B, H, q, D] over the prefix then the suffix `keys` [B, KV, S, D]; [B, q, H, D]."""
    batch, heads, q_len, dim = query.shape
    kv_heads, suffix = keys.shape[1], keys.shape[2]
    group = heads // kv_heads  # query heads sharing one key/value head (grouped-query attention)
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)
    # Prefix: every row and grouped head as extra query rows of one attention per key/value head.
    rows = grouped.transpose(0, 1).reshape(1, kv_heads, batch * group * q_len, dim)
    out_p, lse_p = _attend(rows, layer.prefix_keys, layer.prefix_values, None, scaling, fused)
    out_p = out_p.reshape(kv_heads, batch, group * q_len, dim).transpose(0, 1)
    lse_p = lse_p.reshape(kv_heads, batch, group * q_len, 1).transpose(0, 1)
    # Suffix: each row's own keys, under the causal and padding mask (its last `suffix` columns), the same
    # for every query head of a group.
    mask = None if mask is None else mask[..., -suffix:].repeat(1, 1, group, 1)
    out_s, lse_s = _attend(grouped, keys, values, mask, scaling, fused)
    # Merge by log-sum-exp: the prefix's share of the softmax mass is exp(lse_p) / (exp(lse_p) + exp(lse_s)) =
    # sigmoid(lse_p - lse_s), and the output moves that far from the suffix's towards the prefix's (three ops
    # where the weighted sum in the module docstring takes ten, each run per layer and step).
    out = torch.lerp(out_s, out_p, torch.sigmoid(lse_p - lse_s))
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype)


def shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls in each layer while a `SharedPrefixCache` is active."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(f"attn_implementation={IMPLEMENTATION!r} is only for generation on a shared prefix")
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # plain softmax attention only; `fits` keeps such models on the copying cache
        raise RuntimeError(f"shared-prefix attention does not compute {', '.join(unsupported)}")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    return _merged_attention(query, cache.layers[module.layer_idx], key, value, attention_mask, scaling), None


AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
# An additive float mask over prefix + suffix columns; the attention reads only the suffix's.
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def fits(config: Any) -> bool:
    """Whether the model's attention is plain softmax over every earlier token, all this module computes:
    no sliding window, logit soft-capping or attention sinks, and values as wide as keys."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    head_dim = getattr(config, "head_dim", None)
    return (all(t == "full_attention" for t in layer_types) and not getattr(config, "sliding_window", None)
            and not getattr(config, "attn_logit_softcapping", None) and not getattr(config, "use_sinks", False)
            and getattr(config, "v_head_dim", head_dim) == head_dim)


@contextmanager
def attending_shared_prefix(model: Any, cache: SharedPrefixCache):
    """Run the model with shared-prefix attention on the prefix `cache` holds (any `SharedPrefixCache` made from
    the same prefix can be passed to the model meanwhile); the model's own attention comes back afterwards."""
    previous = model.config._attn_implementation
    token = _ACTIVE.set(cache)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        yield cache
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
