"""MLflow, at the edge: runs, params, artifacts, the prompt registry, the UI."""
