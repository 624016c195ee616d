"""Reading a JSON object out of an answer and comparing field values the way a person would: case, spacing and
number formats do not matter, lists are multisets, null and an absent field are the same."""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any

_DECODER = json.JSONDecoder()
# A number as people write one; a leading zero ("0044712", an id) keeps a string a string.
_NUMBER = re.compile(r"[+-]?(0|[1-9]\d{0,2}(,\d{3})+|[1-9]\d*)(\.\d+)?")


def first_json_object(output: str) -> dict[str, Any] | None:
    """The first JSON object in the answer (code fences and prose around it are fine), or None: invalid."""
    start = output.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(output, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = output.find("{", start + 1)
    return None


def normalise(value: Any) -> Any:
    """A value as compared: strings folded and single-spaced ("" is absent), numbers in one form whether written
    1000, 1000.0 or "1,000" (not "01000": an id), lists as sorted multisets, objects field by field; None stays None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _number(str(value))
    if isinstance(value, str):
        text = " ".join(value.casefold().split())
        if not text:
            return None
        return _number(text.replace(",", "")) if _NUMBER.fullmatch(text) else text
    if isinstance(value, list):
        return tuple(sorted((normalise(v) for v in value), key=repr))
    if isinstance(value, dict):
        return tuple(sorted((k, normalise(v)) for k, v in value.items() if normalise(v) not in (None, ())))
    return value


def _number(text: str) -> str:
    try:
        return format(Decimal(text).normalize(), "f")
    except InvalidOperation:
        return text


def field_counts(predicted: dict[str, Any] | None, gold: dict[str, Any], fields: list[str]) -> dict[str, list[int]]:
    """Per field: [true positive, false positive, false negative] field/value pairs.

    A scalar field right counts one true positive; wrong, one false positive and one false negative; missing
    (or null), a false negative; given where the target has none, a false positive. A list counts each element
    as a pair, matched as multisets. Keys outside `fields` count the same way, in the target (a value to find)
    and in the answer (one given).
    """
    predicted = predicted or {}
    names = list(dict.fromkeys([*fields, *gold, *predicted]))
    counts = {}
    for name in names:
        p, g = normalise(predicted.get(name)), normalise(gold.get(name))
        if isinstance(p, tuple) or isinstance(g, tuple):
            mine, theirs = Counter(_items(p)), Counter(_items(g))
            hit = sum((mine & theirs).values())
            counts[name] = [hit, sum(mine.values()) - hit, sum(theirs.values()) - hit]
        elif p is None or g is None:
            counts[name] = [0, int(p is not None), int(g is not None)]
        else:
            counts[name] = [1, 0, 0] if p == g else [0, 1, 1]
    return counts


def _items(value: Any) -> tuple:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def same_object(predicted: dict[str, Any] | None, gold: dict[str, Any], fields: list[str]) -> bool:
    """Every field equal after normalising (absent, null and an empty list alike)."""
    if predicted is None:
        return False
    names = set(fields) | set(predicted) | set(gold)
    return all(normalise(predicted.get(n)) in (None, ()) and normalise(gold.get(n)) in (None, ())
               or normalise(predicted.get(n)) == normalise(gold.get(n)) for n in names)


def f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of pair counts (0 where undefined; F1 1.0 where nothing was there to find or give)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2 * tp / (2 * tp + fp + fn)
