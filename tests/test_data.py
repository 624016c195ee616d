import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.cli import main
from pipeline.task.types import DataConfig, TaskConfig
from pipeline.task.checks import check_task
from pipeline.task.splits import eval_rows, load_task, task_config_for_folder
from pipeline.task.types import DataError

SHIPPED = ROOT / "datasets" / "support_tickets"
BANKING = ROOT.parent / "shared" / "datasets" / "banking77"


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "support_tickets"
    shutil.copytree(SHIPPED, target)
    return target


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shipped_dataset_meets_its_card():
    task = load_task(task_config_for_folder(SHIPPED))
    report = check_task(task)
    assert report.errors == []
    assert sum(report.rows.values()) >= 1500
    assert report.rows["test"] >= 400
    assert 10 <= len(task.labels) <= 14
    assert all(counts["test"] >= 25 for counts in report.per_label.values())
    assert all(label.description for label in task.labels)
    assert report.near_duplicates == 0 and not any(report.exact_duplicates_within.values())
    assert report.test_train_5gram_overlap < 0.15
    assert 4 <= report.words["test"]["min"] and report.words["train"]["max"] <= 90


def test_data_check_passes_on_the_shipped_set(capsys):
    assert main(["data", "check", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates across splits: 0" in out and "ok" in out


def test_data_check_reads_an_experiment_config(capsys):
    assert main(["data", "check", str(ROOT / "experiments" / "default.yaml")]) == 0


def _break_cross_duplicate(folder):
    train = _rows(folder / "train.jsonl")
    test = _rows(folder / "test.jsonl")
    test[4] = {"text": train[0]["text"].upper() + "!!", "label": train[0]["label"]}
    _write_rows(folder / "test.jsonl", test)
    return "test.jsonl: row 5 duplicates", 1


def _break_unknown_label(folder):
    rows = _rows(folder / "train.jsonl")
    rows[9]["label"] = "sales"
    _write_rows(folder / "train.jsonl", rows)
    return "train.jsonl: row 10: label 'sales' is not in the label set", 2


def _break_empty_text(folder):
    rows = _rows(folder / "validation.jsonl")
    rows[2]["text"] = "   "
    _write_rows(folder / "validation.jsonl", rows)
    return "validation.jsonl: row 3: empty text", 2


def _break_missing_column(folder):
    rows = [{"message": r["text"], "label": r["label"]} for r in _rows(folder / "test.jsonl")]
    _write_rows(folder / "test.jsonl", rows)
    return "test.jsonl: missing column 'text'", 2


def _break_encoding(folder):
    (folder / "test.jsonl").write_bytes("{\"text\": \"caf\xe9\", \"label\": \"billing\"}\n".encode("latin-1"))
    return "test.jsonl: not UTF-8 text", 2


def _break_json(folder):
    with (folder / "train.jsonl").open("a") as f:
        f.write("{not json\n")
    return "train.jsonl: cannot be read as json", 2


def _break_label_file(folder):
    (folder / "labels.json").write_text("{\"billing\": 1}")
    return "labels.json: expected a non-empty JSON list", 2


def _break_empty_file(folder):
    (folder / "validation.jsonl").write_text("")
    return "validation.jsonl: file is empty", 2


@pytest.mark.parametrize("breaker", [
    _break_cross_duplicate, _break_unknown_label, _break_empty_text, _break_missing_column, _break_encoding,
    _break_json, _break_label_file, _break_empty_file,
])
def test_data_check_fails_on_broken_copies_with_one_line(tmp_path, capsys, breaker):
    folder = _copy(tmp_path)
    expected, code = breaker(folder)
    assert main(["data", "check", str(folder)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert str(folder) in err


def test_missing_split_file_is_named(tmp_path):
    folder = _copy(tmp_path)
    cfg = TaskConfig(path=folder, splits={"train": "train.jsonl", "test": "nope.jsonl"}, labels="labels.json")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_task(cfg)


def test_csv_and_parquet_and_seeded_splits(tmp_path):
    import pandas as pd

    rows = _rows(SHIPPED / "train.jsonl")[:200]
    frame = pd.DataFrame({"message": [r["text"] for r in rows], "team": [r["label"] for r in rows]})
    frame.to_csv(tmp_path / "all.csv", index=False)
    frame.to_parquet(tmp_path / "all.parquet")
    for name in ("all.csv", "all.parquet"):
        cfg = TaskConfig(path=tmp_path, splits={"train": name}, text_column="message", label_column="team",
                         test_size=0.25, validation_size=0.1)
        a = load_task(cfg, DataConfig(seed=3))
        b = load_task(cfg, DataConfig(seed=3))
        assert len(a.splits["test"]) == 50 and len(a.splits["validation"]) == 15
        assert a.splits["test"]["text"] == b.splits["test"]["text"]
        assert set(a.splits["test"]["text"]).isdisjoint(a.splits["train"]["text"])
        assert a.content_hash == b.content_hash
        assert a.label_names == sorted(set(frame["team"]))


def test_train_limit_and_eval_limit_are_seeded_samples():
    cfg = task_config_for_folder(SHIPPED)
    task = load_task(cfg, DataConfig(train_limit=100, seed=1))
    assert len(task.splits["train"]) == 100
    rows = eval_rows(task, 50, seed=1)
    assert len(rows) == 50 and rows["text"] == eval_rows(task, 50, seed=1)["text"]
    assert len(set(rows["label"])) > 5  # a sample across labels, not the first rows of a sorted file
    assert load_task(cfg, DataConfig(train_limit=100, seed=2)).content_hash != task.content_hash


@pytest.mark.skipif(not BANKING.is_dir(), reason="shared BANKING77 copy not present")
def test_data_check_works_on_banking77_and_reports_its_duplicates(capsys):
    code = main(["data", "check", str(BANKING)])
    captured = capsys.readouterr()
    assert "77 labels" in captured.out
    # BANKING77 as published has a few texts in both train and test: the check must say so.
    assert code == 1 and "duplicates" in captured.err and captured.err.count("\n") == 1


# --- reliability, round 2: what a new user's data can look like ------------------------------

def _task(tmp_path: Path, files: dict[str, str | bytes | list]) -> Path:
    """A small task folder: text, bytes, or rows (dicts, written as JSON Lines) per file name."""
    folder = tmp_path / "task"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, list):
            _write_rows(folder / name, content)
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
    return folder


def _tickets(n: int = 6, labels=("billing", "refund")) -> list[dict]:
    return [{"text": f"ticket number {i} about {labels[i % len(labels)]} {'x' * i}", "label": labels[i % len(labels)]}
            for i in range(n)]


def _check_fails(capsys, target: Path, expected: str) -> str:
    """`roi data check TARGET` exits 2 with exactly one `roi: error:` line that contains `expected`."""
    assert main(["data", "check", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err, err
    return err


def _set_label_file(folder: Path, names: list[str]) -> None:
    (folder / "labels.json").write_text(json.dumps(names))


def _case_label_file_case_clash(tmp_path):
    folder = _copy(tmp_path)
    entries = json.loads((folder / "labels.json").read_text())
    entries[6]["name"] = "BILLING"
    (folder / "labels.json").write_text(json.dumps(entries))
    return folder, ("labels.json: labels 'billing' (entry 1) and 'BILLING' (entry 7) look the same to the answer "
                    "parser (case, spaces and underscores are ignored)")


def _case_label_file_space_clash(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(labels=("card_payment", "refund")),
                              "labels.json": '["card_payment", "refund", "card payment"]'})
    return folder, "labels.json: labels 'card_payment' (entry 1) and 'card payment' (entry 3) look the same"


def _case_train_labels_clash(tmp_path):
    rows = _tickets(8)
    rows[6]["label"] = "BILLING"
    folder = _task(tmp_path, {"train.jsonl": rows})
    return folder, ("train.jsonl: labels 'BILLING' (row 7) and 'billing' (row 1) look the same to the answer parser "
                    "(case, spaces and underscores are ignored)")


def _case_single_label_file(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(labels=("billing",)), "labels.json": '["billing"]'})
    return folder, "labels.json: only one label ('billing'): nothing to classify (a task needs at least two)"


def _case_single_label_train(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(labels=("billing",))})
    return folder, "train.jsonl: only one label ('billing'): nothing to classify"


def _case_line_break_in_label_file(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(), "labels.json": '["billing", "refund", "bill\\ning"]'})
    return folder, "labels.json: entry 3: label 'bill\\ning' contains a line break"


def _case_line_break_in_row_label(tmp_path):
    folder = _copy(tmp_path)
    rows = _rows(folder / "train.jsonl")
    rows[3]["label"] = "billing\nrefund"
    _write_rows(folder / "train.jsonl", rows)
    return folder, "train.jsonl: row 4: label 'billing\\nrefund' contains a line break"


def _case_duplicate_label(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(), "labels.json": '["billing", "refund", "billing"]'})
    return folder, "labels.json: label 'billing' is listed twice (entry 1 and entry 3)"


