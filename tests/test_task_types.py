"""Extraction and generation: the JSON parser, the normaliser, field-F1 and exact match by hand, the paired test
for a continuous metric, and bad targets and schemas refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from pipeline.economics.figures import ArmRows, paired_test
from pipeline.economics.stats import micro_f1, paired_permutation_p
from pipeline.measure.kinds import Extraction, Generation
from pipeline.measure.kinds.fields import field_counts, first_json_object, normalise, same_object
from pipeline.task.splits import load_task
from pipeline.task.types import DataError, TaskConfig

SCHEMA = json.loads((ROOT / "datasets" / "support_fields" / "schema.json").read_text())
FIELDS = list(SCHEMA["properties"])


@pytest.mark.parametrize("output, expected", [
    ('{"a": 1}', {"a": 1}),
    ('Here you go:\n```json\n{"a": "x", "b": [1, 2]}\n```', {"a": "x", "b": [1, 2]}),
    ('{broken {"a": null} {"b": 2}', {"a": None}),  # the first object that parses
    ('["a", "b"]', None),  # not an object
    ('{"a": 1', None),  # cut short
    ("no json here", None),
    ("", None),
])
def test_the_parser_takes_the_first_json_object(output, expected):
    assert first_json_object(output) == expected


@pytest.mark.parametrize("a, b", [
    ("  Dock ", "dock"), ("HIGH", "high"), ("two  words", "Two words"), (1000, "1,000"), ("1000.0", 1000),
    (3, 3.0), (["b", "a", "a"], ["a", "b", "a"]), ("", None),
])
def test_values_equal_after_normalising(a, b):
    assert normalise(a) == normalise(b)


@pytest.mark.parametrize("a, b", [("dock", "docks"), (["a", "a"], ["a"]), (True, "true"), (10, 100), ("E-1", "E1"),
                                  ("0044712", "44712")])  # an id's leading zeros are part of it
def test_values_that_differ_stay_different(a, b):
    assert normalise(a) != normalise(b)


def test_field_counts_by_hand():
    gold = {"product": "dock", "order_id": "ORD-7", "urgency": "high", "requested_action": "refund",
            "error_codes": ["E-1", "502", "502"]}
    answer = {"product": "Dock", "order_id": None, "urgency": "low", "requested_action": "refund",
              "error_codes": ["502", "E-9"], "note": "extra"}
    counts = field_counts(answer, gold, FIELDS)
    assert counts == {"product": [1, 0, 0], "order_id": [0, 0, 1], "urgency": [0, 1, 1],
                      "requested_action": [1, 0, 0], "error_codes": [1, 1, 2], "note": [0, 1, 0]}
    # TP 3, FP 3, FN 4: precision 3/6, recall 3/7, F1 6/13
    scored = Extraction(SCHEMA).score(json.dumps(answer), json.dumps(gold))
    assert scored.counts == (3, 3, 4) and scored.score == pytest.approx(6 / 13) and not scored.exact


def test_exact_match_treats_null_absent_and_empty_list_alike():
    gold = {"product": None, "order_id": None, "urgency": "low", "requested_action": "information", "error_codes": []}
    assert same_object({"urgency": "Low", "requested_action": "information"}, gold, FIELDS)
    assert not same_object({"urgency": "low", "requested_action": "information", "order_id": "1"}, gold, FIELDS)
    assert not same_object(None, gold, FIELDS)
    # nothing to find and nothing given: no pairs, so the row adds nothing to the micro counts
    assert field_counts({"urgency": "low", "requested_action": "information"}, gold, FIELDS)["error_codes"] == [0, 0, 0]


def test_extraction_metrics_are_micro_over_pairs_not_a_mean_of_rows():
    kind = Extraction(SCHEMA)
    base = {"product": "dock", "order_id": None, "urgency": "high", "requested_action": "refund", "error_codes": []}
    rich = {**base, "order_id": "7", "error_codes": ["a", "b", "c", "d", "e", "f"]}  # 10 pairs
    targets = [json.dumps(base), json.dumps(rich)]
    outputs = ['{"product": "dock", "urgency": "high", "requested_action": "refund"}',  # 3 of 3 right
               "I cannot help with that."]  # invalid: 10 false negatives
    scored = [kind.score(o, t) for o, t in zip(outputs, targets)]
    m = kind.metrics(scored, targets, outputs)
    assert m["field_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 10))  # micro: 0.375; the mean of rows would be 0.5
    assert m["field_precision"] == 1.0 and m["field_recall"] == pytest.approx(3 / 13)
    assert m["exact_match"] == 0.5 and m["json_valid_rate"] == 0.5 and m["invalid_rate"] == 0.5


def test_generation_scores_chrf_rouge_and_exact_match():
    kind = Generation()
    targets = ["Dock: monitor flickers after update; wants a fix", "Billing: charged twice; asks for refund"]
    outputs = ["dock:  monitor flickers after update; WANTS a fix", ""]
    scored = [kind.score(o, t) for o, t in zip(outputs, targets)]
    m = kind.metrics(scored, targets, outputs)
    assert scored[0].exact and scored[1].parsed is None and scored[1].score == 0.0
    assert 0.5 < scored[0].score < 1.0  # chrF is case-sensitive: close, not equal
    assert m["exact_match"] == 0.5 and m["invalid_rate"] == 0.5
    assert m["rouge_l"] == pytest.approx(0.5)  # rouge-score lower-cases: the first row is a perfect 1.0
    assert m["chrf"] == pytest.approx(scored[0].score / 2)


def test_the_paired_permutation_test_finds_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(0)
    a = rng.random(150)
    better = np.clip(a + 0.08 + rng.normal(0, 0.05, 150), 0, 1)
    noise = np.clip(a + rng.normal(0, 0.05, 150), 0, 1)
    mean = lambda s: s.mean(axis=-1)  # noqa: E731
    assert paired_permutation_p(better, a, mean) < 0.001
    assert paired_permutation_p(noise, a, mean) > 0.05
    # Paired: the same small shift is invisible to an unpaired comparison of these spread-out scores, not to this
    shifted = a + 0.02
    assert paired_permutation_p(shifted, a, mean) < 0.001


def test_the_permutation_test_of_micro_f1_moves_whole_rows():
    # arm b misses one pair on each of 40 rows; a row's counts must move together for the p to be small
    a = np.tile([3, 0, 0], (40, 1))
    b = np.tile([2, 0, 1], (40, 1))
    assert micro_f1(a) == 1.0 and micro_f1(b) == pytest.approx(0.8)
    assert paired_permutation_p(a, b, micro_f1) < 0.001
    rows_a = ArmRows(np.ones(40), None, None, np.ones(40), np.ones(40), counts=a.astype(float), binary=False)
    rows_b = ArmRows(np.ones(40), None, None, np.ones(40), np.ones(40), counts=b.astype(float), binary=False)
    name, p = paired_test(rows_a, rows_b)
    assert name == "permutation_p" and p < 0.01  # stats.resamples (1,000): p cannot go below 2/1,001
    assert rows_b.primary() == pytest.approx(0.8) and rows_b.head(10).primary() == pytest.approx(0.8)


def _task(tmp_path: Path, rows: list[dict], **config) -> TaskConfig:
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return TaskConfig(path=tmp_path, **config)


GOOD = {"product": "dock", "order_id": None, "urgency": "high", "requested_action": "refund", "error_codes": []}


def test_targets_as_objects_or_json_text_load_as_compact_json_in_schema_order(tmp_path):
    reordered = {"urgency": "high", "error_codes": [], "requested_action": "refund", "product": "dock", "order_id": None}
    rows = [{"text": "a", "fields": reordered}, {"text": "b", "fields": json.dumps(GOOD)}]
    shutil_schema = tmp_path / "schema.json"
    shutil_schema.write_text(json.dumps(SCHEMA))
    task = load_task(_task(tmp_path, rows, type="extraction", target_column="fields", schema="schema.json"))
    assert task.splits["train"]["label"][0] == json.dumps(GOOD, separators=(",", ":"))
    assert task.labels == [] and task.schema == SCHEMA


def test_without_a_schema_one_is_inferred_with_a_note(tmp_path, capsys):
    rows = [{"text": f"t{i}", "target": {**GOOD, "urgency": u}} for i, u in enumerate(["high", "low"] * 3)]
    task = load_task(_task(tmp_path, rows, type="extraction", target_column="target"))
    # every field may be null (a message may not give it) and none is required
    assert task.schema["properties"]["urgency"] == {"type": ["null", "string"], "enum": ["high", "low", None]}
    assert "required" not in task.schema
    assert "inferred from the train targets" in capsys.readouterr().err
    # a value train never has is refused like a label outside a classification's set, saying how to allow it
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "x", "target": {**GOOD, "urgency": "soon"}}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl: row 1: urgency breaks the schema \(inferred from train.jsonl; "
                                        r"give task.schema to allow more\)"):
        load_task(_task_files_kept(tmp_path, type="extraction", target_column="target"))


def _task_files_kept(tmp_path: Path, **config) -> TaskConfig:
    return TaskConfig(path=tmp_path, **config)


def test_nulls_are_read_as_absent_only_where_the_field_allows_no_null():
    from pipeline.task.schema import nulls_as_absent

    schema = {"properties": {"a": {"type": "string", "enum": ["x", None]}, "b": {"anyOf": [{"type": "string"},
                                                                                        {"type": "null"}]},
                             "c": {"const": "k"}, "d": {"type": ["string", "null"]}}}
    target = {"a": None, "b": None, "c": None, "d": None}
    # "a" lists null but its type is string: null is invalid there, as for const "c"
    assert nulls_as_absent(target, schema) == {"b": None, "d": None}


def test_a_key_a_row_lacks_is_absent_not_null_though_arrow_fills_it(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    rows = [{"text": "one", "fields": {"a": "x", "b": "y"}}, {"text": "two", "fields": {"a": "z"}}]
    task = load_task(_task(tmp_path, rows, type="extraction", target_column="fields", schema="schema.json"))
    assert task.splits["train"]["label"][:] == ['{"a":"x","b":"y"}', '{"a":"z"}']


def test_target_keys_outside_the_schema_count_as_pairs_to_find():
    gold = {**GOOD, "colour": "red"}
    assert field_counts(GOOD, gold, FIELDS)["colour"] == [0, 0, 1]
    assert field_counts(gold, gold, FIELDS)["colour"] == [1, 0, 0]


@pytest.mark.parametrize("target, message", [
    ("not json", r"train.jsonl: row 2: 'fields' is not JSON"),
    ('["a"]', r"train.jsonl: row 2: 'fields' is list"),
    ({**GOOD, "urgency": "soon"}, r"train.jsonl: row 2: urgency breaks the schema .*'soon' is not one of"),
    ({**GOOD, "colour": "red"}, r"train.jsonl: row 2: the object breaks the schema .*colour"),
])
def test_bad_targets_are_one_line_naming_file_and_row(tmp_path, target, message):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    rows = [{"text": "a", "fields": GOOD}, {"text": "b", "fields": target}]
    with pytest.raises(DataError, match=message):
        load_task(_task(tmp_path, rows, type="extraction", target_column="fields", schema="schema.json"))


@pytest.mark.parametrize("schema, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "object", "properties": {"a": {"type": "strnig"}}}), "not a valid JSON Schema at properties/a/type"),
    (json.dumps({"type": "array"}), "expected an object schema with `properties`"),
])
def test_bad_schema_files_are_one_line(tmp_path, schema, message):
    (tmp_path / "schema.json").write_text(schema)
    with pytest.raises(DataError, match=message):
        load_task(_task(tmp_path, [{"text": "a", "fields": GOOD}], type="extraction", target_column="fields",
                        schema="schema.json"))


def test_an_empty_generation_reference_is_refused(tmp_path):
    rows = [{"text": "a", "summary": "fine"}, {"text": "b", "summary": "  "}]
    with pytest.raises(DataError, match=r"train.jsonl: row 2: empty reference text in 'summary'"):
        load_task(_task(tmp_path, rows, type="generation", target_column="summary"))


def test_the_generation_default_answer_length_comes_from_the_targets():
    assert Generation.default_max_new_tokens(list(range(1, 101))) == 1 + 119  # p95 = 95, +25% = 118.75 -> 119
    assert Extraction.default_max_new_tokens([10, 40, 20]) == 51


def test_api_arms_get_the_schema_in_strict_form_and_the_answers_it_allows_stay_the_same():
    from jsonschema import Draft202012Validator

    from pipeline.backends.openai import strict_schema

    loose = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"enum": ["x", "y"]},
                                              "c": {"type": "array", "items": {"type": "string"}}}, "required": ["a"]}
    strict = strict_schema(loose)
    assert strict["required"] == ["a", "b", "c"] and strict["additionalProperties"] is False
    assert strict["properties"]["a"] == {"type": "string"}  # required stays as it was
    assert strict["properties"]["b"]["enum"] == ["x", "y", None] and strict["properties"]["c"]["type"] == ["array", "null"]
    # what strict mode makes a model write (every key, null where the loose schema had it absent) scores as the
    # loose answer would: null and absent are the same field
    answer = {"a": "q", "b": None, "c": None}
    assert not list(Draft202012Validator(strict).iter_errors(answer))
    assert same_object(answer, {"a": "q"}, ["a", "b", "c"])
    assert strict_schema(SCHEMA) == SCHEMA  # the shipped schema is strict already


def test_a_bare_folder_with_a_schema_is_checked_as_an_extraction(tmp_path):
    from pipeline.task.splits import task_config_for_folder

    task = task_config_for_folder(ROOT / "datasets" / "support_fields")
    assert (task.type, task.target_column, task.schema_file) == ("extraction", "fields", "schema.json")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "answer": json.dumps(GOOD)}) + "\n")
    assert task_config_for_folder(tmp_path).target_column == "answer"  # JSON text, another name
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "answer": GOOD, "meta": GOOD}) + "\n")
    with pytest.raises(DataError, match=r"which column holds the targets \(answer, meta\)"):
        task_config_for_folder(tmp_path)
