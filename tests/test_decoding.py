"""Greedy decoding in which finished rows leave the batch: `generate`'s answers, fewer rows per step."""

import pytest
import torch

from pipeline.backends.decoding.constraint import LabelConstraint
from pipeline.backends.decoding.greedy import greedy_answers
from pipeline.backends.local import stop_token_ids

# Answers of different lengths: the chat model stops early on some and runs on for others.
MESSAGES = ["Is water wet? yes or no.", "Count from one to twenty in words.", "Answer in one word: what is 2+2?",
            "Name a colour."]
MORE_MESSAGES = ["Say yes.", "Reply with one word: hello.", "Write a long sentence about the sea.", "Is fire cold?"]


def _prompts(tokenizer, messages):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                           tokenize=False) for m in messages]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _generate_one(model, ids, max_new_tokens, stop):
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=stop,
                         pad_token_id=stop[0])[0, len(ids):].tolist()
    return next((out[: i + 1] for i, t in enumerate(out) if t in stop), out)


def _rows_per_forward(model):
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return rows, hook


def test_answers_are_generates_and_finished_rows_leave_the_batch(model_fp32, tokenizer):
    stop = stop_token_ids(model_fp32, tokenizer)
    prompts = _prompts(tokenizer, MESSAGES)
    rows_per_step, hook = _rows_per_forward(model_fp32)
    try:
        answers = greedy_answers(model_fp32, prompts, 20, stop, batch_size=4, pad_id=stop[0])
    finally:
        hook.remove()
    assert [a.tokens for a in answers] == [_generate_one(model_fp32, p, 20, stop) for p in prompts]
    lengths = [len(a.tokens) for a in answers]
    assert len(set(lengths)) > 1 and min(lengths) < 20, lengths  # the test needs answers that end apart
    # Step k runs exactly the rows whose answer is longer than k tokens: none that has finished.
    assert rows_per_step == [sum(n > k for n in lengths) for k in range(max(lengths))]
    # A row is answered at the step that gave its last token, before the rows still running.
    order = sorted(range(len(answers)), key=lambda i: lengths[i])
    assert all(answers[a].finished_at <= answers[b].finished_at for a, b in zip(order, order[1:]))
    assert answers[order[0]].finished_at < answers[order[-1]].finished_at


def test_the_next_prompts_join_a_running_batch_and_answers_come_in_order(model_fp32, tokenizer):
    stop = stop_token_ids(model_fp32, tokenizer)
    prompts = _prompts(tokenizer, MESSAGES + MORE_MESSAGES)
    rows_per_step, hook = _rows_per_forward(model_fp32)
    reported = []
    try:
        answers = greedy_answers(model_fp32, prompts, 20, stop, batch_size=4, pad_id=stop[0],
                                 on_answers=lambda start, done: reported.append((start, len(done))))
    finally:
        hook.remove()
    # Joining a batch on its own padding and positions changes no answer.
    assert [a.tokens for a in answers] == [_generate_one(model_fp32, p, 20, stop) for p in prompts]
    lengths = [len(a.tokens) for a in answers]
    # Every row of every forward pass made a token of an unfinished answer, never more than 4 rows at once...
    assert sum(rows_per_step) == sum(lengths) and max(rows_per_step) == 4
    # ...and some prompt joined while another, admitted before it, was still answering: it did not wait for
    # the batch to drain, as with fixed batches.
    assert any(a.admitted_at < b.admitted_at < a.finished_at for a in answers for b in answers)
    # Answers were handed over in prompt order, each once, as soon as those before them were done.
    starts = [0] + [start + n for start, n in reported]
    assert [start for start, _ in reported] == starts[:-1] and starts[-1] == len(prompts)
    assert all(a.admitted_at <= a.finished_at for a in answers)