def _case_blank_label(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(), "labels.json": '["billing", "  ", "refund"]'})
    return folder, "labels.json: entry 2: label '' is empty"


def _case_empty_label_cell(tmp_path):
    folder = _task(tmp_path, {"train.csv": "text,label\nmy invoice is wrong,billing\nmoney back please,\n"})
    return folder, "train.csv: row 2: empty label"


def _case_near_miss_label(tmp_path):
    folder = _copy(tmp_path)
    rows = _rows(folder / "test.jsonl")
    rows[1]["label"] = "Billing"
    _write_rows(folder / "test.jsonl", rows)
    return folder, "test.jsonl: row 2: label 'Billing' is not in the label set (labels.json; did you mean 'billing'?)"


def _case_header_only_test(tmp_path):
    folder = _task(tmp_path, {"train.csv": "text,label\nmy invoice,billing\nmoney back,refund\n",
                              "test.csv": "text,label\n"})
    return folder, "test.csv: no rows (only a header line)"


def _case_blank_lines_test(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(), "test.jsonl": "\n\n   \n"})
    return folder, "test.jsonl: no rows (the file has only blank lines)"


def _case_empty_json_list_test(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(), "test.json": "[]"})
    return folder, "test.json: no rows"


def _case_semicolon_missing_column(tmp_path):
    folder = _task(tmp_path, {"train.csv": "message;label\nmy invoice, again;billing\nmoney back;refund\n"})
    return folder, "train.csv: missing column 'text' (has: message, label; read with delimiter ';')"


