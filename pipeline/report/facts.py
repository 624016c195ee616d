"""The report to forward: its facts gathered once from a finished run, its plots, and the files
`roi_report.html` / `roi_report.md` rendered from them (`report.html`). The facts and plots are kept
with the parent run (`report/`), so `roi report --out` renders the same report again later."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.economics.figures import PAIRED_TESTS, paired_p
from pipeline.economics.prices import PerTokenPrice
from pipeline.economics.serving import provider_rule
from pipeline.measure.kinds import KINDS
from pipeline.report.charts import cost_chart_text
from pipeline.report.format import logged_ci
from pipeline.report.summary import Summary, verdict
from pipeline.report.html import render_html, render_markdown

LIBRARIES = ("torch", "transformers", "peft", "trl", "torchao", "mlflow", "scipy", "scikit-learn", "openai")
IMAGES = ("cost_vs_volume", "sensitivity", "learning_curve")


def price_text(price: Any) -> str:
    """An arm's price in one line, with where it comes from."""
    if isinstance(price, PerTokenPrice):
        text = f"${price.input_usd_per_mtok:g} in / ${price.output_usd_per_mtok:g} out per Mtok"
        if price.cached_input_usd_per_mtok is not None:
            rule = provider_rule(price.provider)
            hits = ("hit rate from the volume's arrival rate" if price.cache_hit_rate is None
                    else f"hit rate {price.cache_hit_rate:.0%}")
            text += (f", cached ${price.cached_input_usd_per_mtok:g} (prefixes of "
                     f"{max(rule.cache_min_tokens, price.cache_min_prefix_tokens)} tokens or more, {hits})")
    elif price.billing == "per_second":
        text = (f"${price.usd_per_hour:g}/h x {price.premium:g} per busy second" + (f" ({price.hardware})" if price.hardware
                else "") + f", {price.cold_start_s:g} s billed a cold start, >= {price.min_replicas} always on")
    else:
        text = (f"${price.usd_per_hour:g}/h per replica" + (f" ({price.hardware})" if price.hardware else "")
                + f", >= {price.min_replicas} always on, planned at {price.target_utilisation:.0%} utilisation")
    return text + (f"; source: {price.source}" if price.source else "; source: the experiment config") \
        + (f" ({price.date})" if price.date else "")


# What (1 - the primary metric) a call, times pricing.error_cost_usd, prices for each task type.
QUALITY_BASIS = {
    "classification": ": a call's expected error cost is (1 - accuracy) times it.",
    "extraction": ", priced on the share of field/value pairs missed or wrong: (1 - field-F1) times it a call.",
    "generation": ", priced on the distance from the reference: (1 - chrF) times it a call. A correct paraphrase "
                  "scores below 1, so this prices style as well as errors: set it with that in mind.",
}


def _arms_by_name(exp) -> dict[str, Any]:
    return {a.name: a for a in exp.plan.arms}


def arm_facts(exp, summary: Summary) -> list[dict[str, Any]]:
    by_name = _arms_by_name(exp)
    rows = []
    for name, m in summary.arms.items():
        arm = by_name[name]
        role = ("baseline" if name == summary.baseline_arm else "candidate" if name == summary.candidate_arm
                else "naive" if name == exp.plan.pair.naive else "")
        per_1k_ci = logged_ci(m, "cost_per_call_usd")
        rows.append({
            "name": name, "role": role, "kind": arm.kind, "model": exp.models.display_name(arm)
            + (" (int8)" if arm.quantize else ""), "backend": arm.backend,
            "quality": m[summary.primary], "quality_ci": logged_ci(m, summary.primary),
            "secondary": m.get(summary.secondary[0]), "secondary_ci": logged_ci(m, summary.secondary[0]),
            "rows_evaluated": int(m.get("rows_evaluated", len(exp.rows))), "stopped_by": exp.stopped_by.get(name), "prompt_tokens_mean": m["prompt_tokens_mean"],
            "completion_tokens_mean": m["completion_tokens_mean"], "latency_p50_ms": m["latency_p50_ms"],
            "latency_p95_ms": m["latency_p95_ms"], "throughput_calls_per_s": m["throughput_calls_per_s"],
            "cost_per_1k_calls_usd": m["cost_per_1k_calls_usd"],
            "cost_per_1k_calls_usd_ci": [1000 * v for v in per_1k_ci] if per_1k_ci else None,
            "monthly_cost_usd": m["monthly_cost_usd"], "fixed_cost_usd": m.get("fixed_cost_usd", 0.0),
            "replicas": int(m["replicas"]) if "replicas" in m else None,
            "quality_adjusted_cost_per_1k_usd": 1000 * m["quality_adjusted_cost_per_call_usd"]
            if "quality_adjusted_cost_per_call_usd" in m else None,
            "price": price_text(arm.price)})
    return rows


