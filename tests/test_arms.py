"""Generation on the real default model: prefix-cache reuse and batching change no prediction."""

import pytest

from conftest import ROOT
from pipeline.arms import generate_calls, shared_prefix_length
from pipeline.data import eval_rows, load_task, task_config_for_folder
from pipeline.prompts import PromptRenderer, load_template, pick_examples


@pytest.fixture(scope="module")
def engineered(tokenizer):
    task = load_task(task_config_for_folder(ROOT / "datasets" / "support_tickets"))
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], 6, seed=0)
    r = PromptRenderer(load_template(ROOT / "prompts" / "engineered.yaml"), tokenizer, task.labels, examples)
    texts = eval_rows(task, 6, seed=0)["text"]
    return r, [r.render(t) for t in texts]


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([1, 2, 3], [[1, 2, 9, 4], [1, 2, 3, 5]]) == 2
    assert shared_prefix_length([1, 2, 3], [[1, 2, 3]]) == 2  # one token is left for the call to run
    assert shared_prefix_length([7], [[1, 2]]) == 0


def test_prefix_cache_and_batching_give_the_plain_path_predictions(model_fp32, tokenizer, engineered):
    renderer, prompts = engineered
    plain, _ = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=6)
    cached, _ = generate_calls(model_fp32, tokenizer, prompts, batch_size=1, max_new_tokens=6,
                               prefix=renderer.static_prefix())
    batched, _ = generate_calls(model_fp32, tokenizer, prompts, batch_size=3, max_new_tokens=6,
                                prefix=renderer.static_prefix())
    padded, _ = generate_calls(model_fp32, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    outputs = [c.output for c in plain]
    assert any(outputs), "the model should answer something"
    assert [c.output for c in cached] == outputs
    assert [c.output for c in batched] == outputs
    assert [c.output for c in padded] == outputs
    assert [c.prompt_tokens for c in cached] == [c.prompt_tokens for c in plain]


def test_call_token_counts_match_the_tokenizer(model_fp32, tokenizer, engineered):
    _, prompts = engineered
    calls, seconds = generate_calls(model_fp32, tokenizer, prompts[:2], batch_size=1, max_new_tokens=6, warmup=1)
    assert seconds > 0
    for prompt, call in zip(prompts, calls):
        assert call.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert 1 <= call.completion_tokens <= 6
        # the decoded answer re-tokenizes to at most the tokens generated (the stop token is counted, not shown)
        assert len(tokenizer(call.output, add_special_tokens=False)["input_ids"]) <= call.completion_tokens
        assert call.latency_ms > 0