def _case_column_case(tmp_path):
    folder = _task(tmp_path, {"train.csv": "Text,label\nmy invoice,billing\nmoney back,refund\n"})
    return folder, "train.csv: missing column 'text' (has: Text, label; did you mean 'Text' (task.text_column)?"


def _case_json_object_of_lists(tmp_path):
    rows = _tickets()
    folder = _task(tmp_path, {"train.json": json.dumps({"text": [r["text"] for r in rows],
                                                        "label": [r["label"] for r in rows]})})
    return folder, "train.json: the file is one JSON object holding lists, not rows"


def _case_list_in_text(tmp_path):
    rows = _tickets()
    rows[2]["text"] = ["two", "parts"]
    folder = _task(tmp_path, {"train.jsonl": rows})
    return folder, "train.jsonl: row 3: 'text' is a list"


def _case_very_long_text(tmp_path):
    rows = _tickets()
    rows[1]["text"] = "word " * 8000
    folder = _task(tmp_path, {"train.jsonl": rows})
    return folder, "train.jsonl: row 2: text is 40,000 characters long (the limit is 32,000)"


def _case_utf16(tmp_path):
    folder = _task(tmp_path, {"train.csv": "text,label\nmy invoice,billing\nmoney back,refund\n".encode("utf-16")})
    return folder, "train.csv: not UTF-8 text (it is UTF-16: save it as UTF-8)"


