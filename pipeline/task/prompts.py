"""Prompt templates: YAML files in `prompts/`, rendered with sandboxed Jinja2.

A template file holds either `messages` (a chat: each content is a Jinja2 template, rendered
through the model's chat template) or `template` (plain text sent as is). Templates see
`text` (the input), `labels` (name, description), `fields` (an extraction's: name, type, description, enum,
required, nullable), `instruction` (a generation's task.instruction) and `examples` (text, label, target). A message
`{few_shot: {user: ..., assistant: ...}}` expands into one user/assistant turn pair per
example, with `example` in scope: small chat models follow demonstrated turns far better
than examples listed in a system text.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.task.types import Label
from pipeline.errors import UserError

# A sentinel that cannot occur in user text; it marks where the per-call input begins.
INPUT_MARK = "\x00INPUT\x00"


class PromptError(UserError):
    """A template problem, already phrased as one line naming the file."""


@dataclass
class PromptTemplate:
    path: Path
    messages: list[dict[str, str]] | None
    template: str | None
    description: str = ""

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def source(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]

    def registry_template(self) -> str | list[dict[str, str]]:
        """What goes to the MLflow Prompt Registry: the raw Jinja2 messages or text."""
        if self.messages is None:
            return self.template
        messages = []
        for m in self.messages:
            if "few_shot" in m:
                # The registry stores role/content pairs only: mark the turn pair that repeats per example.
                messages.append({"role": "user", "content": "{# one pair per few-shot example #}" + m["few_shot"]["user"]})
                messages.append({"role": "assistant", "content": m["few_shot"]["assistant"]})
            else:
                messages.append(dict(m))
        return messages


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def load_template(path: Path) -> PromptTemplate:
    """Read and compile-check a prompt file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"{path}: prompt file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or ("messages" in data) == ("template" in data):
        raise PromptError(f"{path}: expected exactly one of 'messages' (a chat) or 'template' (plain text)")
    unknown = set(data) - {"messages", "template", "description"}
    if unknown:
        raise PromptError(f"{path}: unknown key {sorted(unknown)[0]!r} (allowed: messages, template, description)")
    messages = data.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise PromptError(f"{path}: 'messages' must be a non-empty list of {{role, content}}")
        texts = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and set(m) == {"few_shot"} and isinstance(m["few_shot"], dict) \
                    and set(m["few_shot"]) == {"user", "assistant"}:
                texts += [m["few_shot"]["user"], m["few_shot"]["assistant"]]
                continue
            if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                raise PromptError(f"{path}: messages[{i}]: expected role (system|user|assistant) and content, "
                                  "or few_shot with user and assistant")
            texts.append(m["content"])
        if not all(isinstance(t, str) for t in texts):
            raise PromptError(f"{path}: every message content must be a string")
    else:
        if not isinstance(data["template"], str):
            raise PromptError(f"{path}: 'template' must be a string")
        texts = [data["template"]]
    for text in texts:
        try:
            _ENV.parse(text)
        except TemplateError as exc:
            raise PromptError(f"{path}: template error: {exc}") from None
    return PromptTemplate(path, messages, data.get("template"), str(data.get("description", "")))


def pick_examples(train_texts: list[str], train_labels: list[str], k: int, seed: int) -> list[dict[str, str]]:
    """k few-shot examples from train, seeded, one per label before any label repeats. Each is `text` and its
    answer as `label` and `target` (an extraction target's compact JSON, a generation's reference)."""
    order = list(range(len(train_texts)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    used: set[int] = set()
    while len(chosen) < min(k, len(order)):
        seen_labels: set[str] = set()
        for i in order:
            if i in used or train_labels[i] in seen_labels:
                continue
            chosen.append(i)
            used.add(i)
            seen_labels.add(train_labels[i])
            if len(chosen) == k:
                break
    return [{"text": train_texts[i], "label": train_labels[i], "target": train_labels[i]} for i in chosen]


@dataclass(frozen=True)
class Prompt:
    """One call's input as the template renders it: a chat (`messages`) or plain `text`.

    A local backend turns a chat into the model's own chat-template string; an HTTP backend
    sends the messages as they are (chat completions) or the text as a completion prompt.
    """

    messages: tuple[tuple[str, str], ...] | None = None
    text: str | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]

    def to_string(self, tokenizer: Any) -> str:
        """The exact string a local model sees."""
        if self.messages is None:
            return self.text or ""
        return tokenizer.apply_chat_template(self.chat(), tokenize=False, add_generation_prompt=True)


@dataclass
class PromptRenderer:
    """Turns an input text into a Prompt, and (with a tokenizer) into the exact string a local model sees."""

    template: PromptTemplate
    tokenizer: Any
    labels: list[Label]
    examples: list[dict[str, str]]
    fields: list[dict[str, Any]] = field(default_factory=list)  # extraction: the schema's fields
    instruction: str = ""  # generation: task.instruction

    def _variables(self, text: str) -> dict[str, Any]:
        labels = [{"name": l.name, "description": l.description} for l in self.labels]
        return {"text": text, "labels": labels, "examples": self.examples, "fields": self.fields,
                "instruction": self.instruction}

    def render(self, text: str) -> str:
        return self.prompt(text).to_string(self.tokenizer)

    def prompt(self, text: str) -> Prompt:
        variables = self._variables(text)
        try:
            if self.template.messages is None:
                return Prompt(text=_ENV.from_string(self.template.template).render(variables))
            messages = []
            for m in self.template.messages:
                if "few_shot" in m:
                    for example in self.examples:
                        turn = {**variables, "example": example}
                        messages.append({"role": "user", "content": _ENV.from_string(m["few_shot"]["user"]).render(turn)})
                        messages.append(
                            {"role": "assistant", "content": _ENV.from_string(m["few_shot"]["assistant"]).render(turn)})
                else:
                    messages.append({"role": m["role"], "content": _ENV.from_string(m["content"]).render(variables)})
        except TemplateError as exc:
            raise PromptError(f"{self.template.path}: {type(exc).__name__}: {exc}") from None
        return Prompt(messages=tuple((m["role"], m["content"]) for m in messages))

    def prefix_probe(self) -> Prompt:
        """The prompt of an input that marks where the per-call part begins (see `static_prefix`)."""
        return self.prompt(INPUT_MARK)

    def static_prefix(self) -> str:
        """The part of every rendered prompt that precedes the input (shared by all calls)."""
        return static_prefix(self.prefix_probe(), self.tokenizer)

    def static_prefix_tokens(self) -> int:
        """Tokens of the static prefix: what a provider's prompt cache could serve on every call."""
        prefix = self.static_prefix()
        return count_tokens(self.tokenizer, prefix) if prefix else 0


def static_prefix(probe: Prompt, tokenizer: Any) -> str:
    """The text before the input marker in a probe prompt: what every call shares."""
    return probe.to_string(tokenizer).split(INPUT_MARK, 1)[0]


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of the exact text sent; special tokens come from the template, so none are added."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
