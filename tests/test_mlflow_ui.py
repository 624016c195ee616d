"""The MLflow UI, rendered for real: `roi ui` (an `mlflow server` on loopback) over a finished tiny run,
opened in headless Chromium (Debian's `chromium`, driven by Playwright). Screenshots are kept in
`test-artifacts/` (or $ROI_TEST_ARTIFACTS) for a person to look at."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_for_health

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs the browser (.ci/run); elsewhere a machine without it skips rather than fails.
if CHROMIUM is None and not os.environ.get("ROI_REQUIRE_BROWSER"):
    pytest.skip("no chromium on this machine (`make browser` installs Debian's)", allow_module_level=True)
# The flags keep a headless Chromium off the network: without them it calls Google's hosts at start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("ROI_TEST_ARTIFACTS") or ROOT / "test-artifacts")
ARMS = ("naive", "engineered", "finetuned", "finetuned-int8")


@pytest.fixture(scope="module")
def ui(tiny_run, tmp_path_factory):
    """`roi ui` on a free port over the tiny run's store: (base URL, the links it printed, env)."""
    env, tmp, _, _ = tiny_run
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "roi-ui.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=tmp,
                                  env=dict(env, PYTHONUNBUFFERED="1"), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, server, 180, f"roi ui (log: {log})")
        links = re.findall(r"(http://127\.0\.0\.1:\d+/#/experiments/\S+)", log.read_text())
        yield base, links, env
    finally:
        os.killpg(server.pid, 15)  # roi ui and the mlflow server it runs
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _arm_runs(env) -> tuple[object, dict[str, object]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("support-triage")
    runs = client.search_runs([exp.experiment_id])
    return next(r for r in runs if r.data.tags.get("roi.role") == "parent"), \
        {r.data.tags["arm"]: r for r in runs if "arm" in r.data.tags}


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its Assistant panel on a first visit; it covers a third of the table until closed."""
    close = page.get_by_label("Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def test_the_printed_link_lands_on_the_runs_table_with_every_arm_side_by_side(ui, browser):
    base, links, env = ui
    parent, arms = _arm_runs(env)
    assert len(links) == 1 and links[0].startswith(base), links
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((base, "data:", "blob:")) else None)
    page.goto(links[0])
    page.wait_for_selector(".ag-row >> text=finetuned", timeout=90_000)  # child rows open without a click
    _close_assistant(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-landing.png"))

    assert "/runs" in page.url and page.get_by_role("heading", name="Runs").count()
    headers = page.eval_on_selector_all(".ag-header-cell", "els => els.map(e => e.getAttribute('col-id'))")
    wanted = ["accuracy", "latency_p50_ms", "prompt_tokens_mean", "cost_per_1k_calls_usd"]
    # (MLflow 3.17 applies the view's column order only sometimes; which columns show is what matters.
    # break_even_calls shows only where some run has one: the tiny run's never breaks even.)
    assert {h for h in headers if h.startswith("metrics.")} == {f"metrics.`{m}`" for m in wanted}
    never = page.locator(f".ag-row[row-id='{parent.info.run_id}'] [col-id='tags.`break_even`']").first
    assert never.inner_text().strip() == "never"  # the parent says why its break-even column is empty
    # Each arm's row shows its own logged values in those columns: no column picked by hand.
    for arm, run in arms.items():
        row_id = run.info.run_id
        for metric in wanted:
            cell = page.locator(f".ag-row[row-id='{row_id}'] [col-id='metrics.`{metric}`']").first
            shown = cell.inner_text().strip()
            assert shown not in ("", "-") and float(shown) == pytest.approx(run.data.metrics[metric], rel=1e-6), \
                (arm, metric, shown)
    assert not outside, outside[:5]
    page.close()


def test_one_click_on_the_parent_shows_its_figures_prompts_and_arms_table(ui, browser):
    base, _, env = ui
    parent, arms = _arm_runs(env)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    run_page = f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    page.goto(f"{run_page}?workflowType=machine_learning")
    page.wait_for_selector("text=Registered prompts", timeout=90_000)
    _close_assistant(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-parent-run.png"), full_page=True)
    text = page.inner_text("body")
    assert parent.info.run_name in text and "token_reduction_x" in text
    for arm in ARMS:
        assert f"support-triage-{arm}" in text  # each arm's registered prompt, linked to the parent too

    # Its Artifacts tab renders the per-arm table as a table, not as JSON text.
    page.goto(f"{run_page}/artifacts/arms.json?workflowType=machine_learning")
    page.wait_for_selector("text=accuracy_pct", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-arms-table.png"))
    cells = page.inner_text("body")
    assert '"columns"' not in cells
    for arm, run in arms.items():
        assert arm in cells and f"{round(100 * run.data.metrics['accuracy'], 1):g}" in cells
    page.close()


def test_the_forwardable_report_renders_offline_with_every_arm(tiny_run, browser):
    """The run's roi_report.html in a real browser: no console error, no request but the file itself,
    the break-even and one row per arm in the page, its plots decoded."""
    _, tmp, _, _ = tiny_run
    report = next((tmp / "runs" / "support-triage").glob("*/report/roi_report.html"))
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("data:") else None)
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(ARTIFACTS / "roi-report-tiny-run.png"), full_page=True)
    assert not errors, errors
    assert requests == [report.as_uri()], requests
    assert page.locator("#break-even").is_visible()
    assert "never" in page.inner_text("#break-even")  # the tiny run's fine-tune saves nothing per call
    assert [page.locator(f"tr[data-arm='{arm}']").count() for arm in ARMS] == [1] * len(ARMS)
    assert page.eval_on_selector("#cost-vs-volume", "img => img.naturalWidth") > 0
    page.close()
