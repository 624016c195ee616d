"""Distillation (`finetune.labels_from`): a prompt arm on a real local OpenAI-compatible server
(tests/fake_openai.py), scripted to answer wrong on 20% of the training rows, labels them; the student trains
on those labels, its labelling cost is the teacher's calls at the teacher's measured cost a call, a re-run asks
the teacher nothing again, and a bad `labels_from` is one line before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, roi, sqlite_store
from fake_openai import FakeOpenAI
from pipeline.cli import main

SOURCE = ROOT / "datasets" / "support_tickets"
PRICE = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}


def _rows(split: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text().splitlines()[:n]]


TRAIN, TEST = _rows("train", 50), _rows("test", 24)
GOLD = {r["text"]: r["label"] for r in TRAIN + TEST}
WRONG = {r["text"] for r in TRAIN[::5]}  # 10 of the 50 training rows: agreement 0.80


def teacher(prompt: str) -> str:
    text = next(t for t in GOLD if t in prompt)
    if text in WRONG:
        return "refund" if GOLD[text] != "refund" else "billing"
    return GOLD[text]


def _task(tmp_path: Path) -> Path:
    folder = tmp_path / "tickets"
    folder.mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "labels.json").write_text((SOURCE / "labels.json").read_text())
    return folder


def _config(tmp_path: Path, url: str, unlabelled: bool = False, **student) -> Path:
    path = tmp_path / "distill.yaml"
    folder = _task(tmp_path)
    splits = {"train": "train.jsonl", "test": "test.jsonl"}
    if unlabelled:  # the training texts again, without their labels: the teacher's are all the student gets
        (folder / "unlabelled.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in TRAIN))
        splits["unlabelled"] = "unlabelled.jsonl"
    path.write_text(yaml.safe_dump({
        "experiment": "distill",
        "task": {"path": str(folder), "labels": "labels.json", "splits": splits},
        "models": {"api": {"backend": "openai", "base_url": url, "model": "fake", "max_concurrency": 4}},
        "arms": [{"name": "teacher", "model": "api", "prompt": "naive", "price": PRICE},
                 {"name": "student", "prompt": "finetuned", "finetune": {"labels_from": "teacher", **student}}],
        "prompts": {"few_shot_k": 0},
        "finetune": {"max_steps": 2, "batch_size": 8},
        "eval": {"warmup": 0, "batch1_sample": 0, "uncached_sample": 0, "max_new_tokens": 6, "sequential": None},
        "output_dir": str(tmp_path / "runs")}))
    return path


def _runs(tmp_path: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distill").experiment_id],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("roi.role") == "parent")
    arms = {r.data.tags["arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, parent, arms


@pytest.mark.model
def test_the_student_trains_on_the_teachers_labels_priced_at_the_teachers_calls(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    with FakeOpenAI(answers=teacher) as server:
        config = _config(tmp_path, server.base_url)
        first = roi("run", str(config), env=env, cwd=tmp_path, timeout=600)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        asked_first = len(server.requests)
        second = roi("run", str(config), env=env, cwd=tmp_path, timeout=600)
        assert second.returncode == 0, second.stderr[-2000:]
        asked_again = [r for r in server.requests[asked_first:] if any(t["text"] in r.get("input", "") for t in TRAIN)]
    assert asked_again == []  # the teacher's labels are a stage: a re-run pays for no call again

    client, parent, arms = _runs(tmp_path)
    student, teacher_run = arms["student"].data.metrics, arms["teacher"].data.metrics
    assert student["teacher_calls"] == 50 and student["distilled_rows"] == 50
    assert student["teacher_agreement"] == pytest.approx(0.80)
    assert student["labelling_cost_usd"] == pytest.approx(50 * teacher_run["cost_per_call_usd"])
    labelled = client.download_artifacts(arms["student"].info.run_id, "teacher_labels.jsonl", str(tmp_path))
    rows = [json.loads(line) for line in Path(labelled).read_text().splitlines()]
    # The train labels are the teacher's answers, wrong ones included; the gold ones are kept beside them.
    assert [r["teacher_label"] for r in rows] == [teacher(r["text"]) for r in TRAIN]
    assert [r["gold_label"] for r in rows] == [r["label"] for r in TRAIN]
    assert "student_teacher_mcnemar_p" in parent.data.metrics
    folder = max((tmp_path / "runs" / "distill").glob("2*"))
    assert "A fine-tune distilled from teacher matches its teacher" in (folder / "report" / "roi_report.md").read_text()


@pytest.mark.parametrize("arms, words", [
    ([{"name": "s", "prompt": "finetuned", "finetune": {"labels_from": "nobody"}}], "no arm named 'nobody'"),
    ([{"name": "s", "prompt": "finetuned", "finetune": {"labels_from": "s"}}], "'s' is the arm itself"),
    (["finetuned", {"name": "s", "prompt": "finetuned", "finetune": {"labels_from": "finetuned"}}],
     "'finetuned' is not a prompt arm"),
    ([{"name": "s", "prompt": "finetuned", "finetune": {"labels_from": "naive"}}, "naive"],
     "list 'naive' before 's' in arms"),
])
def test_a_bad_labels_from_is_one_line_before_any_work(tmp_path, capsys, arms, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"experiment": "distill", "task": {"path": str(SOURCE), "labels": "labels.json"},
                                    "arms": arms, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_teacher_whose_answers_are_all_invalid_stops_before_training(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    with FakeOpenAI(answers=lambda prompt: "I cannot tell.") as server:
        result = roi("run", str(_config(tmp_path, server.base_url)), env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert result.stderr.strip().endswith("nothing to train on") and result.stderr.count("\n") == 1
    assert "fine-tuning LoRA" not in result.stdout


@pytest.mark.model
def test_an_unlabelled_file_is_labelled_by_the_teacher_and_has_no_agreement_to_measure(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"), PYTHONUNBUFFERED="1")
    with FakeOpenAI(answers=teacher) as server:
        result = roi("run", str(_config(tmp_path, server.base_url, unlabelled=True)), env=env, cwd=tmp_path,
                     timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    client, _, arms = _runs(tmp_path)
    student = arms["student"].data.metrics
    assert student["teacher_calls"] == 50 and "teacher_agreement" not in student
    labelled = client.download_artifacts(arms["student"].info.run_id, "teacher_labels.jsonl", str(tmp_path))
    rows = [json.loads(line) for line in Path(labelled).read_text().splitlines()]
    assert [r["teacher_label"] for r in rows] == [teacher(r["text"]) for r in TRAIN]
    assert all(r["gold_label"] is None for r in rows)


def test_an_unlabelled_file_without_a_teacher_is_one_line(tmp_path, capsys):
    config = _config(tmp_path, "http://127.0.0.1:9/v1", unlabelled=True)
    data = yaml.safe_load(config.read_text())
    data["arms"] = ["naive", "finetuned"]
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "task.splits.unlabelled: unlabelled.jsonl has no labels and no arm has them made" in err
    assert err.count("\n") == 1
