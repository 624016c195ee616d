"""`roi serve` throughput at 1, 8 and 32 concurrent clients against in-process batches of 1, 8 and 32.

The engineered prompt of the default experiment on the embedded model: the same prompts go to a
`LocalBackend` in this process (the template's prefix cache, batch b) and, over HTTP, to a
`roi serve` subprocess (its batching window and automatic prefix cache) from b concurrent
clients. The two paths alternate, `--repeats` times each; the median calls/s of each and the
median HTTP / in-process ratio are printed. Only one of the two computes at any time.

    python bench/serve.py [--rows 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LEVELS = (1, 8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.yaml"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from conftest import Served
    from pipeline.backends.local import LocalBackend, LocalSettings
    from pipeline.backends.openai import OpenAIBackend
    from pipeline.experiment.config import OpenAIModelConfig
    from pipeline.experiment.load import load_experiment
    from pipeline.task.splits import eval_rows, load_task
    from pipeline.measure.timing import measure
    from pipeline.models.loading import load_model, load_tokenizer, resolve_source
    from pipeline.models.dtype import pick_dtype
    from pipeline.task.prompts import PromptRenderer, load_template, pick_examples

    plan = load_experiment(args.config)

    cfg = plan.config
    arm = next(a for a in plan.arms if a.name == "engineered")
    task = load_task(cfg.task, cfg.data)
    source = resolve_source(cfg.model)
    tokenizer, dtype = load_tokenizer(source), pick_dtype(cfg.model.dtype)
    model = load_model(source, dtype)
    train = task.splits["train"]
    examples = pick_examples(train["text"], train["label"], cfg.prompts.few_shot_k, cfg.data.seed)
    renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, examples)
    prompts = [renderer.prompt(t) for t in eval_rows(task, args.rows, cfg.data.seed)["text"]]
    max_new = arm.eval.max_new_tokens
    print(f"{len(prompts)} engineered prompts, {renderer.static_prefix_tokens()} prefix tokens, {dtype}, "
          f"{os.cpu_count()} CPUs")

    def in_process(batch: int):
        backend = LocalBackend(model, tokenizer, LocalSettings(batch, max_new), prefix_probe=renderer.prefix_probe())
        return measure(backend, prompts, warmup=batch)

    rates: dict[tuple[str, int], list[float]] = {}
    answers: dict[str, list[str]] = {}
    with Served("--model", "embedded", "--max-batch", "32", "--batch-window-ms", "10", "--name", "bench",
                env=dict(os.environ), log_dir=Path("/tmp")) as server:
        for _ in range(args.repeats):
            for level in LEVELS:
                local = in_process(level)
                spec = OpenAIModelConfig(backend="openai", base_url=server.base_url, model="bench",
                                         max_concurrency=level, timeout_s=600, max_retries=0)
                http = measure(OpenAIBackend(spec, max_new), prompts, warmup=level)
                assert not any(c.error for c in http.calls), [c.error for c in http.calls if c.error][:3]
                rates.setdefault(("in-process", level), []).append(local.throughput_calls_per_s)
                rates.setdefault(("http", level), []).append(http.throughput_calls_per_s)
                answers[f"local{level}"] = [c.output for c in local.calls]
                answers[f"http{level}"] = [c.output for c in http.calls]
    print(f"{'clients / batch':>16} {'in-process calls/s':>19} {'roi serve calls/s':>18} {'ratio':>6}")
    for level in LEVELS:
        local, http = rates[("in-process", level)], rates[("http", level)]
        ratio = statistics.median(h / l for h, l in zip(http, local))
        print(f"{level:>16} {statistics.median(local):>19.2f} {statistics.median(http):>18.2f} {ratio:>6.2f}")
    same = {level: sum(a == b for a, b in zip(answers[f"local{level}"], answers[f"http{level}"])) / len(prompts)
            for level in LEVELS}
    print("identical answers, HTTP vs in-process: " + ", ".join(f"{k}: {100 * v:.0f}%" for k, v in same.items()))
    print(f"RATIO {statistics.median(statistics.median(h / l for h, l in zip(rates[('http', n)], rates[('in-process', n)])) for n in LEVELS):.2f}")


if __name__ == "__main__":
    main()
