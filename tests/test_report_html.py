"""The HTML report and its Markdown twin: content, self-containment, and a real headless-Chromium
look at the page (skipped without `chromium` unless $ROI_REQUIRE_BROWSER is set). The screenshot
is kept in `test-artifacts/` (or $ROI_TEST_ARTIFACTS) for a person to look at."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

from pipeline.report.format import (calls, interval, months, p_reading, pct, pct_interval, pvalue, signed_pct,
                                    usd)
from pipeline.report.html import render_html, render_markdown

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _arm(name, role, kind, model, backend, acc, ci, f1, tokens, p50, cost, monthly, fixed, replicas, qa, price):
    return {"name": name, "role": role, "kind": kind, "model": model, "backend": backend,
            "accuracy": acc, "accuracy_ci": ci, "macro_f1": f1, "macro_f1_ci": None if ci is None else
            [f1 - 0.03, f1 + 0.03], "prompt_tokens_mean": tokens, "completion_tokens_mean": 4.2,
            "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.8, "throughput_calls_per_s": 1000 / p50,
            "cost_per_1k_calls_usd": cost, "cost_per_1k_calls_usd_ci": None if ci is None else [cost * 0.95, cost * 1.05],
            "monthly_cost_usd": monthly, "fixed_cost_usd": fixed, "replicas": replicas,
            "quality_adjusted_cost_per_1k_usd": qa, "price": price}


@pytest.fixture(scope="module")
def facts():
    return {
        "title": "Prompting vs fine-tuning: banking77 intents", "experiment": "banking77-qwen",
        "run_id": "3f9c2a71d4e84b0fa1c2", "run_name": "nimble-owl-42", "generated_at": "2025-06-01 12:30 UTC",
        "decision": "Fine-tune: qwen-lora pays back its $14.20 after 48,214 calls (about 0.4 months); 95% confident.",
        "task": {"name": "banking77", "n_train": 8000, "n_eval": 1000, "dataset_hash": "sha256:9d41c0"},
        "monthly_calls": 120000.0, "hours_per_month": 730.0, "error_cost_usd": 0.05,
        "arms": [
            _arm("naive", "naive", "prompt", "Qwen2.5-0.5B-Instruct", "local", 0.412, [0.381, 0.443], 0.37, 182.0,
                 41.0, 0.0412, 4.94, 0.0, 1, 29.44, "local GPU $2.49/h, Lambda list price, 2025-05-20"),
            _arm("engineered", "baseline", "prompt", "Qwen2.5-0.5B-Instruct", "local", 0.7731, [0.747, 0.799], 0.74,
                 1840.5, 96.0, 0.000001845, 0.21, 0.0, 1, 11.35, "local GPU $2.49/h, Lambda list price, 2025-05-20"),
            _arm("qwen-lora", "candidate", "finetuned", "Qwen2.5-0.5B-Instruct + LoRA r=16", "local", 0.9012,
                 [0.882, 0.919], 0.89, 38.0, 22.0, 0.0095, 1.14, 14.20, 1, 4.95,
                 "local GPU $2.49/h, Lambda list price, 2025-05-20"),
            _arm("gpt-4o-mini", "", "prompt", "gpt-4o-mini", "openai", 0.8420, None, 0.83, 1790.0, 410.0, 0.2712,
                 32.54, 0.0, None, 8.17, "OpenAI $0.15/1M in, $0.60/1M out, openai.com/pricing, 2025-05-28"),
        ],
        "break_even": {"calls": 48213.4, "calls_ci": [31000.2, INF], "payback_months": 0.4018,
                       "monthly_calls": INF, "monthly_calls_ci": None, "quality_adjusted_calls": 20500.0,
                       "baseline": "engineered", "candidate": "qwen-lora"},
        "horizon": {"months": 12, "tco_baseline_usd": 5840.0, "tco_candidate_usd": 4410.5,
                    "tco_baseline_usd_ci": [5800.0, 5900.0], "tco_candidate_usd_ci": None,
                    "ranges": [{"start": 0.0, "end": 250000.0, "state": "dearer"},
                               {"start": 250000.0, "end": 120000000.0, "state": "cheaper"}]},
        "what_if": [{"arm": "engineered", "model": "gpt-4o-mini", "monthly_usd": 33.1, "horizon_usd": 1197.2,
                     "price_date": "2026-11-20"}],
        "cost_chart_text": "qwen-lora costs less over 12 months from 250,000 calls/month on.",
        "claims": [{"claim": "Fine-tuning cuts prompt tokens by 95%", "measured": "1,840.5 -> 38.0 tokens (-97.9%)"},
                   {"claim": "The fine-tuned model is at least as accurate", "measured": "90.1% vs 77.3%"}],
        "levers": [{"lever": "shorter prompt", "arm": "engineered", "detail": "drop 40 of 77 examples",
                    "cost_per_1k_calls_usd": 0.0011, "change_pct": -42.04},
                   {"lever": "batching", "arm": "qwen-lora", "detail": "batch 32", "cost_per_1k_calls_usd": None,
                    "change_pct": None}],
        "sensitivity": [{"factor": "GPU price", "low": 24100.0, "high": 72300.0},
                        {"factor": "monthly calls", "low": None, "high": 48214.0}],
        "statistics": {"confidence": 0.95, "resamples": 2000, "mcnemar_p": 0.00012, "mcnemar_p_prompt": 0.31},
        "assumptions": ["One GPU replica serves the whole monthly volume.", "Training is paid once & never repeated."],
        "prices": [{"name": "GPU hour", "value": "$2.49", "source": "lambdalabs.com/service/gpu-cloud",
                    "date": "2025-05-20"}],
        "environment": {"hardware": "1x NVIDIA H100 80GB", "python": "3.12.3",
                        "libraries": {"torch": "2.6.0", "transformers": "5.24.0", "peft": "0.17.1"}},
        "notes": ["<b>not bold</b>: notes are escaped"],
    }


def _png(kind: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    if kind == "matrix":
        ax.imshow([[5, 1], [0, 7]])
    else:
        ax.plot([0, 1, 2], [1, 3, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(facts):
    line, matrix = _png("line"), _png("matrix")
    return {"cost_vs_volume": line, "sensitivity": line,
            **{f"confusion_{a['name']}": matrix for a in facts["arms"]}}


@pytest.fixture(scope="module")
def html(facts, images):
    return render_html(facts, images)


def test_helpers_by_hand():
    assert usd(0) == "$0" and usd(None) == "-"
    assert usd(0.73) == "$0.73" and usd(1234.567) == "$1,234.57" and usd(0.01) == "$0.01"
    assert usd(0.0000012) == "$1.2e-06" and usd(0.00000184) == "$1.84e-06" and usd(0.0095) == "$0.0095"
    assert calls(12345) == "12,345" and calls(12344.2) == "12,345"
    assert calls(INF) == "never" and calls(None) == "never"
    assert pct(0.8421) == "84.2%" and pct(None) == "-"
    assert pct_interval(0.8421, [0.809, 0.873]) == "84.2% [80.9–87.3]"
    assert pct_interval(0.8421, None) == "84.2%"
    assert interval(48213.4, [31000.2, INF]) == "48,214 [31,001–never]"
    assert interval(INF, [90000, INF]) == "never [90,000–never]"
    assert interval(0.73, [0.7, 0.77], usd) == "$0.73 [$0.70–$0.77]"
    assert months(0.4018) == "0.4 months" and months(INF) == "never" and months(None) == "never"
    assert signed_pct(-42.04) == "-42.0%" and signed_pct(3) == "+3.0%"
    assert pvalue(0.00012) == "< 0.001" and pvalue(0.31) == "0.310"
    assert p_reading(0.00012, 0.95) == "p < 0.05: the accuracy difference is unlikely to be chance"
    assert p_reading(0.31, 0.95).startswith("p ≥ 0.05")
    # The level follows stats.confidence: at 90%, p = 0.07 is significant.
    assert p_reading(0.07, 0.90).startswith("p < 0.1:") and p_reading(0.07, 0.95).startswith("p ≥ 0.05")
    assert usd(INF) == "∞" and usd(float("nan")) == "-"


def test_every_renderer_writes_a_break_even_that_never_comes_the_same_way():
    """The terminal/Markdown summary and `roi compare` use the same formatters as the HTML report: an infinite
    break-even is "never" in each (the summary's own formatter once raised OverflowError on it)."""
    from types import SimpleNamespace

    from pipeline.report.compare import run_row
    from pipeline.report.summary import Summary, summary_markdown

    arm = {"accuracy": 0.5, "macro_f1": 0.5, "invalid_rate": 0.0, "prompt_tokens_mean": 10.0,
           "completion_tokens_mean": 2.0, "latency_p50_ms": 5.0, "latency_p95_ms": 6.0, "throughput_calls_per_s": 1.0,
           "cost_per_call_usd": 0.001, "monthly_cost_usd": 100.0, "fixed_cost_usd": 5.0}
    parent = {"break_even_calls": INF, "break_even_monthly_calls": INF, "mcnemar_p": 0.5}
    summary = Summary("e", "t", "m", 10, {"base": arm, "ft": arm}, parent, "base", "ft", 1000.0)
    assert "break-even: never one-off, none monthly" not in summary_markdown(summary)  # markdown has its own line
    assert "Break-even: never one-off" in summary_markdown(summary)
    run = SimpleNamespace(data=SimpleNamespace(params={"compare.baseline": "base", "compare.candidate": "ft"},
                                               metrics=parent, tags={}),
                          info=SimpleNamespace(run_name="r", run_id="r"))
    child = SimpleNamespace(data=SimpleNamespace(tags={"arm": "base"}, metrics=arm))
    row = run_row(run, [child])
    assert row["break-even (calls)"] == "never" and row["break-even volume (calls/month)"] == "never"
    assert row["baseline $/month"] == "$100.00"


def test_markdown_content(facts):
    md = render_markdown(facts)
    for arm in facts["arms"]:
        assert f"| {arm['name']} |" in md
    assert "48,214 [31,001–never]" in md
    assert "**Fine-tune cheaper over 12 months from (calls/month):** never" in md
    assert "**Total cost over 12 months, engineered:** $5,840.00 [$5,800.00–$5,900.00]" in md
    assert "dearer from 0 to 250,000; cheaper from 250,000 to 120,000,000" in md
    assert "0.4 months" in md and "20,500" in md
    assert "## What the prompt would cost hosted" in md and "| engineered | gpt-4o-mini | $33.10 | $1,197.20 |" in md
    assert "84.2%" in md and "$1.84e-06 [$1.75e-06–$1.94e-06]" in md
    assert "![qwen-lora costs less over 12 months from 250,000 calls/month on.](cost_vs_volume.png)" in md
    assert "(sensitivity.png)" in md
    assert "|---|---|---|---:|" in md  # numbers right-aligned
    assert "p < 0.05: the accuracy difference is unlikely to be chance" in md
    assert "lambdalabs.com/service/gpu-cloud" in md and "transformers" in md and "5.24.0" in md
    assert "- \\<b>not bold\\</b>: notes are escaped" in md
    assert "Cost / 1,000 calls at 120,000/month [CI]" in md


def test_html_is_self_contained(facts, images, html):
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", html)
    assert not re.search(r"url\(|@import|<link|<script|<iframe|<object|<embed|\son\w+=", html, re.I)
    srcs = re.findall(r"""src="([^"]*)\"""", html)
    assert len(srcs) == 2 + len(facts["arms"]) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert 'id="cost-vs-volume"' in html and "<details>" in html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html and "<b>" not in html
    for arm in facts["arms"]:
        assert html.count(f'<tr data-arm="{arm["name"]}">') == 1
    assert 'class="num"' in html


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("ROI_REQUIRE_BROWSER"),
                    reason="no chromium on this machine (`make browser` installs Debian's)")
