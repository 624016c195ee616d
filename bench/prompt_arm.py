"""Engineered-prompt evaluation speed: prefix-cached, batched path vs per-example model.generate.

Both paths run in this process on the same rows and the same model, so the ratio holds on a
noisy shared machine even where absolute times do not. Last line: RATIO <calls/s new / baseline>.

    python bench/prompt_arm.py [--rows 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.yaml"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from pipeline.arms import generate_calls
    from pipeline.config import load_config
    from pipeline.data import eval_rows, load_task
    from pipeline.models import load_model, load_tokenizer, pick_dtype, resolve_source
    from pipeline.prompts import PromptRenderer, load_template, pick_examples

    cfg = load_config(args.config)
    task = load_task(cfg.task, cfg.data)
    texts = eval_rows(task, args.rows, cfg.data.seed)["text"]
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source)
    dtype = pick_dtype(cfg.model.dtype)
    model = load_model(source, dtype)
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], cfg.prompts.few_shot_k,
                             cfg.data.seed)
    renderer = PromptRenderer(load_template(cfg.prompts.engineered), tokenizer, task.labels, examples)
    prompts = [renderer.render(t) for t in texts]
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)
    print(f"{len(prompts)} engineered prompts, {n_tokens:.0f} tokens each on average, {dtype}, "
          f"{os.cpu_count()} CPUs")

    # Baseline: one model.generate per example on the full rendered prompt.
    generate_calls(model, tokenizer, prompts[:2], 1, cfg.eval.max_new_tokens)  # warm-up
    t0 = time.perf_counter()
    base, _ = generate_calls(model, tokenizer, prompts, 1, cfg.eval.max_new_tokens)
    base_s = time.perf_counter() - t0
    # New path: the static prefix's KV cache computed once, suffixes batched.
    t0 = time.perf_counter()
    new, _ = generate_calls(model, tokenizer, prompts, args.batch_size, cfg.eval.max_new_tokens,
                            prefix=renderer.static_prefix())
    new_s = time.perf_counter() - t0
    same = sum(a.output == b.output for a, b in zip(base, new)) / len(prompts)
    print(f"baseline  per-example generate     {len(prompts) / base_s:7.2f} calls/s")
    print(f"new       prefix cache, batch {args.batch_size:<3}  {len(prompts) / new_s:7.2f} calls/s")
    print(f"identical predictions: {100 * same:.1f}%")
    print(f"RATIO {base_s / new_s:.2f}")


if __name__ == "__main__":
    main()
