"""Arms resolved from the config: each arm's model, prompt file, eval and finetune settings (the
top-level sections with the arm's own keys laid over them) and price; and the compare pair.
The built-in arm names mean something only in `BUILTIN_ARMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.experiment.config import (BUILTIN_ARMS, PROMPT_TEMPLATES, ArmSpec, ConfigError, EvalConfig, ExperimentConfig,
                             FinetuneConfig, ModelConfig, OpenAIModelConfig, describe_errors)
from pipeline.economics.catalog import Catalog, CatalogError
from pipeline.economics.prices import CatalogPrice, PerHourPrice, PerTokenPrice

TEMPLATES = Path(__file__).resolve().parents[1] / "task" / "templates"
EMBEDDED_MODEL = "embedded"
DEFAULT_MODEL = "model"  # the key arms without `model:` use: the top-level `model` section


@dataclass
class Arm:
    """One arm, resolved: everything needed to get its model, measure it and price it."""

    name: str
    kind: str  # "prompt" | "finetuned"
    model_key: str
    model: ModelConfig | OpenAIModelConfig
    prompt: Path
    eval: EvalConfig
    price: PerTokenPrice | PerHourPrice
    finetune: FinetuneConfig | None = None  # set: this arm trains (or loads `finetune.adapter`) a LoRA adapter
    fixed_cost_usd: float | None = None
    quantize: str | None = None  # "int8": served with int8 weights

    @property
    def backend(self) -> str:
        return self.model.backend

    @property
    def trains(self) -> bool:
        return self.finetune is not None


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _section(cls: type[BaseModel], base: BaseModel, override: dict, where: str) -> Any:
    """A top-level section with an arm's keys laid over it, validated; errors name the arm's key."""
    try:
        return cls.model_validate(_deep_merge(base.model_dump(), override))
    except ValidationError as exc:
        raise ConfigError(f"{where}.{describe_errors(exc.errors())}") from None


def _arm_spec(entry: Any, where: str) -> ArmSpec:
    if isinstance(entry, str):
        if entry not in BUILTIN_ARMS:
            raise ConfigError(f"{where}: {entry!r} is not a built-in arm ({', '.join(BUILTIN_ARMS)}); "
                              "write {name, model, prompt} for an arm of your own")
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a built-in arm name or a mapping with name, model and prompt")
    entry = {**BUILTIN_ARMS.get(entry.get("name"), {}), **entry}  # a built-in name brings its defaults
    try:
        return ArmSpec.model_validate(entry)
    except ValidationError as exc:
        raise ConfigError(f"{where}.{describe_errors(exc.errors())}") from None


def _prompt_file(cfg: ExperimentConfig, name: str, base: Path) -> Path:
    """A shipped template by name, for the task's type (or the `prompts:` file given for that name), else a path."""
    if name in PROMPT_TEMPLATES:
        given = getattr(cfg.prompts, name)
        shipped = TEMPLATES if cfg.task.type == "classification" else TEMPLATES / cfg.task.type
        return (given if given.is_absolute() else base / given) if given else shipped / f"{name}.yaml"
    path = Path(name)
    return path if path.is_absolute() else base / path


def _arm_model(cfg: ExperimentConfig, spec: ArmSpec, where: str) -> tuple[str, ModelConfig | OpenAIModelConfig]:
    if spec.model is None:
        return DEFAULT_MODEL, cfg.model
    if spec.model in cfg.models:
        return spec.model, cfg.models[spec.model]
    if spec.model == EMBEDDED_MODEL:
        return EMBEDDED_MODEL, ModelConfig(source=EMBEDDED_MODEL, dtype=cfg.model.dtype)
    known = ", ".join([EMBEDDED_MODEL, *cfg.models])
    raise ConfigError(f"{where}.model: no model named {spec.model!r} in `models` (known: {known})")


