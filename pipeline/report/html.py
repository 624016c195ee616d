"""The self-contained HTML report and its Markdown twin, both drawn from one `facts` dict.

Both render the same rows (`_view`), so the two never disagree. The HTML goes through a Jinja
template with autoescape and embeds its plots as data URIs: the file opens offline, anywhere.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline.report.format import calls, interval, months, number, pct_interval, p_reading, pvalue, signed_pct, usd

TEMPLATES = Path(__file__).parent / "templates"
IMAGE_FILES = {"cost_vs_volume": "cost_vs_volume.png", "sensitivity": "sensitivity.png",
               "learning_curve": "learning_curve.png"}


def _from_volume(volume: float | None, ci) -> str:
    return "every volume" if volume == 0 else interval(volume, ci)


def _ranges(ranges: list[dict]) -> str:
    return "; ".join(f"{r['state']} from {calls(r['start'])} to {calls(r['end'])}" for r in ranges) or "-"


def _curve_view(curve: dict | None) -> dict | None:
    """The learning-curve section: a row per training-set size, then where it meets the prompt route."""
    if not curve:
        return None
    table = _table(["Training rows", "Accuracy [CI]", "Test rows scored", "Training time", "Training cost",
                    "Labelling cost"], {0, 1, 2, 3, 4, 5},
                   [[f"{p['rows']:,}", pct_interval(p["accuracy"], [p.get("accuracy_ci_low"), p.get("accuracy_ci_high")]
                                                    if p.get("accuracy_ci_low") is not None else None),
                     f"{p['rows_evaluated']:,}", f"{number(p.get('train_time_s'), 0)} s", usd(p.get("training_usd")),
                     usd(p.get("labelling_usd"))] for p in curve["points"]])
    base, lines = curve.get("baseline"), []
    if base:
        for key, words in (("rows_to_match_baseline", "not significantly worse than"),
                           ("rows_to_beat_baseline", "significantly better than")):
            n = curve.get(key)
            lines.append((f"Fewest rows {words} {base['name']}", f"{n:,}" if n is not None else "none of the points"))
        cheapest = curve.get("cheapest_beating")
        if cheapest:
            lines.append(("The cheapest data budget that beats the prompt route", (
                f"{cheapest['rows']:,} rows: labelling {usd(cheapest['labelling_usd'])}, training "
                f"{usd(cheapest['training_usd'])}; it costs less than {base['name']} from "
                f"{_from_volume(cheapest.get('break_even_monthly_calls'), None)} calls a month"
                + (f" ({_from_volume(cheapest['quality_adjusted_break_even_monthly_calls'], None)} with wrong answers "
                   "priced)" if cheapest.get("quality_adjusted_break_even_monthly_calls") is not None else "")
                + (f"; verdict at that size: {cheapest['verdict']}" if cheapest.get("verdict") else ""))))
    fit, target = curve.get("fit"), curve.get("target")
    if fit:
        lines.append(("Inverse power-law fit", f"accuracy = {fit['a']:.3f} - {fit['b']:.3g} x rows^-{fit['c']:.3g} "
                                               f"(RMSE {100 * fit['rmse']:.1f} points over the points)"))
    if target:
        rows = target["rows"]
        lines.append((f"Rows for {100 * target['accuracy']:g}% accuracy",
                      "never, by the fit" if rows is None or rows == float("inf") else
                      f"{rows:,.0f}" + (" (extrapolated past the last point)" if target["extrapolated"] else "")))
    return {"table": table, "lines": lines}


STOP_READINGS = {"interval": "accuracy known", "decided": "pair decided"}


def rows_scored(arm: dict[str, Any], n_eval: int) -> str:
    """`96 of 456 (pair decided)`: the rows a sequential evaluation scored before it stopped, and why."""
    rows = arm.get("rows_evaluated", n_eval)
    why = STOP_READINGS.get(arm.get("stopped_by") or "")
    return f"{rows:,} of {n_eval:,} ({why})" if why else f"{rows:,}"


def _table(head: list[str], num: set[int], rows: list[list[str]], keys: list[str] | None = None) -> dict:
    return {"head": head, "num": [i in num for i in range(len(head))],
            "rows": [{"key": k, "cells": r} for k, r in zip(keys or [None] * len(rows), rows)]}


def _break_even_rows(facts: dict, quality: bool) -> tuple[list[tuple[str, str]], str]:
    """The break-even section's label/value rows (each route's total over the horizon, the volume from which
    the fine-tune costs less, payback, the ranges, the one-off break-even; with errors priced where an error
    cost is set), and the words for the horizon."""
    be = facts["break_even"]
    pair = (f"{be['candidate']} (candidate) vs {be['baseline']} (baseline)"
            if be.get("baseline") and be.get("candidate") else "no baseline/candidate pair")
    hz = facts.get("horizon") or {}
    span = f"over {number(hz.get('months'), 0)} months" if hz else "a month"
    break_even = [
        ("Compared", pair),
        (f"Total cost {span}, {be.get('baseline')}", interval(hz.get("tco_baseline_usd"), hz.get("tco_baseline_usd_ci"),
                                                              usd)),
        (f"Total cost {span}, {be.get('candidate')}", interval(hz.get("tco_candidate_usd"),
                                                               hz.get("tco_candidate_usd_ci"), usd)),
        (f"Fine-tune cheaper {span} from (calls/month)", _from_volume(be.get("monthly_calls"),
                                                                      be.get("monthly_calls_ci"))),
        ("Its extra cost recovered after, at the configured volume", interval(be.get("payback_months"),
                                                                              be.get("payback_months_ci"), months)),
        ("Cheaper, tied and dearer by volume", _ranges(hz.get("ranges") or [])),
        ("One-off cost recovered after (calls, at the configured volume)", interval(be.get("calls"), be.get("calls_ci"))),
    ]
    if quality:
        break_even += [
            (f"Total cost {span} with errors priced", f"{be.get('baseline')} {usd(hz.get('quality_adjusted_tco_baseline_usd'))}, "
             f"{be.get('candidate')} {usd(hz.get('quality_adjusted_tco_candidate_usd'))}"),
            ("With errors priced, fine-tune cheaper from (calls/month)",
             _from_volume(be.get("quality_adjusted_monthly_calls"), be.get("quality_adjusted_monthly_calls_ci"))),
            ("With errors priced, extra cost recovered after", months(be.get("quality_adjusted_payback_months"))),
            ("With errors priced, one-off cost recovered after (calls)", calls(be.get("quality_adjusted_calls")))]
    if not (be.get("baseline") and be.get("candidate")):  # nothing to break even between: not "never"
        break_even = [("Compared", pair)] + [(label, "n/a") for label, _ in break_even[1:]]
    return break_even, span


def _statistics(st: dict, primary: str) -> list[tuple[str, str]]:
    """The statistics section's lines: confidence, resamples, each paired test's p and what it says, and the
    sequential rule where one ran."""
    pair_p = st.get("paired_p", st.get("mcnemar_p"))
    prompt_p = st.get("paired_p_prompt", st.get("mcnemar_p_prompt"))
    statistics = [
        ("Confidence level", f"{100 * st['confidence']:g}%"),
        ("Bootstrap resamples", f"{st['resamples']:,}"),
        (f"{st.get('paired_test') or 'McNemar'} p, candidate vs baseline",
         f"{pvalue(pair_p)} ({p_reading(pair_p, st['confidence'], primary)})"),
        (f"{st.get('paired_test_prompt') or 'McNemar'} p, between the prompt arms",
         f"{pvalue(prompt_p)} ({p_reading(prompt_p, st['confidence'], primary)})"),
    ]
    if st.get("sequential"):  # reports from before it have none
        q = st["sequential"]
        statistics.append(("Sequential evaluation", (
            f"test rows in one seeded order, checked from row {q['min_rows']} every {q['step_rows']}; an arm stops "
            f"once its {primary} is known to ±{100 * q['half_width']:g} points or the pair's difference excludes 0. "
            f"{primary[0].upper()}{primary[1:]} intervals are confidence sequences (valid at the stopping time); "
            "other intervals bootstrap the rows scored")))
    return statistics


def _view(facts: dict) -> dict:
    """Everything both renderers show, as ready-formatted strings."""
    quality = (facts.get("error_cost_usd") or 0) > 0
    arms = facts["arms"]
    task = facts["task"]
    primary, secondary = task.get("primary_label", "accuracy"), task.get("secondary_label", "macro-F1")
    head = ["Arm", "Role", "Model", f"{primary[0].upper()}{primary[1:]} [CI]", "Test rows scored",
            f"{secondary[0].upper()}{secondary[1:]} [CI]", "Prompt tokens", "p50 latency (ms)",
            "Throughput (calls/s)", f"Cost / 1,000 calls at {calls(facts['monthly_calls'])}/month [CI]",
            "Monthly cost", "Replicas", "Fixed cost"]
    rows = []
    for a in arms:
        rows.append([a["name"], a.get("role") or "-", f"{a['model']} ({a['kind']}, {a['backend']})",
                     pct_interval(a.get("quality", a.get("accuracy")), a.get("quality_ci", a.get("accuracy_ci"))),
                     rows_scored(a, facts["task"]["n_eval"]),
                     pct_interval(a.get("secondary", a.get("macro_f1")), a.get("secondary_ci", a.get("macro_f1_ci"))),
                     number(a["prompt_tokens_mean"]), number(a["latency_p50_ms"], 0),
                     number(a["throughput_calls_per_s"], 2),
                     interval(a["cost_per_1k_calls_usd"], a.get("cost_per_1k_calls_usd_ci"), usd),
                     usd(a["monthly_cost_usd"]), "-" if a.get("replicas") is None else f"{a['replicas']:,}",
                     usd(a["fixed_cost_usd"])]
                    + ([usd(a.get("quality_adjusted_cost_per_1k_usd"))] if quality else []))
    if quality:
        head.append("Quality-adjusted cost / 1,000")
    failed = facts.get("not_measured") or []  # reports from before it have none
    rows += [[f["name"], "-", f["model"], f["why"]] + ["-"] * (len(head) - 4) for f in failed]
    arms_table = _table(head, set(range(3, len(head))), rows, [a["name"] for a in arms] + [f["name"] for f in failed])

    break_even, span = _break_even_rows(facts, quality)

    statistics = _statistics(facts["statistics"], primary)
    task, env = facts["task"], facts["environment"]
    return {
        "title": facts["title"], "experiment": facts["experiment"], "run_id": facts["run_id"],
        "run_name": facts["run_name"], "generated_at": facts["generated_at"], "decision": facts["decision"],
        "context": (f"Task {task['name']}: {task['n_train']:,} training rows, {task['n_eval']:,} test rows "
                    f"(dataset {task['dataset_hash']}). Priced at {calls(facts['monthly_calls'])} calls/month, "
                    f"{number(facts['hours_per_month'], 0)} hours/month, error cost {usd(facts['error_cost_usd'])} "
                    "per wrong answer."),
        "arms": arms_table,
        "curve": _curve_view(facts.get("learning_curve")),
        "break_even": break_even,
        "what_if": _table(["Prompt arm", "Hosted model", "Cost a month", f"Total {span}", "Price dated"], {2, 3},
                          [[w["arm"], w["model"], usd(w["monthly_usd"]), usd(w["horizon_usd"]), w.get("price_date") or "-"]
                           for w in facts.get("what_if") or []]),
        "cost_chart_text": facts.get("cost_chart_text") or "Cost against calls per month.",
        "levers": _table(["Lever", "Arm", "Detail", "Cost / 1,000 calls", "Change"], {3, 4},
                         [[lv["lever"], lv["arm"], lv["detail"], usd(lv.get("cost_per_1k_calls_usd")),
                           signed_pct(lv.get("change_pct"))] for lv in facts["levers"]]),
        "sensitivity": _table(["Factor (figure)", "Break-even at -50%", "Break-even at +50%"], {1, 2},
                              [[s["factor"], calls(s.get("low")), calls(s.get("high"))]
                               for s in facts["sensitivity"]]),
        "claims": _table(["Claim", "Measured here"], set(), [[c["claim"], c["measured"]] for c in facts["claims"]]),
        "statistics": statistics,
        "assumptions": list(facts["assumptions"]),
        "prices": _table(["Price", "Value", "Source", "Date"], {1},
                         [[p["name"], p["value"], p["source"], p["date"]] for p in facts["prices"]]),
        "arm_prices": [(a["name"], a["price"]) for a in arms],
        "environment": [("Hardware", env["hardware"]), ("Python", env["python"])],
        "libraries": _table(["Library", "Version"], set(), [[k, v] for k, v in sorted(env["libraries"].items())]),
        "notes": list(facts.get("notes") or []),
    }


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(facts: dict, images: dict[str, bytes]) -> str:
    """One self-contained HTML page: inline CSS, plots as data URIs, no scripts, no external requests."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    order = {f"confusion_{a['name']}": i for i, a in enumerate(facts["arms"])}
    keys = sorted((k for k in images if k.startswith("confusion_")), key=lambda k: order.get(k, len(order)))
    confusion = [(k.removeprefix("confusion_"), _data_uri(images[k])) for k in keys]
    plots = {key: _data_uri(images[key]) for key in IMAGE_FILES if key in images}
    return env.get_template("report.html.j2").render(v=_view(facts), plots=plots, confusion=confusion)


