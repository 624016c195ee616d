"""Real third-party data (BANKING77, 77 intents) at the size the issue names. Slow: run with -m slow."""

import pytest

from conftest import ROOT, roi

BANKING = ROOT.parent / "shared" / "datasets" / "banking77"


@pytest.mark.slow
@pytest.mark.skipif(not BANKING.is_dir(), reason="shared BANKING77 copy not present")
def test_banking77_experiment_completes(tmp_path, roi_env):
    result = roi("run", "experiments/banking77.yaml", "eval.limit=200", "data.train_limit=2000",
                 f"output_dir={tmp_path / 'runs'}", env=roi_env, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(roi_env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("banking77").experiment_id])
    arms = {r.data.tags["arm"]: r.data.metrics for r in runs if "arm" in r.data.tags}
    assert set(arms) == {"naive", "engineered", "finetuned"}
    # 77 intents: the fine-tuned small model must beat prompting it by a wide margin
    assert arms["finetuned"]["accuracy"] > arms["naive"]["accuracy"] + 0.3
