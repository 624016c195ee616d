"""Greedy decoding in which finished rows leave the batch: `generate`'s answers, fewer rows per step."""

import torch

from pipeline.backends.decoding import LabelConstraint, greedy_answers
from pipeline.backends.local import stop_token_ids

# Answers of different lengths: the chat model stops early on some and runs on for others.
MESSAGES = ["Is water wet? yes or no.", "Count from one to twenty in words.", "Answer in one word: what is 2+2?",
            "Name a colour."]


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


def test_the_next_prompts_join_when_half_the_batch_has_answered(model_fp32, tokenizer):
    stop = stop_token_ids(model_fp32, tokenizer)
    prompts = _prompts(tokenizer, MESSAGES * 2)
    rows_per_step, hook = _rows_per_forward(model_fp32)
    reported = []
    try:
        answers = greedy_answers(model_fp32, prompts, 20, stop, batch_size=2, pad_id=stop[0],
                                 on_answers=lambda start, done: reported.append((start, len(done))))
    finally:
        hook.remove()
    # Joining a batch on its own padding and positions changes no answer.
    assert [a.tokens for a in answers] == [_generate_one(model_fp32, p, 20, stop) for p in prompts]
    lengths = [len(a.tokens) for a in answers]
    # Every row of every forward pass made a token of an unfinished answer, never more than 2 rows at once...
    assert sum(rows_per_step) == sum(lengths) and max(rows_per_step) == 2
    # ...and the third prompt joined while the first two were still answering: it did not wait for the
    # longer of them, as a fixed batch of 2 would.
    assert lengths[0] != lengths[1]
    assert answers[2].admitted_at < max(answers[0].finished_at, answers[1].finished_at)
    # Answers were handed over in prompt order, each once, as soon as those before them were done.
    assert [start for start, _ in reported] == sorted({start for start, _ in reported})
    assert sum(n for _, n in reported) == len(prompts) and reported[0][0] == 0
    assert all(a.admitted_at <= a.finished_at for a in answers)
    assert answers[-1].admitted_at > answers[0].admitted_at  # the last prompts joined later


def test_the_constraint_mask_allows_what_the_trie_allows(tokenizer):
    stop = [tokenizer.eos_token_id]
    constraint = LabelConstraint(tokenizer, ["card", "card_arrival", "refund", "billing"], stop)
    mask = constraint.mask(len(tokenizer), torch.device("cpu"))
    assert mask.shape == (len(constraint.next_state), len(tokenizer))
    for state in range(len(constraint.next_state)):
        assert sorted(mask[state].nonzero().flatten().tolist()) == sorted(constraint.allowed_in(state))
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
