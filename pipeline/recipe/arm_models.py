"""Getting each arm's model: a local model (shared by prompt arms, loaded once), a LoRA fine-tune of
it (trained now, resumed, reused from a stage or given), or a client for an OpenAI-compatible API.

What differs between arms is data on the arm (its backend, whether it trains), never its name.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import torch

from pipeline.tracking import mlflow_store as tracking
from pipeline.backends.decoding.json_schema import JsonSchemaConstraint
from pipeline.backends.local import LocalSettings
from pipeline.backends.registry import backend_class
from pipeline.experiment.arms import Arm
from pipeline.experiment.config import ModelConfig
from pipeline.experiment.load import ExperimentPlan
from pipeline.recipe.inputs import RunInputs
from pipeline.task.splits import hash_files
from pipeline.models.loading import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_RECORD, check_adapter, load_model,
                                      load_tokenizer, model_bytes, quantize_int8, resolve_source)
from pipeline.models.dtype import auto_cpu_choice, pick_dtype
from pipeline.task.prompts import PromptTemplate
from pipeline.recipe.distill import TEACHER_LABELS, TEACHER_METRICS, distilled_rows, teacher_key
from pipeline.recipe.stages import stage_key


# Finetune keys that price owning the fine-tune rather than train it: a change to them retrains nothing.
OWNERSHIP_KEYS = {"search_runs", "retrain_every_months"}


class ArmModels:
    """Models, tokenizers and backends for the arms of one run, loaded on first use: a re-run whose
    stages are all stored loads nothing."""

    def __init__(self, plan: ExperimentPlan, console):
        self.plan, self.cfg, self.console = plan, plan.config, console
        self.notes: list[str] = []
        self._sources: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._models: dict[str, Any] = {}
        self._adapter_records: dict[str, dict] = {}

    # --- checks at the door ---------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Sources, given adapters and API keys, checked before any model loads or any call is paid."""
        if any(arm.model.in_process and arm.model.dtype == "auto" for arm in self.plan.arms) \
                and not torch.cuda.is_available():
            choice = auto_cpu_choice()
            self.notes.append(f"dtype auto is {str(choice.dtype).removeprefix('torch.')}: {choice.reason}")
        for arm in self.plan.arms:
            backend_class(arm.backend).check_model(arm.model, f"models.{arm.model_key}")
            resolve_source(self._tokenizer_source(arm))
            adapter = arm.finetune.adapter if arm.finetune else None
            if adapter is not None:  # only local models train (experiment.arms)
                record = check_adapter(adapter, self._source(arm), arm.model.trust_remote_code)
                self._adapter_records[arm.name] = record
                if "train_time_s" not in record:
                    self.notes.append(f"the given adapter {adapter} has no {TRAINING_RECORD}: its training cost "
                                      "is unknown and counted as $0")

    def _source(self, arm: Arm):
        if arm.model_key not in self._sources:
            self._sources[arm.model_key] = resolve_source(arm.model)
        return self._sources[arm.model_key]

    # --- names and identities -------------------------------------------------------------------

    def display_name(self, arm: Arm) -> str:
        return backend_class(arm.backend).model_name(arm.model)

    def identity(self, arm: Arm) -> dict[str, Any]:
        """What a stored measurement depends on, model-wise (never a key)."""
        return backend_class(arm.backend).model_identity(arm.model)

    def adapter_key(self, arm: Arm, inputs: RunInputs, template: PromptTemplate) -> str | None:
        """The stage key of the arm's adapter: the given adapter's files, or what training depends on."""
        if arm.finetune is None:
            return None
        if arm.finetune.adapter is not None:
            return stage_key("adapter", files=hash_files([arm.finetune.adapter / ADAPTER_CONFIG,
                                                          arm.finetune.adapter / ADAPTER_WEIGHTS]),
                             **self.identity(arm))
        # trl's version too: its SFTTrainer (and the fused head completion_head replaces) does the training
        teacher = self.teacher_of(arm)
        return stage_key("finetune", data=inputs.task.content_hash, prompt=template.sha, examples=inputs.examples,
                         finetune=arm.finetune.model_dump(exclude=OWNERSHIP_KEYS), train_dtype=str(self._train_dtype(arm)),
                         trl=version("trl"), **self.identity(arm),
                         # Distilled: the teacher's labels are the training data.
                         **({"teacher": teacher_key(self, inputs, teacher)} if teacher else {}))

    def teacher_of(self, arm: Arm) -> Arm | None:
        """The prompt arm whose answers label `arm`'s training rows (`finetune.labels_from`), or None."""
        name = arm.finetune.labels_from if arm.finetune else None
        return next(a for a in self.plan.arms if a.name == name) if name else None

    def _train_dtype(self, arm: Arm):
        return pick_dtype(arm.model.dtype if arm.finetune.dtype == "auto" else arm.finetune.dtype)

    # --- models ----------------------------------------------------------------------------------

    def _tokenizer_source(self, arm: Arm) -> ModelConfig:
        # A server without a tokenizer of its own counts with the top-level model's: an estimate (tagged so),
        # never a silent 0 tokens priced at $0.
        return backend_class(arm.backend).tokenizer_source(arm.model, self.cfg.model)

    def tokenizer_for(self, arm: Arm) -> Any:
        """The local tokenizer that renders and counts the arm's prompts."""
        config = self._tokenizer_source(arm)
        key = f"{config.source}:{config.gguf_file}"
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(resolve_source(config), config.trust_remote_code)
        return self._tokenizers[key]

    def check_schema_decoding(self, inputs: RunInputs) -> None:
        """An extraction schema the local constrained decoder cannot compile, or an `eval.max_new_tokens` too short
        for its shortest answer: one line before any model loads, not once the arms before it were measured."""
        if inputs.task.schema is None:
            return
        where = (f"{inputs.cfg.task.path / inputs.cfg.task.schema_file}" if inputs.cfg.task.schema_file
                 else "the schema inferred from the train targets")
        for arm in self.plan.arms:
            if arm.eval.decoding == "constrained" and arm.model.in_process:
                tokenizer = self.tokenizer_for(arm)
                constraint = JsonSchemaConstraint(tokenizer, inputs.task.schema, [tokenizer.eos_token_id], name=where)
                constraint.start(inputs.max_new_tokens(arm, tokenizer))

    def _load(self, arm: Arm) -> Any:
        t0 = time.perf_counter()
        model = load_model(self._source(arm), pick_dtype(arm.model.dtype), arm.model.trust_remote_code)
        self.console.print(f"model loaded: {self.display_name(arm)} in {time.perf_counter() - t0:.1f} s")
        return model

    def _fresh(self, arm: Arm) -> Any:
        """A copy of the arm's base weights of its own, to train or merge an adapter into: copied in memory from
        the shared one (a GGUF is dequantised once a run, not once per fine-tuned arm)."""
        import copy

        return copy.deepcopy(self._shared(arm))

    def _shared(self, arm: Arm) -> Any:
        """The base weights prompt arms share; never trained or merged into."""
        if arm.model_key not in self._models:
            self._models[arm.model_key] = self._load(arm)
        return self._models[arm.model_key]

    def backend(self, arm: Arm, inputs: RunInputs, template: PromptTemplate):
        """The arm's backend, ready to answer, and what getting it measured (training time and tokens)."""
        constrained = arm.eval.decoding == "constrained"
        labels = inputs.labels if constrained and inputs.labels else None
        schema = inputs.task.schema if constrained else None
        cls, tokenizer = backend_class(arm.backend), self.tokenizer_for(arm)
        max_new_tokens = inputs.max_new_tokens(arm, tokenizer)
        if not arm.model.in_process:
            return cls.for_eval(arm.model, max_new_tokens, labels, tokenizer, schema=schema), {}
        model, stats = (self._finetuned(arm, inputs, template) if arm.finetune is not None
                        else (self._shared(arm), {}))
        if arm.quantize == "int8":
            model = quantize_int8(model)
        stats = {**stats, "model_bytes": float(model_bytes(model))}
        renderer = inputs.renderer(template, tokenizer)
        # Evaluated sequentially, answers come back in order every `step_rows` prompts, where the rule checks.
        window = arm.eval.sequential.step_rows if arm.eval.sequential else None
        settings = LocalSettings(batch_size=arm.eval.batch_size, max_new_tokens=max_new_tokens,
                                 prefix_cache=arm.eval.prefix_cache, labels=labels, schema=schema, window_rows=window)
        return cls(model, tokenizer, settings, prefix_probe=renderer.prefix_probe()), stats

    def _finetuned(self, arm: Arm, inputs: RunInputs, template: PromptTemplate) -> tuple[Any, dict[str, float]]:
        """A fresh copy of the base with the arm's adapter merged in (served as deployed: no adapter
        overhead per call); its own copy, so no other arm sees trained or merged weights."""
        from pipeline.training.lora import load_adapter

        given = arm.finetune.adapter
        if given is not None:
            self.console.print(f"using the given adapter {given}")
            mlflow.set_tags({"adapter_source": str(given)})
            record = self._adapter_records.get(arm.name, {})
            stats = {k: float(record.get(k, 0.0)) for k in ("train_time_s", "train_tokens", "train_loss")}
            return load_adapter(self._fresh(arm), given).merge_and_unload(), stats
        key = self.adapter_key(arm, inputs, template)
        done = inputs.store.load(key)
        if done is not None:
            self.console.print(f"reusing the trained adapter ({key})")
            mlflow.set_tags({"reused_adapter": "true", "reused_stage": key})
            return load_adapter(self._fresh(arm), inputs.store.path(key) / "adapter").merge_and_unload(), done["train"]
        return self._train(arm, inputs, template, key)

    def _train(self, arm: Arm, inputs: RunInputs, template: PromptTemplate, key: str) -> tuple[Any, dict[str, float]]:
        from pipeline.training.lora import finetune

        if inputs.store.recompute:
            inputs.store.forget(key)
        train = inputs.task.splits["train"]
        texts, labels, distilled = list(train["text"]), list(train["label"]), None
        teacher = self.teacher_of(arm)
        if teacher is not None:
            distilled = distilled_rows(self, inputs, teacher, arm.name)
            texts, labels = distilled.texts, distilled.labels
        renderer = inputs.renderer(template, self.tokenizer_for(arm))
        self.console.print(f"fine-tuning LoRA r={arm.finetune.lora.r} on {len(texts)} rows"
                           + (f" labelled by {teacher.name}" if teacher else "") + " ...")
        dtype = self._train_dtype(arm)
        prompts, completions = [renderer.render(t) for t in texts], labels
        if arm.finetune.processes > 1:
            return self._train_on_processes(arm, inputs, key, prompts, completions, dtype,
                                            distilled.metrics if distilled else {})
        validation = inputs.task.splits.get("validation")
        result = finetune(
            self._fresh(arm).to(dtype), self.tokenizer_for(arm), prompts, completions, arm.finetune, dtype,
            inputs.store.work_dir(key), on_log=tracking.log_training_step,
            on_resume=lambda checkpoint: self.console.print(f"resuming training from {checkpoint}"),
            console=self.console,
            validation=([renderer.render(t) for t in validation["text"]], list(validation["label"]))
            if validation is not None and len(validation) else None,
        )
        stats = self._record_training(arm, inputs, key, {**vars(result), **(distilled.metrics if distilled else {})})
        # Served in the model's dtype, like a reused or given adapter (the stage key records that dtype).
        return result.model.merge_and_unload().to(pick_dtype(arm.model.dtype)), stats

    def _train_on_processes(self, arm: Arm, inputs: RunInputs, key: str, prompts: list[str], completions: list[str],
                            dtype: Any, distilled: dict[str, float]) -> tuple[Any, dict[str, float]]:
        """Data-parallel training in `finetune.processes` processes (pipeline.training.distributed); this process
        then loads the adapter their rank 0 saved, as it would a stored one."""
        from pipeline.training.distributed import train_on_processes
        from pipeline.training.lora import load_adapter

        work = inputs.store.work_dir(key)
        self.console.print(f"training on {arm.finetune.processes} processes (torchrun) ...")
        figures = train_on_processes(arm.model, prompts, completions, arm.finetune, dtype, work,
                                     on_log=tracking.log_training_step)
        mlflow.set_tag("train_processes", str(arm.finetune.processes))
        stats = self._record_training(arm, inputs, key, {**figures, **distilled, "adapter_dir": work / "adapter"})
        return load_adapter(self._fresh(arm), inputs.store.path(key) / "adapter").merge_and_unload(), stats

    def _record_training(self, arm: Arm, inputs: RunInputs, key: str, result: dict[str, Any]) -> dict[str, float]:
        """Log a finished training, write its record beside the adapter and store the stage; its figures."""
        if result.get("resumed_from"):
            checkpoint = Path(result["resumed_from"]).name
            mlflow.set_tag("resumed_from_checkpoint", checkpoint)
            # finetune() checks that the resume goes on as the interrupted training would have; where it cannot
            # tell, the run says so rather than passing the adapter off as the uninterrupted one.
            inexact = result.get("resumed_inexact")
            mlflow.set_tag("resumed", "inexact" if inexact else "exact")
            if inexact:
                self.notes.append(f"training resumed from {checkpoint} may differ from an uninterrupted one: {inexact}")
        mlflow.log_text(result["trainer_args"], "trainer/training_args.json")
        stats = {"train_time_s": result["train_time_s"], "train_tokens": float(result["train_tokens"]),
                 "train_loss": result["train_loss"]}
        if result.get("train_steps"):
            stats["train_steps"] = float(result["train_steps"])
        stats.update({k: float(result[k]) for k in TEACHER_METRICS if k in result})  # distilled: what labelling did
        if result.get("best_step") is not None:  # early stopping kept the adapter of this step
            stats["best_step"], stats["best_eval_loss"] = float(result["best_step"]), result["best_eval_loss"]
        # Travels with the adapter (and its MLflow artifact): reusing it elsewhere keeps its base and cost.
        (Path(result["adapter_dir"]) / TRAINING_RECORD).write_text(
            json.dumps({"base_model": self.display_name(arm), **stats}, indent=1))
        inputs.store.finish(key, {"train": stats})
        shutil.rmtree(inputs.store.path(key) / "trainer", ignore_errors=True)  # checkpoints are only for resuming
        self.console.print(f"trained in {stats['train_time_s']:.1f} s "
                           f"({stats['train_tokens'] / stats['train_time_s']:.0f} tokens/s)")
        return stats

    def log_adapter(self, arm: Arm, inputs: RunInputs, template: PromptTemplate) -> None:
        """The arm's adapter as the run's `adapter` artifact (what `roi serve --adapter runs:/...` loads)."""
        if arm.finetune is None:
            return
        teacher = self.teacher_of(arm)
        if teacher is not None:  # the rows it trained on, as its teacher labelled them
            labelled = inputs.store.path(teacher_key(self, inputs, teacher)) / TEACHER_LABELS
            if labelled.is_file():
                mlflow.log_artifact(str(labelled))
        adapter_dir = arm.finetune.adapter or inputs.store.path(self.adapter_key(arm, inputs, template)) / "adapter"
        if (adapter_dir / ADAPTER_WEIGHTS).is_file():
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
