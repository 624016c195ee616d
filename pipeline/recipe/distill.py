"""Distillation from the prompt route: a prompt arm (`finetune.labels_from`) labels the training texts and its
parsed answers become the fine-tune's train labels. Its answers are a stage of their own (a re-run pays for no
call again), written as `teacher_labels.jsonl`; an invalid answer drops its row and is counted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.economics.figures import paired_rows
from pipeline.economics.stats import mcnemar_exact
from pipeline.errors import UserError
from pipeline.experiment.arms import Arm
from pipeline.measure.scoring import PARSERS
from pipeline.recipe.inputs import RunInputs
from pipeline.recipe.stages import stage_key

TEACHER_LABELS = "teacher_labels.jsonl"
TEACHER_METRICS = ("teacher_calls", "distilled_rows", "teacher_invalid_rate", "teacher_agreement")


@dataclass(frozen=True)
class Distilled:
    """The rows the student trains on (text, the teacher's label) and what labelling them measured."""

    texts: list[str]
    labels: list[str]
    metrics: dict[str, float]  # teacher_calls, distilled_rows, teacher_invalid_rate, teacher_agreement
    file: Path  # teacher_labels.jsonl


def teacher_key(models: Any, inputs: RunInputs, teacher: Arm) -> str:
    """The stage key of the teacher's labels: the training texts and everything its answers depend on."""
    return stage_key("teacher", data=inputs.task.content_hash, prompt=inputs.templates[teacher.name].sha,
                     examples=inputs.examples, model=models.identity(teacher),
                     eval=teacher.eval.model_dump(include={"decoding", "parser", "max_new_tokens", "batch_size"}))


def distilled_rows(models: Any, inputs: RunInputs, teacher: Arm, student: str) -> Distilled:
    """The teacher's labels for the train split: stored ones, or its answers now (and stored)."""
    key = teacher_key(models, inputs, teacher)
    done = inputs.store.load(key)
    if done is None:
        texts, golds = _texts_and_golds(inputs)
        models.console.print(f"labelling {len(texts)} training rows with {teacher.name} ...")
        rows = _label(models, inputs, teacher, texts, golds)
        work = inputs.store.work_dir(key) / TEACHER_LABELS
        work.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        done = {"metrics": teacher_metrics(rows)}
        inputs.store.finish(key, done)
    else:
        models.console.print(f"reusing {teacher.name}'s labels of the training rows ({key})")
    path = inputs.store.path(key) / TEACHER_LABELS
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    kept = [r for r in rows if r["teacher_label"] is not None]
    if not kept:
        raise UserError(f"arms: {student}.finetune.labels_from: every one of {teacher.name}'s {len(rows)} answers "
                        "on the training rows was invalid (no label); nothing to train on")
    return Distilled([r["text"] for r in kept], [r["teacher_label"] for r in kept], done["metrics"], path)


def _label(models: Any, inputs: RunInputs, teacher: Arm, texts: list[str], golds: list[str | None]) -> list[dict]:
    """One call per text on the teacher's backend; each answer parsed as its evaluation parses it."""
    template, labels = inputs.templates[teacher.name], inputs.labels
    renderer = inputs.renderer(template, models.tokenizer_for(teacher))
    backend, _ = models.backend(teacher, inputs, template)
    try:
        calls = backend.run([renderer.prompt(t) for t in texts])
    finally:
        backend.close()
    parse = PARSERS[teacher.eval.parser]
    rows = []
    for i, (text, gold, call) in enumerate(zip(texts, golds, calls)):
        parsed = parse(call.output, labels) if call.error is None else -1
        rows.append({"row_id": i, "text": text, "teacher_label": labels[parsed] if parsed >= 0 else None,
                     "gold_label": gold, "raw_output": call.output, **({"error": call.error} if call.error else {})})
    return rows


def _texts_and_golds(inputs: RunInputs) -> tuple[list[str], list[str | None]]:
    """What the teacher labels: `task.splits.unlabelled`'s texts (no gold), else the train split's (with it)."""
    if inputs.task.unlabelled is not None:
        return inputs.task.unlabelled, [None] * len(inputs.task.unlabelled)
    train = inputs.task.splits["train"]
    return list(train["text"]), list(train["label"])


def teacher_metrics(rows: list[dict]) -> dict[str, float]:
    """`teacher_calls`, `distilled_rows` (valid answers), `teacher_invalid_rate`, and `teacher_agreement`: the
    share of the rows with a gold label whose teacher label equals it (an invalid answer disagrees)."""
    kept = [r for r in rows if r["teacher_label"] is not None]
    gold = [r for r in rows if r["gold_label"] is not None]
    out = {"teacher_calls": float(len(rows)), "distilled_rows": float(len(kept)),
           "teacher_invalid_rate": 1 - len(kept) / len(rows) if rows else 0.0}
    if gold:
        out["teacher_agreement"] = sum(r["teacher_label"] == r["gold_label"] for r in gold) / len(gold)
    return out


def student_vs_teacher(exp: Any) -> list[dict[str, Any]]:
    """Each distilled arm against the prompt arm that labelled its training rows, on the test rows both scored:
    their accuracies and McNemar's p (does the student match its teacher?), and what labelling cost."""
    out = []
    for arm in exp.plan.arms:
        teacher = arm.finetune.labels_from if arm.finetune else None
        if not teacher or arm.name not in exp.outcomes or teacher not in exp.outcomes:
            continue
        student, labeller = paired_rows(exp.outcomes, arm.name, teacher)
        m = exp.measured.get(arm.name, {})
        out.append({"student": arm.name, "teacher": teacher, "rows": len(student),
                    "student_accuracy": float(student.score.mean()),
                    "teacher_accuracy": float(labeller.score.mean()),
                    "mcnemar_p": mcnemar_exact(student.score, labeller.score),
                    **{k: m[k] for k in ("teacher_agreement", "teacher_invalid_rate", "distilled_rows",
                                         "labelling_cost_usd") if k in m}})
    return out
