"""Commands that need no model load no model stack: `roi data check` and `roi report` took ~7 s when the CLI
imported torch and transformers (and MLflow) up front just to know its error types; 2.8 and 3.7 s without."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Runs the command in-process, then names the heavy libraries it left imported.
PROBE = ("import sys; from pipeline.cli import main; main(sys.argv[1:]); "
         "print(sorted(m for m in ('torch', 'transformers', 'peft', 'mlflow') if m in sys.modules))")


@pytest.mark.parametrize("args, loaded", [
    (["data", "check", "datasets/support_tickets"], []),
    (["report", "--experiment", "nothing-here"], ["mlflow"]),
])
def test_a_command_that_needs_no_model_imports_no_model_stack(args, loaded, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.stdout.splitlines()[-1] == str(loaded), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "INFO" not in result.stderr  # quiet, as before