def _case_too_few_rows_to_split(tmp_path):
    folder = _task(tmp_path, {"train.jsonl": _tickets(1), "labels.json": '["billing", "refund"]'})
    return folder, "train.jsonl: only 1 row: too few to cut a test split from (task.test_size=0.3)"


@pytest.mark.parametrize("case", [
    _case_label_file_case_clash, _case_label_file_space_clash, _case_train_labels_clash, _case_single_label_file,
    _case_single_label_train, _case_line_break_in_label_file, _case_line_break_in_row_label, _case_duplicate_label,
    _case_blank_label, _case_empty_label_cell, _case_near_miss_label, _case_header_only_test, _case_blank_lines_test,
    _case_empty_json_list_test, _case_semicolon_missing_column, _case_column_case, _case_json_object_of_lists,
    _case_list_in_text, _case_very_long_text, _case_utf16, _case_too_few_rows_to_split,
])
def test_data_a_new_user_might_bring_fails_with_one_line(tmp_path, capsys, case):
    folder, expected = case(tmp_path)
    err = _check_fails(capsys, folder, expected)
    assert str(folder) in err


def _config(tmp_path: Path, folder: Path, **task) -> Path:
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": "x", "arms": ["naive"],
                                    "task": {"path": str(folder), "labels": None, **task}}))
    return path


def test_text_column_equal_to_label_column_is_named(tmp_path, capsys):
    folder = _task(tmp_path, {"train.jsonl": _tickets()})
    cfg = _config(tmp_path, folder, text_column="label", splits={"train": "train.jsonl"})
    _check_fails(capsys, cfg, "train.jsonl: task.text_column and task.label_column are both 'label'")


def test_one_file_for_two_splits_is_named(tmp_path, capsys):
    folder = _task(tmp_path, {"train.jsonl": _tickets()})
    cfg = _config(tmp_path, folder, splits={"train": "train.jsonl", "test": "train.jsonl"})
    _check_fails(capsys, cfg, "train.jsonl: named for both the train and the test split (task.splits)")


