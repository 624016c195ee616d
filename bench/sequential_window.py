"""What a sequential evaluation's smaller join window costs a batching local arm, and how its stopped pass is
timed. The fine-tuned arm's prompts (the text alone) on the default model at batch 32, four paths alternating
`--repeats` times: the whole pass with the default window (8 batches sorted by length; the baseline), the whole
pass with a window of 32 (what `eval.sequential` sets so that answers come back in order at every check), and
both stopped after 96 rows (timed at the steady rate, `measure.timing`). Each path's throughput is divided by
the baseline's of the same repeat; the median ratio is printed.

    python bench/sequential_window.py [--rows 320] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backends.local import LocalBackend, LocalSettings  # noqa: E402
from pipeline.experiment.config import ModelConfig  # noqa: E402
from pipeline.measure.timing import EnoughRows, measure  # noqa: E402
from pipeline.models.dtype import pick_dtype  # noqa: E402
from pipeline.models.loading import load_model, load_tokenizer, resolve_source  # noqa: E402
from pipeline.task.prompts import Prompt  # noqa: E402

PATHS = {"window 256, whole pass": (None, None), "window 32, whole pass": (32, None),
         "window 32, stopped at 96": (32, 96), "window 256, stopped at 96": (None, 96)}


def throughput(model, tokenizer, prompts, window, stop_at) -> float:
    backend = LocalBackend(model, tokenizer, LocalSettings(32, 8, prefix_cache=False, window_rows=window))
    seen = []

    def enough(calls):
        seen.extend(calls)
        if stop_at and len(seen) >= stop_at:
            raise EnoughRows

    return measure(backend, prompts, warmup=2, on_calls=enough).throughput_calls_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = resolve_source(ModelConfig())
    model, tokenizer = load_model(source, pick_dtype("auto")), load_tokenizer(source)
    lines = (ROOT / "datasets" / "support_tickets" / "test.jsonl").read_text().splitlines()[: args.rows]
    prompts = [Prompt(text=json.loads(line)["text"]) for line in lines]
    ratios: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(args.repeats):
        rates = {name: throughput(model, tokenizer, prompts, *path) for name, path in PATHS.items()}
        for name, rate in rates.items():
            ratios[name].append(rate / rates["window 256, whole pass"])
        print("  ".join(f"{name}: {rate:.1f} calls/s" for name, rate in rates.items()), flush=True)
    for name, values in ratios.items():
        print(f"{name:<28} {statistics.median(values):.2f}x the baseline (median of {args.repeats})")


if __name__ == "__main__":
    main()