def lever_facts(exp, summary: Summary) -> list[dict[str, Any]]:
    """Each of the seed's cost levers, as measured and priced on this run's arms."""
    levers, by_name = [], _arms_by_name(exp)
    for name, m in summary.arms.items():
        cost = m["cost_per_1k_calls_usd"]

        def row(lever: str, detail: str, other: float) -> dict[str, Any]:
            return {"lever": lever, "arm": name, "detail": detail, "cost_per_1k_calls_usd": other,
                    "change_pct": 100 * (other - cost) / cost if cost else None}

        if "cost_per_1k_calls_usd_no_cache" in m:
            levers.append(row("prompt caching", "without the provider's prompt cache",
                              m["cost_per_1k_calls_usd_no_cache"]))
        if "cost_per_1k_calls_usd_batch_api" in m:
            levers.append(row("batching", "the provider's batch API (offline work)", m["cost_per_1k_calls_usd_batch_api"]))
        if "cost_per_1k_calls_usd_batch1" in m:
            levers.append(row("batching", f"one call at a time: {m['throughput_calls_per_s_batch1']:.2f} calls/s "
                              f"against {m['throughput_calls_per_s']:.2f} at batch {by_name[name].eval.batch_size}",
                              m["cost_per_1k_calls_usd_batch1"]))
    for name, m in summary.arms.items():
        arm = by_name[name]
        if not arm.quantize:
            continue
        twin = next((a.name for a in exp.plan.arms if a.finetune == arm.finetune and not a.quantize
                     and a.prompt == arm.prompt and a.model_key == arm.model_key), None)
        if twin is None or twin not in summary.arms:
            continue
        t = summary.arms[twin]
        levers.append({"lever": "quantization", "arm": name,
                       "detail": f"{arm.quantize} weights vs {twin}: {summary.primary_label} "
                                 f"{100 * m[summary.primary]:.1f}% vs {100 * t[summary.primary]:.1f}%, p50 {m['latency_p50_ms']:.0f} vs "
                                 f"{t['latency_p50_ms']:.0f} ms, {m.get('model_bytes', 0) / 1e6:.0f} vs "
                                 f"{t.get('model_bytes', 0) / 1e6:.0f} MB",
                       "cost_per_1k_calls_usd": m["cost_per_1k_calls_usd"],
                       "change_pct": 100 * (m["cost_per_1k_calls_usd"] - t["cost_per_1k_calls_usd"])
                       / t["cost_per_1k_calls_usd"] if t["cost_per_1k_calls_usd"] else None})
    return levers


def distillation_claims(rows: list[dict], confidence: float) -> list[dict[str, str]]:
    """Does a fine-tune distilled from the prompt route match its teacher on the gold test rows?"""
    out = []
    for r in rows:
        same = r["mcnemar_p"] >= 1 - confidence
        agreement = (f"; the teacher's labels agreed with the gold ones on {100 * r['teacher_agreement']:.1f}% of the "
                     "training rows" if "teacher_agreement" in r else "")
        cost = f", labelling ${r['labelling_cost_usd']:.4g}" if "labelling_cost_usd" in r else ""
        out.append({"claim": f"A fine-tune distilled from {r['teacher']} matches its teacher",
                    "measured": f"{r['student']} {100 * r['student_accuracy']:.1f}% vs {r['teacher']} "
                                f"{100 * r['teacher_accuracy']:.1f}% on {r['rows']} test rows, McNemar p "
                                f"{r['mcnemar_p']:.3g} ({'no measurable difference' if same else 'they differ'}); "
                                f"{int(r.get('distilled_rows', 0)):,} distilled rows{cost}{agreement}"})
    return out


def claim_facts(summary: Summary) -> list[dict[str, str]]:
    """The project's claims, as this run measured them."""
    p, claims = summary.parent, []
    if "token_reduction_x" in p:
        claims.append({"claim": "A fine-tuned small model needs 10-100x fewer prompt tokens",
                       "measured": f"{p['token_reduction_x']:.1f}x fewer ({summary.baseline_arm} / "
                                   f"{summary.candidate_arm} mean prompt tokens)"})
    if "prompt_gain_pts" in p:
        test, value = paired_p(p, "_prompt")
        reading = f", {PAIRED_TESTS[test]} p {value:.3g}" if test else ""
        claims.append({"claim": "Well-engineered prompts beat naive ones by a wide margin",
                       "measured": f"{p['prompt_gain_pts']:+.1f} {summary.primary_label} points{reading}"})
    if summary.has_pair:
        base = summary.arms[summary.baseline_arm]
        fixed = summary.fixed_cost(summary.candidate_arm)
        monthly = base.get("monthly_cost_usd") or 0.0
        claims.append({"claim": "Inference cost dominates at volume",
                       "measured": f"the fine-tune's one-off ${fixed:.3g} is {100 * fixed / monthly:.2g}% of one month "
                                   f"of {summary.baseline_arm} at {summary.monthly_calls:,.0f} calls"
                                   if monthly else "the baseline costs nothing a month here"})
    return claims


