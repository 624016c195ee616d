"""What every arm of one run reads: the plan, the task, the test rows, the prompts' examples and templates,
and the store of finished stages. Built once by the run, read by each arm's model and measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.experiment.config import ExperimentConfig
from pipeline.experiment.load import ExperimentPlan
from pipeline.recipe.stages import StageStore
from pipeline.task.prompts import PromptTemplate
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
