"""Engineered-prompt evaluation speed: prefix-cached, batched path vs per-example model.generate.

Both paths run in this process on the same rows and the same model, so the ratio holds on a
noisy shared machine even where absolute times do not. Last line: RATIO <calls/s new / baseline>.

    python bench/prompt_arm.py [--rows 64] [--batch-size 8] [--profile]

--profile adds a torch-profiler breakdown of both paths: where the time goes, the FLOPs the
matmuls do, and how far their rate is from this machine's dense matmul rate (measured here).
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
    parser.add_argument("--profile", action="store_true", help="also profile both paths with torch.profiler")
    args = parser.parse_args()

    from pipeline.backends.local import measure_local
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
    arm = next(a for a in cfg.resolved_arms if a.name == "engineered")
    renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, examples)
    prompts = [renderer.render(t) for t in texts]
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)
    print(f"{len(prompts)} engineered prompts, {n_tokens:.0f} tokens each on average, {dtype}, "
          f"{os.cpu_count()} CPUs")

    # Baseline: one model.generate per example on the full rendered prompt.
    measure_local(model, tokenizer, prompts[:2], 1, cfg.eval.max_new_tokens)  # warm-up
    t0 = time.perf_counter()
    base = measure_local(model, tokenizer, prompts, 1, cfg.eval.max_new_tokens).calls
    base_s = time.perf_counter() - t0
    # New path: the static prefix's KV cache computed once, suffixes batched.
    t0 = time.perf_counter()
    new = measure_local(model, tokenizer, prompts, args.batch_size, cfg.eval.max_new_tokens,
                         prefix_probe=renderer.prefix_probe()).calls
    new_s = time.perf_counter() - t0
    same = sum(a.output == b.output for a, b in zip(base, new)) / len(prompts)
    print(f"baseline  per-example generate     {len(prompts) / base_s:7.2f} calls/s")
    print(f"new       prefix cache, batch {args.batch_size:<3}  {len(prompts) / new_s:7.2f} calls/s")
    print(f"identical predictions: {100 * same:.1f}%")
    if args.profile:
        import torch

        peak = matmul_tflops(dtype)
        print(f"this machine's dense {str(dtype).removeprefix('torch.')} matmul rate: {peak:.3f} TFLOP/s "
              "(2048x2048 products)")
        sample = prompts[: 2 * args.batch_size]
        profile("baseline", lambda: measure_local(model, tokenizer, sample, 1, cfg.eval.max_new_tokens), peak)
        profile("new", lambda: measure_local(model, tokenizer, sample, args.batch_size, cfg.eval.max_new_tokens,
                                              prefix_probe=renderer.prefix_probe()), peak)
        del torch
    print(f"RATIO {base_s / new_s:.2f}")


def matmul_tflops(dtype, n: int = 2048, reps: int = 10) -> float:
    """Dense matmul rate of this machine in TFLOP/s: the roofline both paths are measured against."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile(name: str, fn, peak: float) -> None:
    """Run `fn` under torch.profiler; print where the CPU time went and the matmuls' FLOP rate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    mm = [e for e in events if e.key in MATMUL_OPS]
    mm_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    flops = sum(e.flops for e in mm)
    attention_s = sum(e.self_cpu_time_total for e in events if "attention" in e.key or e.key == "aten::_softmax") / 1e6
    ops = sum(e.count for e in events)
    print(f"--- profile: {name} ({wall:.2f} s wall under the profiler, {ops:,} ops) ---")
    print(f"matmuls: {mm_s:.2f} s ({100 * mm_s / wall:.0f}% of wall), {flops / 1e12:.3f} TFLOP, "
          f"{flops / mm_s / 1e12:.3f} TFLOP/s inside them = {100 * flops / mm_s / 1e12 / peak:.0f}% of the "
          f"machine's rate; over the whole wall time {flops / wall / 1e12:.3f} TFLOP/s = "
          f"{100 * flops / wall / 1e12 / peak:.0f}%")
    print(f"attention and softmax: {attention_s:.2f} s ({100 * attention_s / wall:.0f}% of wall)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
