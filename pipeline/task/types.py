"""What a task is, shared by reading, checking, prompting and scoring: its config sections, its labels, its
loaded splits, the one error its data can raise, and how a label is matched."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError


class DataError(UserError):
    """A data problem, already phrased as one line naming the file and row."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


class TaskConfig(_Strict):
    name: str | None = Field(default=None, description="default: the task folder's name")
    type: Literal["classification", "extraction", "generation"] = Field(
        default="classification", description="classification: one label a row (accuracy); extraction: a JSON "
        "object of fields a row (field_f1); generation: a reference text a row (chrf)")
    path: Path = Field(description="folder holding the split files")
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    # `unlabelled`: texts without labels, for a prompt arm to label (finetune.labels_from) and a student to learn.
    splits: dict[Literal["train", "validation", "test", "unlabelled"], str] = Field(
        default_factory=lambda: {"train": "train.jsonl", "test": "test.jsonl"}
    )
    text_column: str = "text"
    label_column: str = "label"
    target_column: str | None = Field(
        default=None, description="the column holding each row's answer (extraction: a JSON object or its text; "
        "generation: the reference text); default: label_column")
    instruction: str = Field(
        default="Write the answer for this input.", description="generation: what to write, in a sentence "
        "(the built-in naive and engineered prompts say it)")
    schema_file: str | None = Field(
        default=None, alias="schema", description="extraction: a JSON Schema file in `path` the targets follow; "
        "default: inferred from the train targets")
    labels: str | list[str] | None = Field(
        default=None,
        description="label file (JSON list of names or of {name, description}) in `path`, "
        "an inline list of names, or null to take the labels seen in train",
    )
    test_size: float = Field(default=0.3, gt=0, lt=1, description="used when no test split is given")
    validation_size: float = Field(default=0.0, ge=0, lt=1)


class DataConfig(_Strict):
    train_limit: int | None = Field(default=None, gt=0)
    seed: int = 0


@dataclass
class Label:
    name: str
    description: str = ""


@dataclass
class TaskData:
    name: str
    labels: list[Label]  # classification's label set; empty for other types
    splits: dict[str, Any]  # split name -> datasets.Dataset
    files: dict[str, Path]
    content_hash: str
    source_rows: dict[str, list[int]] = field(default_factory=dict)
    unlabelled: list[str] | None = None  # task.splits.unlabelled's texts
    notes: list[str] = field(default_factory=list)
    type: str = "classification"
    schema: dict[str, Any] | None = None  # extraction: the targets' JSON Schema (given or inferred)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


_LOOSE = re.compile(r"[\s_\-]+")  # the answer parser treats these alike too


def label_key(text: str) -> str:
    """What the answer parser matches a label by: lower case, without spaces, underscores or hyphens."""
    return _LOOSE.sub("", text.lower())