def test_a_label_clash_stops_roi_run_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder, expected = _case_label_file_case_clash(tmp_path)
    import yaml

    cfg = yaml.safe_load((ROOT / "experiments" / "default.yaml").read_text())
    cfg["task"]["path"] = str(folder)
    cfg["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_numeric_text_and_label_columns_are_read_as_text_with_a_note(tmp_path, capsys):
    rows = "".join(f"{1000 + 7 * i},{i % 3}\n" for i in range(12))
    folder = _task(tmp_path, {"train.csv": "text,label\n" + rows, "test.csv": "text,label\n5551,0\n5552,2\n0070,1\n"})
    assert main(["data", "check", str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"roi: note: {folder / 'train.csv'}: columns 'text' (only numbers), 'label' (only numbers) "
                            "read as text\n"
                            f"roi: note: {folder / 'test.csv'}: columns 'text' (only numbers), 'label' (only numbers) "
                            "read as text\n")
    task = load_task(task_config_for_folder(folder))
    assert task.label_names == ["0", "1", "2"] and "0070" in task.splits["test"]["text"]


def test_number_labels_from_json_and_parquet_are_names_not_floats(tmp_path, capsys):
    import datasets
    import pandas as pd

    rows = [{"text": f"intent example {i} {'y' * i}", "label": i % 4} for i in range(16)]
    folder = _task(tmp_path, {"train.jsonl": rows})
    pd.DataFrame({"text": [f"held out {i}" for i in range(4)], "label": [0.0, 1.0, 2.0, 3.0]}).to_parquet(
        folder / "test.parquet")
    # A Parquet file written by `datasets` keeps class-label ids with their names: the names are the labels.
    datasets.Dataset.from_dict({"text": ["checked 1", "checked 2"], "label": [3, 1]},
                               features=datasets.Features({"text": datasets.Value("string"),
                                                           "label": datasets.ClassLabel(names=["0", "1", "2", "3"])})
                               ).to_parquet(str(folder / "validation.parquet"))
    task = load_task(task_config_for_folder(folder))
    assert task.label_names == ["0", "1", "2", "3"] and task.splits["test"]["label"] == ["0", "1", "2", "3"]
    assert list(task.splits["validation"]["label"]) == ["3", "1"]
    err = capsys.readouterr().err
    assert f"roi: note: {folder / 'train.jsonl'}: column 'label' (int64) read as text\n" in err
    assert f"roi: note: {folder / 'test.parquet'}: column 'label' (float64) read as text\n" in err
    assert "validation.parquet" not in err and err.count("\n") == 2, err


def _as_csv(rows: list[dict], sep: str) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label"], delimiter=sep)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_csv_delimiter_is_sniffed(tmp_path, sep):
    rows = _rows(SHIPPED / "train.jsonl")[:120]
    folder = _task(tmp_path, {"train.csv": _as_csv(rows, sep), "labels.json": (SHIPPED / "labels.json").read_text()})
    task = load_task(task_config_for_folder(folder))
    assert len(task.splits["train"]) + len(task.splits["test"]) == 120
    assert sorted([*task.splits["train"]["text"], *task.splits["test"]["text"]]) == sorted(r["text"] for r in rows)


def test_bom_csv_bom_label_file_and_spaced_header_are_read(tmp_path, capsys):
    rows = _tickets(10)
    body = "text, label\n" + "".join(f"\"{r['text']}, really\", {r['label']}\n" for r in rows)
    folder = _task(tmp_path, {"train.csv": "\ufeff" + body, "labels.json": "\ufeff" + '["billing", "refund"]'})
    assert main(["data", "check", str(folder)]) == 0, capsys.readouterr().err
    task = load_task(task_config_for_folder(folder))
    assert task.label_names == ["billing", "refund"]
    assert all(t.endswith(", really") for t in task.splits["train"]["text"])


def test_a_json_list_and_json_lines_both_work(tmp_path, capsys):
    rows = _tickets(12)
    folder = _task(tmp_path, {"train.json": json.dumps(rows[:9], indent=2), "test.jsonl": rows[9:]})
    assert main(["data", "check", str(folder)]) == 0, capsys.readouterr().err
    task = load_task(task_config_for_folder(folder))
    assert task.splits["train"]["text"] == [r["text"] for r in rows[:9]]
    assert task.splits["test"]["label"] == [r["label"] for r in rows[9:]]


def test_inline_labels_in_the_config_are_checked_like_a_label_file(tmp_path, capsys):
    folder = _task(tmp_path, {"train.jsonl": _tickets()})
    cfg = _config(tmp_path, folder, splits={"train": "train.jsonl"}, labels=["billing", "refund", "Refund "])
    _check_fails(capsys, cfg, "task.labels: labels 'refund' (entry 2) and 'Refund' (entry 3) look the same to the "
                              "answer parser")


def test_the_content_hash_does_not_depend_on_the_order_splits_are_listed_in():
    """A config whose splits are listed in another order (as a YAML writer that sorts keys leaves them) reads
    the same data: the same hash, so its stored stages are reused."""
    folder = ROOT / "datasets" / "support_tickets"
    listed = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    hashes = {load_task(TaskConfig(path=folder, splits=dict(order), labels="labels.json")).content_hash
              for order in (listed.items(), sorted(listed.items()), reversed(list(listed.items())))}
    assert len(hashes) == 1
