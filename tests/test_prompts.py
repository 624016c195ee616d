
import pytest

from conftest import ROOT
from pipeline.task.types import Label
from pipeline.task.prompts import PromptError, PromptRenderer, count_tokens, load_template, pick_examples

LABELS = [Label("billing", "Charges and invoices."), Label("refund", "Money back.")]
EXAMPLES = [{"text": "charged twice", "label": "billing"}, {"text": "money back pls", "label": "refund"}]


def renderer(tokenizer, name: str) -> PromptRenderer:
    return PromptRenderer(load_template(ROOT / "prompts" / f"{name}.yaml"), tokenizer, LABELS, EXAMPLES)


def test_engineered_prompt_has_instructions_labels_descriptions_and_examples(tokenizer):
    text = renderer(tokenizer, "engineered").render("Where is my invoice?")
    assert "billing: Charges and invoices." in text and "refund: Money back." in text
    assert "<|im_start|>user\ncharged twice<|im_end|>\n<|im_start|>assistant\nbilling<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nWhere is my invoice?<|im_end|>\n<|im_start|>assistant\n")


def test_naive_prompt_is_one_line_through_the_chat_template(tokenizer):
    r = renderer(tokenizer, "naive")
    text = r.render("Where is my invoice?")
    user_turn = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert "\n" not in user_turn and "billing, refund" in user_turn
    assert text.startswith("<|im_start|>system\n")  # the model's own chat template added its default system turn


def test_finetuned_prompt_is_the_input_alone(tokenizer):
    assert renderer(tokenizer, "finetuned").render("Where is my invoice?") == "Where is my invoice?\n"


@pytest.mark.parametrize("name", ["naive", "engineered"])
def test_token_count_is_what_the_chat_template_feeds_the_model(tokenizer, name):
    r = renderer(tokenizer, name)
    prompt = r.prompt("I was charged twice for March, please check.")
    # The tokenizer's own chat-template tokenization is an independent path to the model's input ids.
    ids = tokenizer.apply_chat_template(prompt.chat(), tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert count_tokens(tokenizer, r.render("I was charged twice for March, please check.")) == len(ids)
    # special tokens written by the chat template count once, as the single tokens the model reads
    assert count_tokens(tokenizer, "<|im_start|>") == 1


def test_plain_prompt_tokens_add_no_special_tokens(tokenizer):
    text = renderer(tokenizer, "finetuned").render("Where is my invoice?")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert count_tokens(tokenizer, text) == len(ids) and tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id not in ids


def test_static_prefix_is_shared_and_excludes_the_input(tokenizer):
    r = renderer(tokenizer, "engineered")
    prefix = r.static_prefix()
    a, b = r.render("first message"), r.render("another one")
    assert a.startswith(prefix) and b.startswith(prefix)
    assert "first message" not in prefix and len(prefix) > 0.8 * len(a)
    assert renderer(tokenizer, "finetuned").static_prefix() == ""


def test_template_sandbox_blocks_attribute_escapes(tmp_path, tokenizer):
    path = tmp_path / "evil.yaml"
    path.write_text("template: \"{{ text.__class__.__mro__[1].__subclasses__() }}\"\n")
    with pytest.raises(PromptError, match="evil.yaml"):
        PromptRenderer(load_template(path), tokenizer, LABELS, EXAMPLES).render("x")


def test_template_cannot_use_undefined_variables(tmp_path, tokenizer):
    path = tmp_path / "typo.yaml"
    path.write_text("template: \"{{ txt }}\"\n")
    with pytest.raises(PromptError, match="typo.yaml.*txt"):
        PromptRenderer(load_template(path), tokenizer, LABELS, EXAMPLES).render("x")


@pytest.mark.parametrize("content, message", [
    ("template: 3\n", "'template' must be a string"),
    ("messages: []\n", "non-empty list"),
    ("messages:\n  - role: boss\n    content: hi\n", "messages[0]"),
    ("template: x\nmessages: []\n", "exactly one of"),
    ("template: \"{% for %}\"\n", "template error"),
    ("template: x\nextra: 1\n", "unknown key 'extra'"),
])
def test_bad_template_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(PromptError, match="bad.yaml") as info:
        load_template(path)
    assert message in str(info.value)


def test_few_shot_examples_are_seeded_and_cover_labels_first():
    texts = [f"t{i}" for i in range(40)]
    labels = [f"l{i % 5}" for i in range(40)]
    picked = pick_examples(texts, labels, 7, seed=4)
    assert len(picked) == 7
    assert {p["label"] for p in picked[:5]} == {f"l{i}" for i in range(5)}
    assert picked == pick_examples(texts, labels, 7, seed=4)
    assert picked != pick_examples(texts, labels, 7, seed=5)
    assert len({p["text"] for p in picked}) == 7