def _md(text) -> str:
    # `\<` keeps a stray tag literal in renderers that pass raw HTML through
    return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", str(text).replace("\\", "\\\\")).replace("\n", " ")


def _md_cell(text) -> str:
    return _md(text).replace("|", "\\|")


def _md_table(t: dict) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in t["head"]) + " |",
             "|" + "|".join("---:" if n else "---" for n in t["num"]) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r["cells"]) + " |" for r in t["rows"]]
    return lines + [""]


def _md_pairs(items) -> list[str]:
    return [f"- **{_md(label)}:** {_md(value)}" for label, value in items]


def render_markdown(facts: dict) -> str:
    """The same report as Markdown; plots are the PNG files saved next to it."""
    v = _view(facts)
    out = [f"# {_md(v['title'])}", "", f"Run {_md(v['run_name'])} (`{v['run_id']}`), experiment "
           f"{_md(v['experiment'])}, generated {_md(v['generated_at'])}.", "", f"> **{_md(v['decision'])}**", "",
           _md(v["context"]), "", "## Arms", "", *_md_table(v["arms"]), "## Break-even", "",
           *_md_pairs(v["break_even"]), "", f"![{_md(v['cost_chart_text'])}](cost_vs_volume.png)", "",
           *(["## What the prompt would cost hosted", "", "Cost only: quality was not measured on these models.", "",
              *_md_table(v["what_if"])] if v["what_if"]["rows"] else []),
           "## Levers", "", *_md_table(v["levers"]), "## Sensitivity", "", *_md_table(v["sensitivity"])]
    if v["sensitivity"]["rows"]:
        out += ["![Break-even sensitivity to each factor at -50% and +50%](sensitivity.png)", ""]
    if v["curve"]:
        out += ["## How many labelled rows", "", *_md_table(v["curve"]["table"]), *_md_pairs(v["curve"]["lines"]), "",
                "![Accuracy against training rows](learning_curve.png)", ""]
    out += ["## Claims", "", *_md_table(v["claims"]), "## Statistics", "", *_md_pairs(v["statistics"])]
    out += ["", "## Assumptions", "", *(f"- {_md(a)}" for a in v["assumptions"])]
    out += ["", "## Prices", "", *_md_table(v["prices"]), *_md_pairs(v["arm_prices"])]
    out += ["", "## Environment", "", *_md_pairs(v["environment"]), "", *_md_table(v["libraries"])]
    if v["notes"]:
        out += ["## Notes", "", *(f"- {_md(n)}" for n in v["notes"]), ""]
    return "\n".join(out)
