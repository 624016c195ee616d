"""Prices as a config states them: per token (an API), per hour (a self-hosted deployment) or a catalog
row; the `pricing` section; and the bootstrap settings (`stats`). Validated once, with the config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PerTokenPrice(_Strict):
    """An API billed by the token (USD per million tokens), with the provider's caching and batch rates."""

    kind: Literal["per_token"] = "per_token"
    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    cached_input_usd_per_mtok: float | None = Field(default=None, ge=0, description="a cache read")
    cache_write_usd_per_mtok: float | None = Field(default=None, ge=0, description="a cache write (Anthropic: 1.25x)")
    batch_input_usd_per_mtok: float | None = Field(default=None, ge=0, description="the batch API (offline work)")
    batch_output_usd_per_mtok: float | None = Field(default=None, ge=0)
    cache_min_prefix_tokens: int = Field(default=1024, ge=0,
                                         description="the shortest static prefix the provider caches")
    cache_hit_rate: float | None = Field(
        default=None, ge=0, le=1, description="share of calls that find the prefix cached; unset: from the arrival "
        "rate and the provider's cache lifetime (economics.serving.cache_hit_rate)")
    provider: str | None = Field(default=None, description="whose caching and batch rules bill it: openai, "
                                 "anthropic, ... (a catalog row's litellm_provider); unset: openai's")
    source: str | None = None
    date: str | None = None
    deprecation_date: str | None = None


class CatalogPrice(_Strict):
    """`{catalog: gpt-4o-mini}`: the per-token prices of a catalog row (shipped or `pricing.catalog`)."""

    kind: Literal["catalog"] = "catalog"
    catalog: str = Field(min_length=1)
    cache_hit_rate: float | None = Field(default=None, ge=0, le=1)


class PerHourPrice(_Strict):
    """A self-hosted deployment: replicas at `usd_per_hour` (or a catalog `hardware` preset), billed every hour
    whether busy or not (`always_on`: `min_replicas` always on, each planned at `target_utilisation` of the
    throughput it can batch), or by the second they run (`per_second`, x `premium`, `cold_start_s` billed at
    each scale-up from zero; `min_replicas: 0` lets it scale to zero after `idle_timeout_s`)."""

    kind: Literal["per_hour"] = "per_hour"
    usd_per_hour: float | None = Field(default=None, ge=0)
    hardware: str | None = Field(default=None, description="a hardware preset: cpu-2core, t4, l4, a10g, a100, h100")
    billing: Literal["always_on", "per_second"] = "always_on"
    min_replicas: int = Field(default=1, ge=0)
    target_utilisation: float = Field(default=0.6, gt=0, le=1)
    premium: float = Field(default=1.0, gt=0, description="per_second: the serverless rate over usd_per_hour")
    cold_start_s: float = Field(default=0.0, ge=0, description="per_second: seconds billed at each scale-up from zero")
    idle_timeout_s: float = Field(default=300.0, gt=0, description="per_second: idle seconds before it scales to zero")
    source: str | None = None
    date: str | None = None

    @model_validator(mode="after")
    def _one_rate(self) -> "PerHourPrice":
        if (self.usd_per_hour is None) == (self.hardware is None):
            raise ValueError("give usd_per_hour or hardware (one of them)")
        return self


# A price's keys say its kind; `kind:` may still be given, and wins.
_KIND_KEYS = {"catalog": ("catalog",), "per_token": ("input_usd_per_mtok", "output_usd_per_mtok"),
              "per_hour": ("usd_per_hour", "hardware")}


def _price_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "kind" in value:
            return value["kind"]
        return next((kind for kind, keys in _KIND_KEYS.items() if any(k in value for k in keys)), None)
    return getattr(value, "kind", None)


ArmPrice = Annotated[Union[Annotated[PerTokenPrice, Tag("per_token")], Annotated[PerHourPrice, Tag("per_hour")],
                           Annotated[CatalogPrice, Tag("catalog")]], Discriminator(_price_kind)]


DEFAULT_USD_PER_HOUR = 0.10  # a 2-core CPU box: what every self-hosted arm costs unless priced


