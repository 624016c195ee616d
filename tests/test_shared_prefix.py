"""Shared-prefix attention: the log-sum-exp merge is softmax attention over prefix + suffix, generation on the real
model gives the plain path's predictions, and the prefix's memory does not grow with the batch."""

import pytest
import torch

from pipeline.backends.local import LocalBackend, LocalSettings
from pipeline.backends.decoding.shared_prefix import SharedPrefixCache, SharedPrefixLayer, _merged_attention
from test_local_backend import engineered, generate_calls  # noqa: F401  (fixture)


def _reference(query, keys, values, mask, scaling):
    """Plain softmax attention over the concatenated keys, heads repeated for grouped-query attention."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = query @ keys.transpose(-1, -2) * scaling + mask
    return (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash-kernel", "matmuls"])
@pytest.mark.parametrize("q_len", [1, 5])  # a decoding step, and a prefill of the suffixes
def test_the_merge_is_softmax_attention_over_prefix_and_suffix(q_len, fused):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, prefix, suffix = 3, 6, 2, 8, 11, 7
    query = torch.randn(batch, heads, q_len, dim, dtype=torch.float64)
    prefix_k, prefix_v = torch.randn(1, kv_heads, prefix, dim), torch.randn(1, kv_heads, prefix, dim)
    keys, values = torch.randn(batch, kv_heads, suffix, dim), torch.randn(batch, kv_heads, suffix, dim)
    prefix_k, prefix_v, keys, values = (t.double() for t in (prefix_k, prefix_v, keys, values))
    # Row 1 has two padding tokens at the start of its suffix; causal within the suffix's last q_len positions.
    allowed = torch.ones(batch, 1, q_len, prefix + suffix, dtype=torch.bool)
    allowed[1, :, :, prefix : prefix + 2] = False
    for i in range(q_len):
        allowed[:, :, i, prefix + suffix - q_len + i + 1 :] = False
    allowed[2, :, 0, prefix:] = False  # a query that sees no suffix key at all (a padding row of a prefill)
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    layer = SharedPrefixLayer(prefix_k, prefix_v)
    merged = _merged_attention(query, layer, keys, values, mask, scaling=0.3, fused=fused)
    expected = _reference(query, torch.cat([prefix_k.expand(batch, -1, -1, -1), keys], 2),
                          torch.cat([prefix_v.expand(batch, -1, -1, -1), values], 2), mask, 0.3)
    assert merged.shape == (batch, q_len, heads, dim)
    assert torch.allclose(merged, expected, atol=1e-10)


def test_shared_prefix_generation_gives_the_plain_and_copied_cache_predictions(model_fp32, tokenizer, engineered):
    renderer, prompts = engineered
    plain = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=16).calls
    assert any(c.output for c in plain)
    assert len({c.completion_tokens for c in plain}) > 1  # answers that end apart, so rows join a running batch
    for shared in (True, False):
        settings = LocalSettings(batch_size=2, max_new_tokens=16, shared_prefix=shared)
        backend = LocalBackend(model_fp32, tokenizer, settings, prefix_probe=renderer.prefix_probe())
        backend.run(prompts[:1])  # builds the prefix cache
        passes = []
        hook = model_fp32.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        try:
            calls = backend.run(prompts)
        finally:
            hook.remove()
        assert [c.output for c in calls] == [c.output for c in plain], f"shared_prefix={shared}"
        assert all(c.cached_tokens > 100 for c in calls)
        # A prompt joined rows that were mid-answer: a decoding step ran more rows than the prefill before it.
        assert any(rows > prefill[0] for prefill, (rows, width) in zip(passes, passes[1:])
                   if prefill[1] > 1 and width == 1), (shared, passes)
    # The model's own attention is back after generation.
    assert model_fp32.config._attn_implementation != "roi_shared_prefix"


def test_the_prefix_is_held_once_whatever_the_batch(model_fp32, tokenizer, engineered):
    """Cache memory at batch 64 vs 8: the prefix stays at batch 1; only the rows' own suffix tokens grow."""
    renderer, prompts = engineered
    sizes = {}

    def record(_module, _args, kwargs, _output):  # the cache after the first forward pass (the prefill) at each batch size
        cache = kwargs["cache"]
        layer = cache.layers[0]
        if isinstance(cache, SharedPrefixCache) and layer.keys.shape[0] not in sizes:
            sizes[layer.keys.shape[0]] = (
                sum(t.numel() for la in cache.layers for t in (la.prefix_keys, la.prefix_values)),
                sum(t.numel() for la in cache.layers for t in (la.keys, la.values)),
                layer.keys.shape[2], layer.prefix_keys.shape[0])

    hook = model_fp32.get_decoder().register_forward_hook(record, with_kwargs=True)
    try:
        for batch in (8, 64):
            settings = LocalSettings(batch_size=batch, max_new_tokens=3, shared_prefix=True)
            backend = LocalBackend(model_fp32, tokenizer, settings, prefix_probe=renderer.prefix_probe())
            backend.run((prompts * 11)[:batch])
    finally:
        hook.remove()
    prefix_8, suffix_8, width_8, rows_8 = sizes[8]
    prefix_64, suffix_64, width_64, rows_64 = sizes[64]
    assert rows_8 == rows_64 == 1 and prefix_64 == prefix_8  # one copy of the prefix at any batch size
    prefix_tokens = renderer.static_prefix_tokens()
    assert width_64 < prefix_tokens / 4  # the rows hold their suffix and answer, not the prefix
    # Per row and token, the suffix costs what the prefix costs per token: 64 rows of ~40 tokens, not 64 x 700.
    per_token = prefix_64 / prefix_tokens
    assert suffix_64 == pytest.approx(64 * width_64 * per_token, rel=0.02)
    # A copy of the prefix per row (the copying cache) would hold 64 x the prefix, plus the same suffixes.
    assert prefix_64 + suffix_64 < (64 * prefix_64 + suffix_64) / 5


def test_models_whose_attention_it_does_not_compute_keep_the_copying_cache():
    from transformers import LlamaConfig, MistralConfig

    from pipeline.backends.decoding.shared_prefix import fits

    assert fits(LlamaConfig())
    assert not fits(MistralConfig(sliding_window=4096))
    soft = LlamaConfig()
    soft.attn_logit_softcapping = 50.0
    assert not fits(soft)
    mixed = LlamaConfig()
    mixed.layer_types = ["full_attention", "sliding_attention"]
    assert not fits(mixed)
