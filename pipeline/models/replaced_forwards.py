"""Module forwards replaced for the length of a block: the one mechanism behind the CPU speed paths that run a
layer differently without changing its weights (`adapter_matmuls` in training, `backends.packed_weights` in
decoding). The replacement is an instance attribute, so the module's hooks still run around it, and the
module's own forward comes back on exit, so a merge, a copy or a save never sees it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator


@contextmanager
def forwards_replaced(replacements: Iterable[tuple[Any, Callable[..., Any]]]) -> Iterator[int]:
    """Within the block each module runs the forward paired with it; yields how many do. On exit, even after an
    error (one raised while the pairs are made included), each gets its own forward back, unless something else
    has replaced it meanwhile."""
    replaced = []
    try:
        for module, forward in replacements:
            module.forward = forward
            replaced.append((module, forward))
        yield len(replaced)
    finally:
        for module, forward in replaced:
            if vars(module).get("forward") is forward:
                del module.forward
