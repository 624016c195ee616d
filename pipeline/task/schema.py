"""Extraction targets: a JSON object per row, the JSON Schema they follow (given, or inferred from train), and
the schema's fields as prompt templates see them. Every problem is one DataError line naming the file and row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.task.types import DataError, TaskConfig

# An inferred field becomes an enum when it takes at most this many string values, each seen at least twice.
ENUM_MAX_VALUES = 12
_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def load_schema(path: Path) -> dict[str, Any]:
    """A JSON Schema file for the targets: an object schema with `properties`, itself a valid schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: schema file not found (task.schema)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict) or schema.get("type", "object") != "object" \
            or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise DataError(f"{path}: expected an object schema with `properties` (the fields to extract)")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "top level"
        raise DataError(f"{path}: not a valid JSON Schema at {at}: {exc.message}") from None
    return schema


def schema_and_targets(task: TaskConfig, targets: dict[str, list[str]], files: dict[str, Path],
                       notes: list[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The extraction's schema (`task.schema`, or inferred from the train targets with a note in `notes`) and
    every split's targets (compact JSON, as read) checked against it and written in its field order."""
    if task.schema_file:
        schema_path = task.path / task.schema_file
        schema, source = load_schema(schema_path), str(schema_path)
    else:
        schema = infer_schema([json.loads(t) for t in targets["train"]])
        source = f"inferred from {files['train'].name}; give task.schema to allow more"
        notes.append(f"{task.path}: no task.schema: the fields' schema is inferred from the train targets "
                     f"({', '.join(schema['properties'])})")
    return schema, {split: checked_targets(files[split], rows, schema, source) for split, rows in targets.items()}


def parse_targets(path: Path, cells: list[Any], column: str) -> list[dict[str, Any]]:
    """Each row's target as a JSON object: an object cell, or text holding one."""
    targets = []
    for i, cell in enumerate(cells):
        value = cell
        if isinstance(cell, str):
            try:
                value = json.loads(cell)
            except json.JSONDecodeError:
                raise DataError(f"{path}: row {i + 1}: {column!r} is not JSON ({cell[:60]!r})") from None
        if not isinstance(value, dict):
            what = "empty" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"
            raise DataError(f"{path}: row {i + 1}: {column!r} is {what}, expected a JSON object of fields")
        targets.append(value)
    return targets


def checked_targets(path: Path, targets: list[str], schema: dict[str, Any], source: str) -> list[str]:
    """The split's targets (compact JSON) checked against the schema and written in its field order, the compact
    JSON a fine-tune learns. A null in a field whose schema allows none is taken as absent: reading an object
    column, Arrow fills every key a row lacks with null."""
    objects = [nulls_as_absent(json.loads(t), schema) for t in targets]
    check_targets(path, objects, schema, source)
    return [canonical(t, schema) for t in objects]


def nulls_as_absent(target: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The target without the nulls of fields whose schema allows no null (what Arrow fills in for a key a row
    of an object column lacks)."""
    properties = schema.get("properties", {})
    return {k: v for k, v in target.items() if v is not None or k not in properties or _allows_null(properties[k])}


def _allows_null(prop: dict[str, Any]) -> bool:
    """Whether null validates against the field's schema (a `$ref` it cannot resolve alone: taken as yes)."""
    from jsonschema import Draft202012Validator

    try:
        return Draft202012Validator(prop).is_valid(None)
    except Exception:  # noqa: BLE001 - an unresolvable reference: keep the null, the full check judges it
        return True


def check_targets(path: Path, targets: list[dict[str, Any]], schema: dict[str, Any], source: str) -> None:
    """Every target conforms to the schema; the first that does not is named with its row and field."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    for i, target in enumerate(targets):
        try:
            errors = list(validator.iter_errors(target))
        except Exception as exc:  # jsonschema raises what its resolver met: an unresolvable $ref, a bad regex
            raise DataError(f"{source}: the schema cannot check {path} row {i + 1}: {_first_line(exc)}") from None
        error = next(iter(sorted(errors, key=lambda e: [str(p) for p in e.path])), None)
        if error is not None:
            field = ".".join(str(p) for p in error.path) or "the object"
            raise DataError(f"{path}: row {i + 1}: {field} breaks the schema ({source}): {error.message[:120]}")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


def infer_schema(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """A schema from the train targets: each field's JSON types as seen, and null (a message may not give it;
    nothing is required), an enum where a string field takes few values each seen more than once."""
    fields: dict[str, list[Any]] = {}
    for target in targets:
        for name, value in target.items():
            fields.setdefault(name, []).append(value)
    properties = {}
    for name, values in fields.items():
        types = sorted({_json_type(v) for v in values} | {"null"})
        prop: dict[str, Any] = {"type": types}
        strings = Counter(v for v in values if isinstance(v, str))
        if strings and set(types) == {"string", "null"} and len(strings) <= ENUM_MAX_VALUES \
                and min(strings.values()) >= 2:
            prop["enum"] = sorted(strings) + [None]
        items = {_json_type(x) for v in values if isinstance(v, list) for x in v}
        if len(items) == 1:
            prop["items"] = {"type": items.pop()}
        properties[name] = prop
    return {"type": "object", "properties": properties}


def _json_type(value: Any) -> str:
    return next(name for kind, name in _JSON_TYPES if isinstance(value, kind))


def canonical(target: dict[str, Any], schema: dict[str, Any]) -> str:
    """The compact JSON a fine-tune learns to write: the schema's field order, then any other field."""
    order = list(schema.get("properties", {}))
    ordered = {k: target[k] for k in order if k in target} | {k: v for k, v in target.items() if k not in order}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def schema_fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields as templates show them: name, a type in words, the description, the allowed values."""
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        out.append({"name": name, "type": type_words(prop), "description": prop.get("description", ""),
                    "enum": [v for v in prop.get("enum", []) if v is not None], "required": name in required,
                    "nullable": _allows_null(prop)})
    return out


def type_words(prop: dict[str, Any]) -> str:
    """A field's type the way an instruction says it: "one of: low, normal, high", "list of strings", "string or null"."""
    types = [t for t in _types(prop) if t != "null"]
    nullable = _allows_null(prop) and bool(_types(prop) or "enum" in prop)
    if prop.get("enum"):
        words = "one of: " + ", ".join(str(v) for v in prop["enum"] if v is not None)
    elif types == ["array"]:
        item = prop.get("items", {}).get("type", "value")
        words = f"list of {item}s"
    else:
        words = " or ".join(types) or "value"
    return words + (" or null" if nullable else "")


def _types(prop: dict[str, Any]) -> list[str]:
    kind = prop.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)
