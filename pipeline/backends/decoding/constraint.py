"""What constrained greedy decoding asks of a constraint, and the label constraint.

A constraint keeps one state per row: decoding asks it which tokens each live row may write next (`allowed`),
takes the best of those, and moves the row's state on by it (`advance`); a stop token is allowed exactly where
the row's answer is complete (`may_stop`). `LabelConstraint` (one label of a set) and
`json_schema.JsonSchemaConstraint` (JSON that validates against a schema) implement it.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch


class TokenConstraint(Protocol):
    """Greedy decoding restricted row by row. `stop_ids` end an answer; a row never advances past one."""

    stop_ids: list[int]

    def answer_tokens(self, max_new_tokens: int) -> int:
        """The most tokens an answer may take, its stop token included, given the caller's `max_new_tokens`."""

    def start(self, max_new_tokens: int) -> Any:
        """A new row's state; the row may write at most `max_new_tokens` tokens, its stop token included."""

    def allowed(self, states: Sequence[Any], vocab: int, device: torch.device) -> torch.Tensor:
        """[len(states), vocab] booleans on `device`: the tokens each row may write next (stop tokens where
        `may_stop`). Every row allows at least one token."""

    def advance(self, state: Any, token: int) -> Any:
        """The row's state once it has written `token` (never a stop token)."""

    def may_stop(self, state: Any) -> bool:
        """Whether the row's answer is complete, so that a stop token may follow."""


class LabelConstraint:
    """Greedy decoding restricted to one label of the set, then a stop token: a trie over label tokens.

    Each label is tokenized as the answer alone, the way the fine-tuned arm learns it and the prompt arms'
    chat turns present it; an output can then only be a label, so none is invalid. The trie's nodes are
    numbered states; `mask(vocab)` holds each state's allowed tokens as one row of a boolean matrix.
    """

    def __init__(self, tokenizer: Any, labels: list[str], stop_ids: list[int]):
        self.stop_ids = list(stop_ids)
        self.next_state: list[dict[int, int]] = [{}]  # state -> token -> state; state 0 is the root
        self.complete: list[bool] = [False]  # whether a label ends at this state (a stop token may follow)
        self.longest = 0
        for label in labels:
            ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            state = 0
            for token in ids:
                if token not in self.next_state[state]:
                    self.next_state.append({})
                    self.complete.append(False)
                    self.next_state[state][token] = len(self.next_state) - 1
                state = self.next_state[state][token]
            self.complete[state] = True
            self.longest = max(self.longest, len(ids))
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def allowed_in(self, state: int) -> list[int]:
        """Tokens that may follow in `state`."""
        tokens = list(self.next_state[state])
        return tokens + self.stop_ids if self.complete[state] else tokens

    def mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[states, vocab] booleans: row s allows exactly `allowed_in(s)`. Built once per vocabulary and device."""
        key = (vocab, device)
        if key not in self._masks:
            mask = torch.zeros(len(self.next_state), vocab, dtype=torch.bool)
            for state in range(len(self.next_state)):
                mask[state, self.allowed_in(state)] = True
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def answer_tokens(self, max_new_tokens: int) -> int:
        return self.longest + 1  # the longest label and its stop token, whatever the caller allows

    def start(self, max_new_tokens: int) -> int:
        return 0  # the root

    def allowed(self, states: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
        return self.mask(vocab, device)[torch.tensor(list(states), device=device)]

    def advance(self, state: int, token: int) -> int:
        return self.next_state[state][token]

    def may_stop(self, state: int) -> bool:
        return self.complete[state]
