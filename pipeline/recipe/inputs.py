"""What every arm of one run reads: the plan, the task, the test rows, the prompts' examples and templates,
and the store of finished stages. Built once by the run, read by each arm's model and measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.experiment.arms import Arm
from pipeline.experiment.config import ExperimentConfig
from pipeline.experiment.load import ExperimentPlan
from pipeline.measure.kinds import KINDS, TaskKind, task_kind
from pipeline.recipe.stages import StageStore
from pipeline.task.prompts import PromptRenderer, PromptTemplate, count_tokens
from pipeline.task.schema import schema_fields
from pipeline.task.types import TaskData


@dataclass
class RunInputs:
    plan: ExperimentPlan
    task: TaskData
    rows: Any  # the test rows every arm is scored on (a datasets.Dataset)
    examples: list[dict[str, str]]  # the few-shot examples, the same for every arm
    templates: dict[str, PromptTemplate]  # arm name -> its prompt template
    store: StageStore

    @property
    def cfg(self) -> ExperimentConfig:
        return self.plan.config

    @property
    def labels(self) -> list[str]:
        return self.task.label_names

    def kind(self, arm: Arm) -> TaskKind:
        """How the arm's answers are read and scored (a classification's by its `eval.parser`)."""
        return task_kind(self.task, arm.eval.parser)

    @property
    def fields(self) -> list[dict[str, Any]]:
        """An extraction's fields as prompt templates see them (none for other task types)."""
        return schema_fields(self.task.schema) if self.task.schema else []

    def renderer(self, template: PromptTemplate, tokenizer: Any) -> PromptRenderer:
        """What turns an input into the prompt of an arm with `template` and `tokenizer`."""
        return PromptRenderer(template, tokenizer, self.task.labels, self.examples, self.fields,
                              self.cfg.task.instruction)

    def max_new_tokens(self, arm: Arm, tokenizer: Any) -> int:
        """The arm's `eval.max_new_tokens`, or its task type's default from the train targets' token lengths."""
        if arm.eval.max_new_tokens is not None:
            return arm.eval.max_new_tokens
        kind = KINDS[self.task.type]
        if kind.answer_tokens_fixed is not None:
            return kind.answer_tokens_fixed
        targets = self.task.splits["train"]["label"]
        return kind.default_max_new_tokens([count_tokens(tokenizer, t) for t in targets])

    @property
    def primary(self) -> str:
        """The task type's primary metric: accuracy, field_f1 or chrf."""
        return KINDS[self.task.type].primary
