"""The `roi` command line: `roi run`, `report`, `compare`, `data check`, `serve`, `export`, `ui`."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

# Nothing is fetched from a hub at run time; without these, libraries stall on retries first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Library tqdm bars (the GGUF loader's among them) would draw between roi's own rich output; tqdm reads
# this when it is imported, so it is set before any library is.
os.environ.setdefault("TQDM_DISABLE", "1")
# torchao (which peft and transformers import when it is installed) registers enums with torch's pytree,
# and torch logs a deprecation line for each on every start; set before anything imports torch.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# torchao's wheel carries kernels built for other Pythons and GPUs; on import it logs a "Failed to load" warning
# for each one this machine cannot load (none of them is used here).
logging.getLogger("torchao").setLevel(logging.ERROR)

# Exit codes (README "Commands"): 0 done, 1 an unexpected error, 2 bad input (config, data, a server that cannot
# answer), 3 a run that finished but could not measure an arm, 130 interrupted.
EXIT_USAGE = 2
EXIT_NOT_MEASURED = 3


def _quiet_libraries() -> None:
    """Keep the terminal for our progress and results; library chatter goes to --debug."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted.*")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Set through the libraries' own variables, read when they are first imported: importing transformers and
    # datasets here would cost every command (`roi report`, `roi data check`) seconds it may not need.
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"  # not "Creating initial MLflow database tables..."
    # Where they are imported already (`main` called in-process, as tests do), the variables come too late.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roi", description="Prompting vs fine-tuning, measured and priced.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment: naive prompt, engineered prompt, LoRA fine-tune")
    run.add_argument("config", type=Path, help="experiment YAML, e.g. experiments/default.yaml")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.epochs=1 eval.limit=50")
    run.add_argument("--force", action="store_true",
                     help="recompute every stage instead of reusing stored ones (each once: arms that share an "
                     "adapter train it once)")
    run.add_argument("--processes", type=int, metavar="N",
                     help="train the LoRA arms on N data-parallel processes (one per GPU, or CPU processes) with "
                     "torchrun; the same as finetune.processes=N")

    report = sub.add_parser("report", help="print the ROI summary of a finished run from the MLflow store")
    report.add_argument("config", type=Path, nargs="?", help="experiment YAML (names the experiment)")
    report.add_argument("--experiment", help="experiment name (instead of a config)")
    report.add_argument("--run-id", help="a parent run id (default: the latest finished run)")
    report.add_argument("--markdown", action="store_true", help="print roi_summary.md instead of the table")
    report.add_argument("--out", type=Path, help="write roi_report.html (self-contained) and roi_report.md here")

    compare = sub.add_parser("compare", help="several runs side by side (parent runs, or each experiment's latest)")
    compare.add_argument("run_ids", nargs="*", help="parent run ids")
    compare.add_argument("--experiment", action="append", default=[], help="an experiment (its latest run); repeatable")
    compare.add_argument("--out", type=Path, default=Path("."), help="folder for roi_compare.md and roi_compare.csv")

    data = sub.add_parser("data", help="task data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="statistics and problems of a task folder or config")
    check.add_argument("target", type=Path, help="task folder (e.g. datasets/support_tickets) or experiment YAML")

    serve = sub.add_parser("serve", help="serve a local model (+ LoRA adapter) as an OpenAI-compatible API")
    serve.add_argument("--model", default="embedded", help="'embedded', a local folder or a hub id")
    serve.add_argument("--gguf-file", help="a GGUF file inside the model folder")
    serve.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    serve.add_argument("--adapter", help="a LoRA adapter folder or runs:/RUN_ID/adapter, merged for serving")
    serve.add_argument("--name", help="the model id clients use (default: the model's short name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=32, help="most requests generated together")
    serve.add_argument("--batch-window-ms", type=float, default=10, help="how long a batch waits for more requests")

    export = sub.add_parser("export", help="write an adapter as vLLM and llama.cpp load it, with their serve commands")
    export.add_argument("source", help="an adapter folder, runs:/RUN_ID/adapter, or a parent or arm run id")
    export.add_argument("--to", type=Path, required=True, help="output folder")
    export.add_argument("--arm", help="the arm whose adapter to export, when the run has several")
    export.add_argument("--name", help="the served adapter name (default: the arm's name)")
    export.add_argument("--base", help="the base model's hub id, where the adapter does not name it")

    ui = sub.add_parser("ui", help="the MLflow UI on the local store, with a link to each experiment's arms view")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def _cmd_run(args, console) -> int:
    from pipeline import interrupts
    from pipeline.experiment.config import ConfigError
    from pipeline.experiment.load import load_experiment
    from pipeline.recipe.run import run_experiment

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would run the whole experiment and log its own copy; roi starts its training processes.
        raise ConfigError(f"roi run was started by a distributed launcher (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                          f"run `roi run CONFIG --processes {os.environ['WORLD_SIZE']}` instead, without the launcher")
    overrides = list(args.overrides)
    if args.processes is not None:
        if args.processes < 1:
            raise ConfigError(f"--processes {args.processes}: give 1 or more")
        overrides.append(f"finetune.processes={args.processes}")
    plan = load_experiment(args.config, overrides)
    interrupts.install()
    summary = run_experiment(plan, console, force=args.force, overrides=overrides)
    for arm, why in summary.not_measured.items():  # everything else is written by now
        print(f"roi: arm {arm} {why}", file=sys.stderr)
    return EXIT_NOT_MEASURED if summary.not_measured else 0


def _cmd_report(args, console) -> int:
    from pipeline.tracking import mlflow_store as tracking
    from pipeline.experiment.config import ConfigError
    from pipeline.experiment.load import load_experiment
    from pipeline.report.summary import print_table, summary_from_runs, summary_markdown

    if args.config is None and not args.experiment and not args.run_id:
        raise ConfigError("roi report: give a config, --experiment NAME or --run-id ID")
    experiment = args.experiment or (load_experiment(args.config).config.experiment if args.config else "")
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    parent, children = tracking.find_parent_run(experiment, args.run_id)
    if args.out:
        from pipeline.report.facts import rerender

        for path in rerender(parent.info.run_id, args.out):
            console.print(f"wrote {path}")
        return 0
    summary = summary_from_runs(parent, children)
    if args.markdown:
        print(summary_markdown(summary), end="")
    else:
        print_table(summary, console)
    return 0


def _cmd_compare(args, console) -> int:
    from pipeline.report.compare import compare_runs

    compare_runs(args.run_ids, args.experiment, args.out, console)
    return 0


def _cmd_data_check(args, console) -> int:
    from pipeline.task.checks import check_task
    from pipeline.task.splits import load_task, task_config_for_folder
    from pipeline.report.summary import print_check

    if args.target.suffix in (".yaml", ".yml"):
        from pipeline.experiment.load import load_experiment

        task_cfg, data_cfg = load_experiment(args.target).config.task, None
    else:
        task_cfg, data_cfg = task_config_for_folder(args.target), None
    task = load_task(task_cfg, data_cfg)
    report = check_task(task)
    print_check(task, report, console)
    if report.errors:
        print(f"roi: error: {report.errors[0]}" + (f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""),
              file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args, console) -> int:
    from pipeline.apps.serve import serve

    return serve(model=args.model, gguf_file=args.gguf_file, dtype=args.dtype, adapter=args.adapter, name=args.name,
                 host=args.host, port=args.port, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)


def _cmd_export(args, console) -> int:
    from pipeline.apps.export import export

    for path in export(args.source, args.to, arm=args.arm, name=args.name, base=args.base):
        console.print(f"wrote {path}")
    return 0


def _cmd_ui(args, console) -> int:
    from pipeline.tracking.mlflow_store import ui_server

    return ui_server(args.port, console)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    # Piped output (CI logs, `| tee`) would wrap the table at 80 columns; give it room instead.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    from pipeline.errors import UserError

    if not args.debug:
        _quiet_libraries()
    commands = {"run": _cmd_run, "report": _cmd_report, "data": _cmd_data_check, "serve": _cmd_serve, "ui": _cmd_ui,
                "compare": _cmd_compare, "export": _cmd_export}
    try:
        return commands[args.command](args, console)
    except UserError as exc:
        if args.debug:
            raise
        print(f"roi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("roi: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: still one line, the traceback on request
        if args.debug:
            raise
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"roi: error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def command_line() -> int:
    """The `roi` command (and `python -m pipeline.cli`): `main` on this process's arguments, then a quick exit.

    The process ends right after, so what is left is frozen: the interpreter's last garbage collections then skip
    every object torch, transformers and MLflow made, which otherwise cost seconds at each exit
    (tests/test_cli_overhead.py holds the bound).
    Results are written by then (files with explicit flushes, MLflow synchronously); only cycles that nothing
    refers to are left to the operating system. Not in `main`: a caller in a long-lived process keeps its GC."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command_line())