def build_facts(exp, summary: Summary, decision, run_name: str, curve: dict | None = None,
                distilled: list[dict] | None = None) -> dict[str, Any]:
    """Everything the report says, from the finished run (its summary and `economics.decision.Decision`): one
    dict, saved with the run."""
    cfg, p, sensitivity = exp.cfg, summary.parent, decision.sensitivity
    (test, value), (prompt_test, prompt_value) = paired_p(p), paired_p(p, "_prompt")
    return {
        "title": f"Prompting or fine-tuning? {cfg.experiment}", "experiment": cfg.experiment,
        "run_id": summary.run_id, "run_name": run_name, "generated_at": time.strftime("%Y-%m-%d %H:%M %Z"),
        "decision": verdict(summary), "verdict": summary.verdict[0] if summary.verdict else None,
        "task": {"name": exp.task.name, "n_train": len(exp.task.splits["train"]), "n_eval": len(exp.rows),
                 "dataset_hash": exp.task.content_hash, "type": exp.task.type, "primary": summary.primary,
                 "primary_label": summary.primary_label, "secondary_label": summary.secondary[1]},
        "monthly_calls": cfg.pricing.monthly_calls, "hours_per_month": cfg.pricing.hours_per_month,
        "error_cost_usd": cfg.pricing.error_cost_usd,
        "arms": arm_facts(exp, summary),
        "not_measured": [{"name": name, "model": exp.models.display_name(_arms_by_name(exp)[name]), "why": why}
                         for name, why in summary.not_measured.items()],
        "break_even": {"calls": p.get("break_even_calls"), "calls_ci": logged_ci(p, "break_even_calls"),
                       "payback_months": p.get("payback_months"), "payback_months_ci": logged_ci(p, "payback_months"),
                       "monthly_calls": p.get("break_even_monthly_calls"),
                       "monthly_calls_ci": logged_ci(p, "break_even_monthly_calls"),
                       "quality_adjusted_calls": p.get("quality_adjusted_break_even_calls"),
                       "quality_adjusted_monthly_calls": p.get("quality_adjusted_break_even_monthly_calls"),
                       "quality_adjusted_monthly_calls_ci": logged_ci(p, "quality_adjusted_break_even_monthly_calls"),
                       "quality_adjusted_payback_months": p.get("quality_adjusted_payback_months"),
                       "baseline": summary.baseline_arm, "candidate": summary.candidate_arm},
        "horizon": {"months": cfg.pricing.horizon_months,
                    **{k: p.get(k) for k in ("tco_baseline_usd", "tco_candidate_usd", "quality_adjusted_tco_baseline_usd",
                                             "quality_adjusted_tco_candidate_usd")},
                    **{f"{k}_ci": logged_ci(p, k) for k in ("tco_baseline_usd", "tco_candidate_usd")},
                    "ranges": summary.cost_ranges},
        "what_if": summary.what_if,
        "cost_chart_text": cost_chart_text(decision.curves),
        "claims": claim_facts(summary) + distillation_claims(distilled or [], cfg.stats.confidence),
        "levers": lever_facts(exp, summary),
        "sensitivity": [{"factor": f"{r['factor']} ({SENSITIVITY_FIGURES.get(r['figure'], r['figure'])})",
                         "low": r["low"], "high": r["high"]} for r in sensitivity],
        "statistics": {"confidence": cfg.stats.confidence, "resamples": cfg.stats.resamples,
                       "mcnemar_p": p.get("mcnemar_p"), "mcnemar_p_prompt": p.get("mcnemar_p_prompt"),
                       "paired_test": PAIRED_TESTS.get(test), "paired_p": value,
                       "paired_test_prompt": PAIRED_TESTS.get(prompt_test), "paired_p_prompt": prompt_value,
                       # none where the primary is no mean over rows (field-F1): every row was scored
                       "sequential": cfg.eval.sequential.model_dump()
                       if cfg.eval.sequential and KINDS[exp.task.type].row_mean else None},
        "assumptions": assumptions(cfg),
        "prices": [{"name": a.name, "value": price_text(a.price).split("; source:")[0],
                    "source": a.price.source or "the experiment config", "date": a.price.date or "-"}
                   for a in exp.plan.arms],
        "environment": environment(),
        "notes": list(summary.notes),
        "learning_curve": curve,
    }


