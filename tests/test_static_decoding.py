"""Decoding in fixed waves over a static cache (the GPU path, a CUDA graph per step there) gives the answers of
the continuous-batching path; on CPU the same steps run without a graph. The real default model, fp32."""

import pytest
import torch

from pipeline.backends.decoding.greedy import greedy_answers
from pipeline.backends.local import LocalBackend, LocalSettings, stop_token_ids
from pipeline.backends.decoding.static_cache import StaticDecoder, greedy_answers_static
from test_decoding import MESSAGES, MORE_MESSAGES, _prompts
from test_local_backend import engineered  # noqa: F401 (fixture)


def _backend(model, tokenizer, renderer, batch_size, static, labels=None, max_new_tokens=8):
    settings = LocalSettings(batch_size, max_new_tokens, prefix_cache=renderer is not None, labels=labels,
                             static_decoding=static)
    return LocalBackend(model, tokenizer, settings, prefix_probe=renderer.prefix_probe() if renderer else None)


@pytest.mark.parametrize("rows", [3, 8])  # waves of 3, 3, 2 (a spare row) and one wave of all 8
def test_waves_answer_what_continuous_batching_answers(model_fp32, tokenizer, rows):
    stop = stop_token_ids(model_fp32, tokenizer)
    prompts = _prompts(tokenizer, MESSAGES + MORE_MESSAGES)  # answers of 1 to 20 tokens, prompts of several lengths
    expected = greedy_answers(model_fp32, prompts, 20, stop, batch_size=4, pad_id=stop[0])
    decoder = StaticDecoder(model_fp32, rows, length=128)
    reported = []
    answers = greedy_answers_static(decoder, prompts, 20, stop, lambda start, done: reported.extend(
        range(start, start + len(done))))
    assert [a.tokens for a in answers] == [a.tokens for a in expected]
    assert len({len(a.tokens) for a in answers}) > 2  # rows finished at different steps within a wave
    assert reported == list(range(len(prompts)))  # every answer handed over once, in prompt order
    assert all(a.finished_at >= a.admitted_at for a in answers)


def test_the_prefix_is_copied_once_and_answers_do_not_change(model_fp32, tokenizer, engineered):  # noqa: F811
    renderer, prompts = engineered
    plain = _backend(model_fp32, tokenizer, renderer, 4, static=False).run(prompts)
    static = _backend(model_fp32, tokenizer, renderer, 4, static=True)
    widths = []
    hook = model_fp32.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        calls = static.run(prompts)
    finally:
        hook.remove()
    assert [c.output for c in calls] == [c.output for c in plain]
    assert any(c.output for c in calls)
    prefix = static.prefix_tokens
    assert prefix > 100
    # the prefix ran once (its cache), then each wave's prefill ran only the suffixes
    longest_suffix = max(len(static.encode(p)) for p in prompts) - prefix
    assert widths[0] == prefix and max(widths[1:]) <= longest_suffix


def test_constrained_waves_answer_labels_like_the_plain_path(model_fp32, tokenizer, engineered):  # noqa: F811
    from pipeline.task.prompts import Prompt

    renderer, prompts = engineered
    labels = [label.name for label in renderer.labels]
    # Raw text too, with no instruction: only the constraint makes its answers labels.
    bare = [Prompt(text=t) for t in ["My card was charged twice", "The app crashes when I log in", "Where is it"]]
    for texts, prefix in ((prompts, renderer), (bare, None)):
        plain = _backend(model_fp32, tokenizer, prefix, 3, static=False, labels=labels).run(texts)
        static = _backend(model_fp32, tokenizer, prefix, 3, static=True, labels=labels).run(texts)
        assert [c.output for c in static] == [c.output for c in plain]
        assert all(c.output in labels for c in static)


def test_a_later_pass_reuses_the_decoder_unless_it_needs_more_room(model_fp32, tokenizer, engineered):  # noqa: F811
    renderer, prompts = engineered
    backend = _backend(model_fp32, tokenizer, renderer, 4, static=True)
    backend.run(prompts)
    first = backend._static[4]
    backend.run(prompts[:2])
    assert backend._static[4] is first
    assert [c.output for c in backend.run(prompts[:2], max_new_tokens=first.length)] is not None
    assert backend._static[4] is not first and backend._static[4].length > first.length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_answer_what_eager_steps_answer(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config(tokenizer)).to("cuda").eval()
    stop = [tokenizer.eos_token_id]
    prompts = _prompts(tokenizer, MESSAGES + MORE_MESSAGES)
    eager = greedy_answers_static(StaticDecoder(model, 3, 128), prompts, 12, stop)
    graphed_decoder = StaticDecoder(model, 3, 128, graphs=True)
    graphed = greedy_answers_static(graphed_decoder, prompts, 12, stop)
    assert graphed_decoder.graph is not None and graphed_decoder.captures_failed == 0
    assert [a.tokens for a in graphed] == [a.tokens for a in eager]


def _tiny_config(tokenizer):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