def test_rows_join_only_caches_whose_layers_hold_every_key():
    from transformers import DynamicCache, LlamaConfig, MistralConfig

    from pipeline.backends.decoding.greedy import _joinable

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    assert _joinable(DynamicCache(config=LlamaConfig(**shape)))
    # A sliding-window layer keeps its window only: padding inserted after the prefix would land elsewhere.
    assert not _joinable(DynamicCache(config=MistralConfig(sliding_window=4, **shape)))


def test_the_constraint_mask_allows_what_the_trie_allows(tokenizer):
    stop = [tokenizer.eos_token_id]
    labels = ["card", "card_arrival", "refund", "billing"]
    constraint = LabelConstraint(tokenizer, labels, stop)
    mask = constraint.mask(len(tokenizer), torch.device("cpu"))
    assert mask.shape == (len(constraint.next_state), len(tokenizer))
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    # Each state is reached by a label's first k tokens; it allows the next token of every label that starts
    # that way, and a stop token where a label ends there (computed from the token lists, not the trie).
    for seq in ids:
        state = 0
        for k in range(len(seq) + 1):
            prefix = seq[:k]
            expected = {other[k] for other in ids if other[:k] == prefix and len(other) > k}
            expected |= set(stop) if prefix in ids else set()
            assert set(mask[state].nonzero().flatten().tolist()) == expected, (seq, k)
            if k < len(seq):
                state = constraint.next_state[state][seq[k]]
    assert constraint.mask(len(tokenizer), torch.device("cpu")) is mask  # built once


def test_constrained_answers_are_labels_and_leave_when_they_end(model_fp32, tokenizer):
    stop = stop_token_ids(model_fp32, tokenizer)
    labels = ["yes", "no", "4", "twenty", "a colour"]
    constraint = LabelConstraint(tokenizer, labels, stop)
    answers = greedy_answers(model_fp32, _prompts(tokenizer, MESSAGES), constraint.longest + 1, stop, batch_size=2,
                             pad_id=stop[0], constraint=constraint)
    for answer in answers:
        assert answer.tokens[-1] in stop
        assert tokenizer.decode(answer.tokens, skip_special_tokens=True) in labels


@pytest.mark.parametrize("held_per_row", [3, 0], ids=["prefix-copied-per-row", "prefix-held-once"])
def test_joined_rows_keep_each_key_under_its_own_mask_column(held_per_row):
    """After a join, every row's unmasked mask columns still point at its own keys, in order (the padding goes
    after the prefix in both), whether each row's keys hold the 3-token prefix or only the suffix."""
    from transformers.cache_utils import DynamicCache

    from pipeline.backends.decoding.greedy import RowCaches, _Rows

    prefix = 3

    def rows(masks):
        mask = torch.tensor(masks)
        keys = torch.randn(len(masks), 1, mask.shape[1] - prefix + held_per_row, 2)
        cache = DynamicCache()
        cache.update(keys, keys + 1, 0)
        group = _Rows(list(range(len(masks))), cache, mask, None)
        group.last = torch.zeros(len(masks), dtype=torch.long)
        return group, keys

    def own_keys(keys, mask):  # a row's keys in the order of its unmasked columns
        return keys[:, mask[prefix - held_per_row:].bool()]

    old, old_keys = rows([[1, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 1, 1]])
    new, new_keys = rows([[1, 1, 1, 1, 1]])
    before = [own_keys(old_keys[0], old.mask[0]), own_keys(old_keys[1], old.mask[1]),
              own_keys(new_keys[0], new.mask[0])]
    joined = old.join(new, RowCaches(lambda _n: None, prefix, held_per_row))
    layer = joined.cache.layers[0]
    assert joined.mask.shape == (3, 8) and layer.keys.shape[2] == 8 - prefix + held_per_row
    for row in range(3):
        assert torch.equal(own_keys(layer.keys[row], joined.mask[row]), before[row])
        assert torch.equal(own_keys(layer.values[row], joined.mask[row]), before[row] + 1)