SENSITIVITY_FIGURES = {"break_even_calls": "one-off", "break_even_monthly_calls": "volume over the horizon",
                       "quality_adjusted_break_even_monthly_calls": "volume over the horizon, errors priced"}


def assumptions(cfg) -> list[str]:
    ft, people = cfg.pricing.finetune, cfg.pricing.people
    training = (f"training tokens at ${ft.training_usd_per_mtok:g} per Mtok ({ft.catalog})"
                if ft.training_usd_per_mtok is not None else
                f"measured training time at ${ft.usd_per_hour:g}/h" + (f" ({ft.hardware})" if ft.hardware else ""))
    return [
        f"{cfg.pricing.monthly_calls:,.0f} calls a month, {cfg.pricing.hours_per_month:g} hours a month.",
        f"Each route is owned for {cfg.pricing.horizon_months:g} months (pricing.horizon_months): people at "
        f"${people.usd_per_hour:g}/h, {people.prompt_hours:g} h to build the prompt route and {people.finetune_hours:g} h "
        f"the fine-tune, {people.retrain_hours:g} h each retraining (pricing.people)"
        + (" — people cost nothing here: set pricing.people." if not (people.usd_per_hour and
                                                                   (people.prompt_hours or people.finetune_hours))
           else "."),
        f"The fine-tune's training: {training}, times finetune.search_runs; labelling "
        f"${cfg.pricing.labelling_usd_per_example():g} per training example"
        + (" (none: set pricing.labelling)." if not cfg.pricing.labelling_usd_per_example() else "."),
        f"Always-on self-hosted replicas are billed every hour, busy or not, sized for {cfg.pricing.peak_to_average:g}x "
        f"the average arrival rate at the throughput those arrivals can batch within a p95 of "
        f"{cfg.pricing.latency_target_ms:g} ms (pricing.latency_target_ms); per-second billing counts busy seconds "
        "and cold starts.",
        "API prompt caching is billed by the provider's rule (its minimum and step) on the prompt's static prefix, "
        "with the hit rate that the volume's arrival rate gives within the provider's cache lifetime, unless set.",
        f"Intervals: {cfg.stats.confidence:.0%} percentile bootstrap over the test rows ({cfg.stats.resamples} "
        "resamples, the same rows for every arm); timings and throughput are not resampled.",
        f"Each wrong answer costs ${cfg.pricing.error_cost_usd:g} (pricing.error_cost_usd)"
        + QUALITY_BASIS.get(cfg.task.type, ".")
        + ("" if cfg.pricing.error_cost_usd else " Set it to compare the arms on quality-adjusted cost."),
    ]


def environment() -> dict[str, Any]:
    import torch

    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return {"hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}",
            "python": sys.version.split()[0], "libraries": libraries}


def write_report(facts: dict[str, Any], images: dict[str, Path], out_dir: Path) -> list[Path]:
    """roi_report.html (self-contained) and roi_report.md with its plots beside it; the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {k: path.read_bytes() for k, path in images.items() if path.is_file()}
    html, md = out_dir / "roi_report.html", out_dir / "roi_report.md"
    html.write_text(render_html(facts, pngs), encoding="utf-8")
    md.write_text(render_markdown(facts), encoding="utf-8")
    written = [html, md]
    for key, data in pngs.items():
        if key in IMAGES:
            target = out_dir / f"{key}.png"
            if target.resolve() != images[key].resolve():  # beside a report of another run: replace it
                target.write_bytes(data)
            written.append(target)
    return written


def save_facts(facts: dict[str, Any], path: Path) -> None:
    # inf (a break-even that never happens) is not JSON: stored as null, which the report reads as never.
    path.write_text(json.dumps(json_safe(facts), indent=1), encoding="utf-8")


def json_safe(value: Any) -> Any:
    """JSON without NaN or infinity: a figure that never comes is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def rerender(run_id: str, out_dir: Path) -> list[Path]:
    """The report of a finished run, rendered again from the facts and plots kept with it."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_store import TrackingError

    client = MlflowClient()
    if not any(f.path == "report/facts.json" for f in client.list_artifacts(run_id, "report")):
        raise TrackingError(f"run {run_id} has no report/facts.json (it predates the report): run it again")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "report", tmp))
        facts = json.loads((local / "facts.json").read_text(encoding="utf-8"))
        images = {key: local / f"{key}.png" for key in IMAGES}
        images.update({folder.name: folder / "confusion_matrix.png" for folder in local.glob("confusion_*")})
        return write_report(facts, images, out_dir)