class FinetuneCost(_Strict):
    usd_per_hour: float = Field(default=DEFAULT_USD_PER_HOUR, ge=0,
                                description="training hardware, times measured train time")
    hardware: str | None = Field(default=None, description="a hardware preset instead of usd_per_hour")
    catalog: str | None = Field(default=None, description="a provider's fine-tune (e.g. ft:gpt-4o-mini-2024-07-18): "
                                "the training tokens at its training price instead of the hardware time")
    training_usd_per_mtok: float | None = Field(default=None, ge=0, description="a training price per million "
                                                "tokens (filled from `catalog`)")
    labelling_usd_per_example: float = Field(default=0.0, ge=0)


class PeopleCost(_Strict):
    """The hours a team spends to build each route, and to retrain the fine-tune (stated defaults; the report
    flags them when they are 0)."""

    usd_per_hour: float = Field(default=100.0, ge=0, description="a loaded engineer's hour")
    prompt_hours: float = Field(default=8.0, ge=0, description="writing and testing the prompt route")
    finetune_hours: float = Field(default=24.0, ge=0, description="data, training and evaluation of the fine-tune")
    retrain_hours: float = Field(default=4.0, ge=0, description="each retraining of the fine-tune")


class LabellingCost(_Strict):
    """What a labelled training row costs: a price per example, or the seconds a person takes at an hourly rate."""

    usd_per_example: float | None = Field(default=None, ge=0)
    seconds_per_example: float | None = Field(default=None, ge=0)
    usd_per_hour: float | None = Field(default=None, ge=0)
    new_rows_per_retrain: int = Field(default=0, ge=0, description="rows labelled for each retraining")

    @model_validator(mode="after")
    def _one_way(self) -> "LabellingCost":
        timed = (self.seconds_per_example is not None, self.usd_per_hour is not None)
        if self.usd_per_example is not None and any(timed):
            raise ValueError("give usd_per_example, or seconds_per_example with usd_per_hour, not both")
        if any(timed) and not all(timed):
            raise ValueError("seconds_per_example and usd_per_hour go together")
        return self

    @property
    def per_example_usd(self) -> float:
        if self.usd_per_example is not None:
            return self.usd_per_example
        if self.seconds_per_example is not None and self.usd_per_hour is not None:
            return self.seconds_per_example / 3600 * self.usd_per_hour
        return 0.0


class StatsConfig(_Strict):
    resamples: int = Field(default=1000, ge=50, description="bootstrap resamples of the test rows")
    confidence: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0


class PricingConfig(_Strict):
    arms: dict[str, ArmPrice] = Field(default_factory=dict, description="prices by arm name (or `price` on the arm)")
    default_usd_per_hour: float = Field(default=DEFAULT_USD_PER_HOUR, ge=0,
                                        description="self-hosted (local) arms with no price of their own")
    catalog: Path | None = Field(default=None, description="a LiteLLM-format price JSON over the shipped catalog")
    finetune: FinetuneCost = Field(default_factory=FinetuneCost)
    prompt_fixed_usd: float = Field(default=0.0, ge=0, description="one-off cost of the prompt route")
    baseline_arm: str | None = Field(default=None, description="older spelling of compare.baseline")
    monthly_calls: float = Field(default=100_000, gt=0)
    hours_per_month: float = Field(default=730, gt=0, le=744)
    error_cost_usd: float = Field(default=0.0, ge=0, description="the cost of one wrong answer")
    horizon_months: float = Field(default=12.0, gt=0, description="the months each route's total cost is counted over")
    people: PeopleCost = Field(default_factory=PeopleCost)
    labelling: LabellingCost = Field(default_factory=LabellingCost)
    peak_to_average: float = Field(default=3.0, ge=1, description="always-on replicas are sized for this peak")
    latency_target_ms: float = Field(default=2000.0, gt=0, description="the p95 a batch may take to form and answer")
    max_price_age_days: int = Field(default=180, gt=0, description="older catalog prices print a note")

    def labelling_usd_per_example(self) -> float:
        """`labelling`, or the older `finetune.labelling_usd_per_example`."""
        return self.labelling.per_example_usd or self.finetune.labelling_usd_per_example