def test_html_in_headless_chromium(facts, html, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "ROI_REQUIRE_BROWSER is set but there is no `chromium` on PATH"
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    url = path.as_uri()
    artifacts = Path(os.environ.get("ROI_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            assert errors == []
            assert [r for r in requests if not r.startswith("data:")] == [url]
            be = page.locator("#break-even")
            assert be.is_visible()
            assert "48,214 [31,001–never]" in be.inner_text()
            for arm in facts["arms"]:
                assert page.locator(f'tr[data-arm="{arm["name"]}"]').count() == 1
            assert page.locator("tr[data-arm]").count() == len(facts["arms"])
            assert page.eval_on_selector("#cost-vs-volume", "img => img.complete && img.naturalWidth") > 0
            # no horizontal scrolling at the width the report is meant to be read at
            assert page.evaluate("document.documentElement.scrollWidth") <= 1200
            assert page.evaluate("""() => { const b = document.body, right = b.getBoundingClientRect().right
                - parseFloat(getComputedStyle(b).paddingRight);
                return [...document.querySelectorAll('table')].every(t => t.getBoundingClientRect().right <= right + 1) }""")
            page.screenshot(path=str(artifacts / "roi-report.png"), full_page=True)
            # printed, the closed <details> still shows its confusion matrices
            assert not page.locator("#confusion img").first.is_visible()
            page.emulate_media(media="print")
            assert page.locator("#confusion img").first.is_visible()
        finally:
            browser.close()
    assert (artifacts / "roi-report.png").stat().st_size > 0