def resolve_arms(cfg: ExperimentConfig, base: Path, catalog: Catalog) -> list[Arm]:
    """Every arm with its model, prompt file, eval and finetune settings and price, checked."""
    arms: list[Arm] = []
    for i, entry in enumerate(cfg.arms):
        where = f"arms[{i}]"
        spec = _arm_spec(entry, where)
        where = f"arms[{i}] ({spec.name})"
        if any(a.name == spec.name for a in arms):
            raise ConfigError(f"{where}: arm name {spec.name!r} is used twice")
        model_key, model = _arm_model(cfg, spec, where)
        finetune = None
        if spec.finetune is not None:
            if not model.in_process:
                raise ConfigError(f"{where}.finetune: model {model_key!r} is an {model.backend} model; only local "
                                  "models are fine-tuned here (serve the adapter and set kind: finetuned instead)")
            finetune = _section(FinetuneConfig, cfg.finetune, spec.finetune, f"{where}.finetune")
            if finetune.adapter is not None and not finetune.adapter.is_absolute():
                finetune = finetune.model_copy(update={"adapter": base / finetune.adapter})
            if finetune.early_stopping is not None and finetune.processes > 1:
                raise ConfigError(f"{where}.finetune.early_stopping: not with several training processes "
                                  f"(finetune.processes={finetune.processes}); train on one or drop early_stopping")
            if finetune.adapter is not None and not finetune.adapter.is_dir():
                raise ConfigError(f"{where}.finetune.adapter: folder {finetune.adapter} not found")
        if "limit" in spec.eval:
            raise ConfigError(f"{where}.eval.limit: every arm is scored on the same test rows; set the top-level "
                              "eval.limit instead")
        if spec.quantize and not model.in_process:
            raise ConfigError(f"{where}.quantize: model {model_key!r} is an {model.backend} model; only local "
                              "models are quantized here")
        prompt = _prompt_file(cfg, spec.prompt, base)
        if not prompt.is_file():
            raise ConfigError(f"{where}.prompt: prompt file {prompt} not found")
        price = spec.price or cfg.pricing.arms.get(spec.name)
        if price is not None:
            price = priced_from_catalog(price, catalog, f"{where}.price")
        if price is None and not model.in_process:
            raise ConfigError(f"{where}.price: an arm on an {model.backend} model needs a price, e.g. "
                              "{kind: per_token, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60}")
        arms.append(Arm(
            name=spec.name, kind=spec.kind or ("finetuned" if finetune else "prompt"), model_key=model_key,
            model=model, prompt=prompt, eval=_section(EvalConfig, cfg.eval, spec.eval, f"{where}.eval"),
            price=price or PerHourPrice(kind="per_hour", usd_per_hour=cfg.pricing.default_usd_per_hour),
            finetune=finetune, fixed_cost_usd=spec.fixed_cost_usd, quantize=spec.quantize,
        ))
    if not arms:
        raise ConfigError("arms: at least one arm is needed")
    return arms


def priced_from_catalog(price: Any, catalog: Catalog, where: str) -> PerTokenPrice | PerHourPrice:
    """A price with its catalog references filled in: `{catalog: NAME}` becomes that row's per-token prices
    (with its source and date), a `hardware` preset gets its USD per hour."""
    try:
        if isinstance(price, CatalogPrice):
            row = catalog.tokens(price.catalog)
            return PerTokenPrice(
                kind="per_token", input_usd_per_mtok=row.input_usd_per_mtok, output_usd_per_mtok=row.output_usd_per_mtok,
                cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
                cache_write_usd_per_mtok=row.cache_write_usd_per_mtok,
                batch_input_usd_per_mtok=row.batch_input_usd_per_mtok,
                batch_output_usd_per_mtok=row.batch_output_usd_per_mtok,
                cache_min_prefix_tokens=row.cache_min_prefix_tokens, cache_hit_rate=price.cache_hit_rate,
                provider=row.provider, source=f"catalog {price.catalog}: {row.source}", date=row.date,
                deprecation_date=row.deprecation_date)
        if isinstance(price, PerHourPrice) and price.hardware is not None:
            row = catalog.hardware(price.hardware)
            return price.model_copy(update={"usd_per_hour": row.usd_per_hour, "source": price.source or row.source,
                                            "date": price.date or row.date})
    except CatalogError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ValidationError as exc:  # a catalog row whose values a price cannot take
        raise ConfigError(f"{where}: catalog {getattr(price, 'catalog', '')}: {describe_errors(exc.errors())}") from None
    return price


@dataclass(frozen=True)
class ComparePair:
    baseline: str | None
    candidate: str | None
    naive: str | None = None


