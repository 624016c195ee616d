"""The local backend on the real default model: prefix-cache reuse and batching change no prediction."""

import pytest

from conftest import ROOT
from pipeline.backends.local import (LabelConstraint, LocalBackend, LocalSettings, measure_local, shared_prefix_length,
                                     stop_token_ids)
from pipeline.task.splits import eval_rows, load_task, task_config_for_folder
from pipeline.task.prompts import PromptRenderer, load_template, pick_examples


@pytest.fixture(scope="module")
def engineered(tokenizer):
    task = load_task(task_config_for_folder(ROOT / "datasets" / "support_tickets"))
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], 6, seed=0)
    r = PromptRenderer(load_template(ROOT / "prompts" / "engineered.yaml"), tokenizer, task.labels, examples)
    texts = eval_rows(task, 6, seed=0)["text"]
    return r, [r.prompt(t) for t in texts]


def generate_calls(model, tokenizer, prompts, batch_size, max_new_tokens, prefix=None, constraint=None,
                   repeats=1, warmup=0, progress=None):
    """`prefix`: the renderer whose static prefix is cached; `constraint`: the labels answers are restricted to."""
    return measure_local(model, tokenizer, prompts, batch_size, max_new_tokens,
                         prefix_probe=prefix.prefix_probe() if prefix else None, labels=constraint,
                         warmup=warmup, repeats=repeats, on_calls=progress)


def _prefill_widths(model):
    """Record the sequence width of every forward pass (the first one of each batch is its prefill)."""
    widths = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return widths, handle


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([1, 2, 3], [[1, 2, 9, 4], [1, 2, 3, 5]]) == 2
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3]]) == 2  # one token is left for the call to run
    assert shared_prefix_length([7], [[1, 2]]) == 0


def test_prefix_cache_and_batching_give_the_plain_path_predictions(model_fp32, tokenizer, engineered):
    renderer, prompts = engineered
    plain = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=6).calls
    cached = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=6, prefix=renderer).calls
    batched = generate_calls(model_fp32, tokenizer, prompts, batch_size=3, max_new_tokens=6, prefix=renderer).calls
    padded = generate_calls(model_fp32, tokenizer, prompts, batch_size=3, max_new_tokens=6).calls
    outputs = [c.output for c in plain]
    assert any(outputs), "the model should answer something"
    assert [c.output for c in cached] == outputs
    assert [c.output for c in batched] == outputs
    assert [c.output for c in padded] == outputs
    assert [c.prompt_tokens for c in cached] == [c.prompt_tokens for c in plain]


def test_with_the_prefix_cache_only_the_suffix_tokens_run(model_fp32, tokenizer, engineered):
    renderer, prompts = engineered
    prefix_tokens = renderer.static_prefix_tokens()
    assert prefix_tokens > 100
    settings = LocalSettings(batch_size=3, max_new_tokens=2)
    backend = LocalBackend(model_fp32, tokenizer, settings, prefix_probe=renderer.prefix_probe())
    backend.run(prompts[:1])  # the prefix runs once, here
    widths, handle = _prefill_widths(model_fp32)
    try:
        calls = backend.run(prompts[:3])
    finally:
        handle.remove()
    suffixes = [c.prompt_tokens - c.cached_tokens for c in calls]
    assert all(c.cached_tokens >= prefix_tokens - 2 for c in calls)  # tokens may merge across the boundary
    # The batch's first forward pass (its prefill) is as wide as its longest suffix, not its prompts.
    assert widths[0] == max(suffixes) < min(c.prompt_tokens for c in calls) - 100
    assert all(w == 1 for w in widths[1:])  # then one token per decoding step


def test_label_trie_allows_exactly_the_label_sequences(tokenizer):
    stop = [tokenizer.eos_token_id]
    labels = ["card", "card_arrival", "refund"]
    trie = LabelConstraint(tokenizer, labels, stop)
    ids = {label: tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels}
    # Walk every path the trie allows; the finished answers are exactly the labels.
    finished, frontier = set(), [([], 0)]
    while frontier:
        seq, state = frontier.pop()
        for token in trie.allowed_in(state):
            if token in stop:
                finished.add(tokenizer.decode(seq))
            else:
                frontier.append((seq + [token], trie.next_state[state][token]))
    assert finished == set(labels)
    assert trie.longest == max(len(v) for v in ids.values())
    # "card" is complete and a prefix of "card_arrival": both the stop token and the continuation are allowed.
    state = 0
    for token in ids["card"]:
        state = trie.next_state[state][token]
    after_card = trie.allowed_in(state)
    assert stop[0] in after_card and ids["card_arrival"][len(ids["card"])] in after_card


def test_constrained_decoding_answers_a_label_every_time(model_fp32, tokenizer, engineered):
    from pipeline.measure.scoring import INVALID, parse_label

    renderer, prompts = engineered
    labels = [label.name for label in renderer.labels]
    constraint = LabelConstraint(tokenizer, labels, stop_token_ids(model_fp32, tokenizer))
    # Raw text with no instruction at all: free decoding continues the text, constrained cannot.
    bare = ["My card was charged twice for the same order", "The app crashes when I log in", "Where is my parcel"]
    free = generate_calls(model_fp32, tokenizer, bare, batch_size=3, max_new_tokens=6).calls
    assert any(parse_label(c.output, labels) == INVALID for c in free)
    plain = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=6, constraint=labels).calls
    cached = generate_calls(model_fp32, tokenizer, prompts, batch_size=3, max_new_tokens=6, prefix=renderer,
                            constraint=labels).calls
    for calls in (plain, cached, generate_calls(model_fp32, tokenizer, bare, 3, 6, constraint=labels).calls):
        assert all(c.output in labels for c in calls), [c.output for c in calls]
        assert all(c.completion_tokens <= constraint.longest + 1 for c in calls)
    assert [c.output for c in cached] == [c.output for c in plain]




def test_call_token_counts_match_the_tokenizer(model_fp32, tokenizer, engineered):
    _, prompts = engineered
    timed = generate_calls(model_fp32, tokenizer, prompts[:2], batch_size=1, max_new_tokens=6, warmup=1)
    calls = timed.calls
    assert timed.seconds > 0 and len(timed.pass_p50_ms) == 1
    for prompt, call in zip(prompts, calls):
        assert call.prompt_tokens == len(tokenizer(prompt.to_string(tokenizer), add_special_tokens=False)["input_ids"])
        assert 1 <= call.completion_tokens <= 6
        # the decoded answer re-tokenizes to at most the tokens generated (the stop token is counted, not shown)
        assert len(tokenizer(call.output, add_special_tokens=False)["input_ids"]) <= call.completion_tokens
        assert call.latency_ms > 0
