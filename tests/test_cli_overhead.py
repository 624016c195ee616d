"""The CLI's own cost, around the work: commands that need no model load no model stack (`roi data check` and
`roi report` took ~7 s when the CLI imported torch and transformers, and MLflow, up front just to know its error
types; 2.8 and 3.7 s without), and a command ends soon after its work (1.6-2.1 s of exit went to the interpreter's
last garbage collections over what those libraries made)."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, sqlite_store

# Runs the command in-process, then names the heavy libraries it left imported.
pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


PROBE = ("import sys; from pipeline.cli import main; main(sys.argv[1:]); "
         "print(sorted(m for m in ('torch', 'transformers', 'peft', 'mlflow') if m in sys.modules))")


@pytest.mark.parametrize("args, loaded", [
    (["data", "check", "datasets/support_tickets"], []),
    (["report", "--experiment", "nothing-here"], ["mlflow"]),
])
def test_a_command_that_needs_no_model_imports_no_model_stack(args, loaded, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.stdout.splitlines()[-1] == str(loaded), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "INFO" not in result.stderr  # quiet, as before


def _exit_seconds(entry: str) -> float:
    """Seconds from the command's return to the process's end, with the model stack loaded: through `main`
    (what an in-process caller gets) or `command_line` (what `roi` runs)."""
    probe = ("import sys, time; import pipeline.recipe.run, peft; from pipeline import cli; "
             "sys.argv = ['roi', 'data', 'check', 'datasets/support_tickets']; "
             f"code = cli.{entry}(); print(time.time(), flush=True); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    ended = time.time()
    assert result.returncode == 0, result.stderr[-2000:]
    return ended - float(result.stdout.splitlines()[-1])


def test_roi_exits_soon_after_its_work():
    # Against `main` in the same test: absolute times vary with the machine, the ratio was ~7x.
    kept, frozen = _exit_seconds("main"), _exit_seconds("command_line")
    assert frozen < 0.5 * kept, (frozen, kept)
