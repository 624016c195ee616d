"""Greedy decoding restricted to JSON that validates against a JSON Schema (llguidance), then a stop token.

llguidance compiles the schema into a grammar over the tokenizer's vocabulary; each row keeps a matcher, and a
decoding step asks all live rows' matchers for their allowed tokens at once, as one bitmask. The JSON is written
the way `task.schema` writes the targets: compact (`,` and `:`, no whitespace), keys in the schema's order. The
format the fine-tuned arm learns and the few-shot turns show is then the only one allowed, and a small model
cannot wander off into whitespace.

An answer is not cut invalid by `max_new_tokens`: each row counts the tokens it may still write. Once that comes
near what closing its JSON would take (`_closing`: the open string closed, each remaining required field given a
short value, null where allowed, every open bracket closed, then a stop token), the row writes that closing
instead of the model's choice. Such an answer validates but ends early, so the caller sets max_new_tokens from
the data; one below the schema's shortest answer is an error. Only a schema whose closing this search cannot
find (a pattern its choices never satisfy) can still be cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from pipeline.errors import UserError

# The targets' separators (task.schema writes them with json.dumps(separators=(",", ":"))).
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Tokens one freely chosen token may add to a row's closing: the closing is forced once it is this close to the
# row's remaining tokens (a token such as `":[` opens more than one thing at once).
SLACK = 4
# A closing longer than this is given up on (the row decodes freely and may be cut).
MAX_CLOSING = 256
# What a closing writes where it has a choice, first allowed first: outside a string, null and closing brackets
# before anything that opens; inside one, its closing quote.
OUTSIDE_STRING = ["null", "]", "}", ",", '"', "0", "false", "[", "{"]
INSIDE_STRING = ['"']


class SchemaError(UserError):
    """A JSON Schema that constrained decoding cannot use."""


@dataclass
class JsonRow:
    """One row's place in the grammar: its matcher, the tokens it may still write (its stop token included),
    whether it is inside a JSON string (after a backslash), when it looks for its closing next (at this many
    remaining tokens) and its closing once that is forced."""

    matcher: Any
    remaining: int
    check_at: int
    in_string: bool = False
    escaped: bool = False
    closing: list[int] | None = None


class JsonSchemaConstraint:
    """Answers restricted to one JSON value that validates against `schema`, then a stop token (`TokenConstraint`).

    `name` names the schema in errors (its `title` by default). A schema llguidance cannot compile (a `$ref` to
    nothing, a regex feature it lacks, an unknown type) raises `SchemaError` with llguidance's reason.
    """

    def __init__(self, tokenizer: Any, schema: dict[str, Any], stop_ids: list[int], name: str | None = None):
        self.stop_ids = list(stop_ids)
        title = schema.get("title") if isinstance(schema, dict) else None
        self.name = f"JSON schema {name or title or 'without a title'!r}"
        try:
            self.tokens = llguidance.hf.from_tokenizer(tokenizer, eos_token=self.stop_ids[0])
        except ValueError as exc:  # a slow (pure Python) tokenizer
            raise SchemaError(f"{self.name}: constrained JSON decoding needs a fast tokenizer ({exc})") from None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"{self.name}: not a JSON schema llguidance can read ({_first_line(exc)})") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokens)
        if failed:
            raise SchemaError(f"{self.name}: llguidance cannot compile it: {_first_line(messages[0])}")
        self._root = llguidance.LLMatcher(self.tokens, grammar, log_level=0)
        if self._root.is_error():
            raise SchemaError(f"{self.name}: llguidance cannot compile it: {_first_line(self._root.get_error())}")
        self._executor = llguidance.LLExecutor()
        self._width = (self.tokens.vocab_size + 31) // 32  # int32 words of one row's bitmask
        self._lengths = np.array([len(self.tokens.decode_bytes([t])) for t in range(self.tokens.vocab_size)])
        self._outside = _single_tokens(tokenizer, OUTSIDE_STRING)
        self._inside = _single_tokens(tokenizer, INSIDE_STRING)
        shortest = self._closing(JsonRow(self._root.deep_copy(), MAX_CLOSING, 0))
        if shortest is None:
            raise SchemaError(f"{self.name}: no answer of at most {MAX_CLOSING} tokens found to close it")
        self.shortest = len(shortest)  # tokens of the shortest answer found, its stop token included

    def answer_tokens(self, max_new_tokens: int) -> int:
        return max_new_tokens  # an answer is closed validly within whatever it is given

    def start(self, max_new_tokens: int) -> JsonRow:
        if max_new_tokens < self.shortest:
            raise SchemaError(f"{self.name}: max_new_tokens={max_new_tokens} is below the {self.shortest} tokens "
                              "its shortest answer takes")
        return JsonRow(self._root.deep_copy(), max_new_tokens, _next_check(max_new_tokens, self.shortest))

    def allowed(self, states: Sequence[JsonRow], vocab: int, device: torch.device) -> torch.Tensor:
        rows = list(states)
        bitmask = torch.zeros(len(rows), self._width, dtype=torch.int32)
        closings = [self._closing_due(row) for row in rows]
        free = [(row.matcher, i) for i, (row, closing) in enumerate(zip(rows, closings)) if closing is None]
        if free:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, free, bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").view(bool)
        if bits.shape[1] < vocab:  # logits wider than the tokenizer's vocabulary: the extra tokens are never allowed
            bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
        allowed = bits[:, :vocab]
        for i, (row, closing) in enumerate(zip(rows, closings)):
            if closing is not None:
                allowed[i] = False
                allowed[i, closing[0]] = True
            else:
                allowed[i, self.stop_ids] = row.matcher.is_accepting()
        return torch.from_numpy(allowed).to(device)

    def advance(self, state: JsonRow, token: int) -> JsonRow:
        if state.closing is not None:
            state.closing = state.closing[1:]
        if not state.matcher.consume_token(token):
            raise RuntimeError(f"{self.name}: the grammar refused token {token}, which it allowed: "
                               f"{state.matcher.get_error()}")
        state.remaining -= 1
        state.in_string, state.escaped = _scan(state.in_string, state.escaped, self.tokens.decode_bytes([token]))
        return state

    def may_stop(self, state: JsonRow) -> bool:
        return state.matcher.is_accepting()

    def _closing_due(self, row: JsonRow) -> list[int] | None:
        """The row's closing when it must write it now (its remaining tokens no more than its closing + SLACK),
        else None: the row chooses freely among what the grammar allows. The closing is looked for again only
        once it could have come due, were it to grow by SLACK tokens a token (`_next_check`)."""
        if row.closing is None and row.remaining <= row.check_at:
            closing = self._closing(row)
            if closing is None:
                row.check_at = row.remaining - SLACK
            elif len(closing) + SLACK >= row.remaining:
                row.closing = closing
            else:
                row.check_at = _next_check(row.remaining, len(closing))
        return row.closing

    def _closing(self, row: JsonRow) -> list[int] | None:
        """Tokens that complete the row's JSON, its stop token last, chosen greedily: the tokens the grammar
        forces (a key), else the first preferred token it allows, else, inside a string (an enum value), the
        longest token it allows and outside one the shortest. The same state always gives the same closing, so a
        row that follows one stays on it. None when it takes more than MAX_CLOSING tokens."""
        matcher, in_string, escaped = row.matcher.deep_copy(), row.in_string, row.escaped
        path: list[int] = []
        while len(path) < MAX_CLOSING:
            if matcher.is_accepting():
                return path + [self.stop_ids[0]]
            tokens = matcher.compute_ff_tokens()[:1]
            if not tokens:
                tokens = [t for t in (self._inside if in_string else self._outside)
                          if matcher.validate_tokens([t]) == 1][:1]
            if not tokens:
                bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
                bits = bits[: self.tokens.vocab_size]
                bits[self.stop_ids] = 0
                choices = np.flatnonzero(bits)
                if not len(choices):
                    return None
                lengths = self._lengths[choices]
                tokens = [int(choices[np.argmax(lengths) if in_string else np.argmin(lengths)])]
            matcher.consume_token(tokens[0])
            path.append(tokens[0])
            in_string, escaped = _scan(in_string, escaped, self.tokens.decode_bytes(tokens))
        return None


def _next_check(remaining: int, closing: int) -> int:
    """At how many remaining tokens a row with `remaining` tokens left and a closing of `closing` tokens looks
    again: k tokens on, its closing is at most closing + SLACK * k, which still fits while k * (SLACK + 1) <=
    remaining - closing - SLACK."""
    return remaining - max(1, (remaining - closing - SLACK) // (SLACK + 1))


def _scan(in_string: bool, escaped: bool, data: bytes) -> tuple[bool, bool]:
    """Whether the JSON text is inside a string, and right after a backslash there, once `data` follows."""
    for byte in data:
        if escaped:
            escaped = False
        elif in_string and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # quote
            in_string = not in_string
    return in_string, escaped


def _single_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """The token ids of those texts that are one token each, in order."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return [i[0] for i in ids if len(i) == 1]


def _first_line(message: Any) -> str:
    """llguidance's reason on one line, shortened."""
    text = " ".join(str(message).split())
    return text[:200]