def resolve_compare(cfg: ExperimentConfig, arms: list[Arm], base: Path) -> ComparePair:
    """The two arms the break-even is between: given, or the engineered prompt and the first fine-tune."""
    names = [a.name for a in arms]
    for key, given in (("compare.baseline", cfg.compare.baseline), ("pricing.baseline_arm", cfg.pricing.baseline_arm),
                       ("compare.candidate", cfg.compare.candidate), ("compare.naive", cfg.compare.naive)):
        if given is not None and given not in names:
            raise ConfigError(f"{key}: no arm named {given!r} (arms: {', '.join(names)})")
    baseline = cfg.compare.baseline or cfg.pricing.baseline_arm
    if baseline is None:
        engineered = _prompt_file(cfg, "engineered", base)
        prompt_arms = [a for a in arms if a.kind == "prompt"]
        baseline = next((a.name for a in prompt_arms if a.prompt == engineered),
                        prompt_arms[-1].name if prompt_arms else None)
    candidate = cfg.compare.candidate or next((a.name for a in arms if a.kind == "finetuned"), None)
    if baseline is not None and baseline == candidate:
        raise ConfigError(f"compare: baseline and candidate are the same arm {baseline!r}")
    naive_prompt = _prompt_file(cfg, "naive", base)
    naive = cfg.compare.naive or next((a.name for a in arms if a.kind == "prompt" and a.prompt == naive_prompt), None)
    return ComparePair(baseline, candidate, naive)


def resolve_curve_arm(cfg: ExperimentConfig, arms: list[Arm], pair: ComparePair) -> str | None:
    """The arm the learning curve trains again: `curve.arm` or the compare candidate; it must train here."""
    if cfg.curve is None:
        return None
    name = cfg.curve.arm or pair.candidate
    arm = next((a for a in arms if a.name == name), None)
    if arm is None:
        raise ConfigError(f"curve.arm: no arm named {name!r} (arms: {', '.join(a.name for a in arms)})" if name
                          else "curve: no fine-tuned arm to train (add one, or set curve.arm)")
    if not arm.trains or arm.finetune.adapter is not None:
        raise ConfigError(f"curve.arm: {name!r} does not train a LoRA adapter here; the curve needs an arm with a "
                          "`finetune` section and no finetune.adapter")
    if arm.finetune.labels_from and cfg.task.splits.get("unlabelled"):
        raise ConfigError(f"curve.arm: {name!r} learns from task.splits.unlabelled, whose rows have no labels to "
                          "take stratified subsets by; distil from the train split for a curve")
    return name


def check_teachers(arms: list[Arm], unlabelled: str | None = None) -> None:
    """`finetune.labels_from` names a prompt arm measured before the arm it labels for (its measured cost a call
    prices the labels); `task.splits.unlabelled` is there for such an arm."""
    names = [a.name for a in arms]
    if unlabelled and not any(a.finetune and a.finetune.labels_from for a in arms):
        raise ConfigError(f"task.splits.unlabelled: {unlabelled} has no labels and no arm has them made "
                          "(set finetune.labels_from: <a prompt arm> on a fine-tuned arm)")
    for i, arm in enumerate(arms):
        teacher = arm.finetune.labels_from if arm.finetune else None
        if teacher is None:
            continue
        where = f"arms[{i}] ({arm.name}).finetune.labels_from"
        if teacher not in names:
            raise ConfigError(f"{where}: no arm named {teacher!r} (arms: {', '.join(names)})")
        source = arms[names.index(teacher)]
        if source.name == arm.name or source.kind != "prompt" or source.trains:
            what = "the arm itself" if source.name == arm.name else "not a prompt arm"
            raise ConfigError(f"{where}: {teacher!r} is {what}; the labels come from a prompt arm (an API or local "
                              "model with a prompt)")
        if arm.finetune.adapter is not None:
            raise ConfigError(f"{where}: the arm loads finetune.adapter and trains nothing to label for")
        if names.index(teacher) > i:
            raise ConfigError(f"{where}: list {teacher!r} before {arm.name!r} in arms (its measured cost a call "
                              "prices the labels)")


def check_task_type(cfg: ExperimentConfig, arms: list[Arm], curve_arm: str | None) -> None:
    """What only a classification has: label-stratified learning curves, labels from a teacher's parsed answers,
    answers constrained to a label set (an extraction's are constrained to its schema; a generation's cannot be)."""
    kind = cfg.task.type
    if kind == "classification":
        return
    if curve_arm:
        raise ConfigError(f"curve: learning curves stratify the train rows by label: task.type {kind} has none "
                          "(remove `curve`)")
    for i, arm in enumerate(arms):
        if arm.finetune and arm.finetune.labels_from:
            raise ConfigError(f"arms[{i}] ({arm.name}).finetune.labels_from: distillation reads a teacher's labels; "
                              f"task.type {kind} is not a classification")
        if kind == "generation" and arm.eval.decoding == "constrained":
            raise ConfigError(f"arms[{i}] ({arm.name}).eval.decoding: constrained needs a label set or a schema; "
                              "a generation task has neither (use free)")
