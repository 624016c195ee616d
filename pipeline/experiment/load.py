"""Loading an experiment: one YAML file plus `key=value` overrides, validated once, its arms resolved.

`load_experiment` returns an `ExperimentPlan`: the validated config (relative paths made absolute and the
fine-tune's catalog rates filled in, as a new config: the validated one is never changed), the arms with
every default filled in, and the compare pair. Every other module receives a plan and can trust it.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.economics.catalog import Catalog, CatalogError, load_catalog
from pipeline.economics.prices import CatalogPrice, PerTokenPrice
from pipeline.economics.serving import price_notes
from pipeline.experiment.arms import (Arm, ComparePair, check_task_type, check_teachers, priced_from_catalog, resolve_arms,
                                      resolve_compare, resolve_curve_arm)
from pipeline.experiment.config import ConfigError, ExperimentConfig, describe_errors


@dataclass(frozen=True)
class ExperimentPlan:
    """What one run will do: the validated config, its arms resolved, and the pair the break-even compares."""

    config: ExperimentConfig
    arms: list[Arm]
    pair: ComparePair
    path: Path
    written: dict = field(default_factory=dict)  # the YAML as written, with the command line's overrides
    what_if: dict[str, PerTokenPrice] = field(default_factory=dict)  # report.price_what_if, priced
    notes: list[str] = field(default_factory=list)  # prices a reader should doubt
    curve_arm: str | None = None  # the arm the learning curve trains again (`curve`)

    def models_by_backend(self) -> dict[str, dict[str, Any]]:
        """The distinct models the arms use, by backend name: {backend: {model key: model config}}."""
        out: dict[str, dict[str, Any]] = {}
        for arm in self.arms:
            out.setdefault(arm.backend, {})[arm.model_key] = arm.model
        return out

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in and each arm resolved (what a run used)."""
        data = self.config.model_dump(mode="json", exclude={"arms"})
        data["arms"] = [{
            "name": a.name, "kind": a.kind, "model": a.model_key, "backend": a.backend, "prompt": str(a.prompt),
            "price": a.price.model_dump(mode="json"), "fixed_cost_usd": a.fixed_cost_usd, "quantize": a.quantize,
            "eval": a.eval.model_dump(mode="json"),
            "finetune": a.finetune.model_dump(mode="json") if a.finetune else None,
        } for a in self.arms]
        data["compare"] = {"baseline": self.pair.baseline, "candidate": self.pair.candidate, "naive": self.pair.naive}
        return data

    def params(self) -> dict[str, Any]:
        """The resolved config as flat MLflow params: sections as dotted keys, arms as `arm.NAME.key`."""
        data = self.resolved()
        arms = data.pop("arms")
        params = flatten(data)
        params["arms"] = ",".join(a["name"] for a in arms)
        for arm in arms:
            name = arm.pop("name")
            # An arm's eval and finetune keys equal the top-level ones unless overridden: log only what differs.
            for section in ("eval", "finetune"):
                own, shared = flatten(arm.pop(section) or {}), flatten(data.get(section) or {})
                params.update({f"arm.{name}.{section}.{k}": v for k, v in own.items() if shared.get(k) != v})
            params.update({f"arm.{name}.{k}": v for k, v in flatten(arm).items()})
        return params


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentPlan:
    """Read, override, validate and resolve an experiment config, or raise ConfigError with one line."""
    path = Path(path)
    written = apply_overrides(read_yaml_mapping(path), overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(written)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc.errors())}") from None
    base = project_root_for(path)
    try:
        cfg = with_paths_resolved(cfg, base)
        catalog = _catalog(cfg)
        cfg = with_finetune_rates(cfg, catalog)
        arms = resolve_arms(cfg, base, catalog)
        pair = resolve_compare(cfg, arms, base)
        curve_arm = resolve_curve_arm(cfg, arms, pair)
        check_teachers(arms, cfg.task.splits.get("unlabelled"))
        check_task_type(cfg, arms, curve_arm)
        check_ownership(cfg, arms)
        what_if = {name: priced_from_catalog(CatalogPrice(catalog=name), catalog, f"report.price_what_if[{i}]")
                   for i, name in enumerate(cfg.report.price_what_if)}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not cfg.task.path.is_dir():
        raise ConfigError(f"{path}: task.path: folder {cfg.task.path} not found")
    today = datetime.date.today().isoformat()
    priced = {**{a.name: a.price for a in arms if isinstance(a.price, PerTokenPrice)}, **what_if}
    notes = [n for name, price in priced.items() for n in price_notes(name, price, today, cfg.pricing.max_price_age_days)]
    return ExperimentPlan(cfg, arms, pair, path, written, what_if, notes, curve_arm)


def check_ownership(cfg: ExperimentConfig, arms: list[Arm]) -> None:
    """Keys that price owning a route, checked against each other (each alone is checked by the schema)."""
    horizon = cfg.pricing.horizon_months
    for arm in arms:
        every = arm.finetune.retrain_every_months if arm.finetune else None
        if every is not None and every > horizon:
            raise ConfigError(f"arms ({arm.name}).finetune.retrain_every_months: {every:g} is longer than "
                              f"pricing.horizon_months ({horizon:g}); it would never retrain")


def read_yaml_mapping(path: Path) -> dict:
    """A config file's top-level mapping, or one ConfigError line naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-typed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `dotted.key=value` set, creating sections as needed."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def project_root_for(config_file: Path) -> Path:
    """Configs in `experiments/` resolve paths against the folder above; others against their own."""
    folder = config_file.resolve().parent
    return folder.parent if folder.name == "experiments" else folder


def with_paths_resolved(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """The config with its relative paths made relative to the project root (a copy)."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    return cfg.model_copy(update={
        "task": cfg.task.model_copy(update={"path": fix(cfg.task.path)}),
        "output_dir": fix(cfg.output_dir),
        "finetune": cfg.finetune.model_copy(update={"adapter": fix(cfg.finetune.adapter)}),
        "pricing": cfg.pricing.model_copy(update={"catalog": fix(cfg.pricing.catalog)}),
    })


def with_finetune_rates(cfg: ExperimentConfig, catalog: Catalog) -> ExperimentConfig:
    """The config with the fine-tune's rates from the catalog: a hardware preset's USD per hour, a provider's
    training price (a copy)."""
    rates = cfg.pricing.finetune
    update: dict[str, Any] = {}
    try:
        if rates.hardware is not None:
            update["usd_per_hour"] = catalog.hardware(rates.hardware).usd_per_hour
        if rates.catalog is not None:
            training = catalog.tokens(rates.catalog).training_usd_per_mtok
            if training is None:
                raise ConfigError(f"pricing.finetune.catalog: {rates.catalog} has no training price in the catalog; "
                                  "set pricing.finetune.training_usd_per_mtok")
            update["training_usd_per_mtok"] = training
    except CatalogError as exc:
        raise ConfigError(f"pricing.finetune: {exc}") from None
    if not update:
        return cfg
    return cfg.model_copy(update={"pricing": cfg.pricing.model_copy(update={"finetune": rates.model_copy(update=update)})})


def _catalog(cfg: ExperimentConfig) -> Catalog:
    try:
        return load_catalog(cfg.pricing.catalog)
    except CatalogError as exc:
        raise ConfigError(f"pricing.catalog: {exc}") from None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (for MLflow params)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}
