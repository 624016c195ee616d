"""Engineered-prompt evaluation speed: shared-prefix attention, batched, vs per-example model.generate.

Four paths run in this process on the same rows and the same model, alternating, `--repeats` times:
`model.generate` on each full prompt at batch 1 (the baseline: what a notebook does), the local
backend with the prefix KV cache copied into every batch row, and the local backend with shared-prefix
attention (the prefix held once, at batch 1), with the plain weights and with the weights packed for
oneDNN (`backends.packed_weights`, what `roi run` uses on CPU). The backend paths decode with
`backends.decoding` (finished rows leave the batch). The ratio of
each repeat is taken against the baseline of the same repeat, and the median is printed, so it holds on
a noisy shared machine where absolute times do not. Last line: RATIO <shared path / baseline>.

    python bench/prompt_arm.py [--rows 64] [--batch-size 32] [--repeats 3] [--profile]

It also prints the fraction of this machine's measured dense matmul rate that the shared path reaches
over its wall time (the matmuls' FLOPs, counted by torch.profiler, over the wall time of a pass).
--profile adds the profiler's table for the copying and the shared path: where the time goes.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--random-weights", metavar="DIR",
                        help="a folder with the model's config and tokenizer: the same shape with random weights "
                        "(for a GPU machine the GGUF does not travel to); on CUDA when there is one")
    args = parser.parse_args()

    from pipeline.backends.local import LocalBackend, LocalSettings
    from pipeline.experiment.load import load_experiment
    from pipeline.task.splits import eval_rows, load_task
    from pipeline.models.loading import load_model, load_tokenizer, resolve_source
    from pipeline.models.dtype import pick_dtype
    from pipeline.task.prompts import PromptRenderer, load_template, pick_examples

    plan = load_experiment(args.config)

    cfg = plan.config
    task = load_task(cfg.task, cfg.data)
    texts = eval_rows(task, args.rows, cfg.data.seed)["text"]
    dtype = pick_dtype(cfg.model.dtype)
    if args.random_weights:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(args.random_weights)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights), dtype=dtype)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    else:
        source = resolve_source(cfg.model)
        tokenizer = load_tokenizer(source)
        model = load_model(source, dtype)
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], cfg.prompts.few_shot_k,
                             cfg.data.seed)
    arm = next(a for a in plan.arms if a.name == "engineered")
    renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, examples)
    prompts = [renderer.prompt(t) for t in texts]
    tokens = [len(tokenizer(p.to_string(tokenizer), add_special_tokens=False)["input_ids"]) for p in prompts]
    where = f"{os.cpu_count()} CPUs" if model.device.type == "cpu" else __import__("torch").cuda.get_device_name(0)
    print(f"{len(prompts)} engineered prompts, {sum(tokens) / len(tokens):.0f} tokens each on average "
          f"({renderer.static_prefix_tokens()} shared), {dtype}, {where}, batch {args.batch_size}")

    def backend(batch_size: int, prefix: bool, shared: bool = True, packed: bool = True) -> LocalBackend:
        settings = LocalSettings(batch_size, cfg.eval.max_new_tokens, prefix_cache=prefix, shared_prefix=shared,
                                 packed_weights=packed)
        return LocalBackend(model, tokenizer, settings, prefix_probe=renderer.prefix_probe() if prefix else None)

    baseline = PerExampleGenerate(model, tokenizer, cfg.eval.max_new_tokens)
    paths = {"baseline": baseline, "copied": backend(args.batch_size, True, shared=False),
             "unpacked": backend(args.batch_size, True, packed=False), "shared": backend(args.batch_size, True)}
    for name, path in paths.items():  # warm-up at each path's own batch size; builds the prefix caches
        path.run(prompts[: 2 if name == "baseline" else min(len(prompts), args.batch_size)])
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for _ in range(args.repeats):
        for name, path in paths.items():
            t0 = time.perf_counter()
            outputs[name] = [c.output for c in path.run(prompts)]
            seconds[name].append(time.perf_counter() - t0)
    for name in paths:
        calls = [len(prompts) / s for s in seconds[name]]
        same = sum(a == b for a, b in zip(outputs["baseline"], outputs[name])) / len(prompts)
        print(f"{name:<9} {statistics.median(calls):7.2f} calls/s (median of {args.repeats}; "
              f"{', '.join(f'{c:.2f}' for c in calls)})  identical to baseline: {100 * same:.1f}%")
    vs_copied = statistics.median(c / s for c, s in zip(seconds["copied"], seconds["shared"]))
    print(f"shared vs copied prefix cache: {vs_copied:.2f}x")
    vs_unpacked = statistics.median(u / s for u, s in zip(seconds["unpacked"], seconds["shared"]))
    print(f"packed vs plain weights (both shared): {vs_unpacked:.2f}x")

    peak = matmul_tflops(dtype, model.device.type)
    flops, wall = matmul_flops(lambda: paths["shared"].run(prompts))
    print(f"this machine's dense {str(dtype).removeprefix('torch.')} matmul rate: {peak:.3f} TFLOP/s; the shared "
          f"path's matmuls over its wall time: {flops / wall / 1e12:.3f} TFLOP/s = {100 * flops / wall / 1e12 / peak:.0f}%"
          " of it")
    if args.profile:
        sample = prompts[: 2 * args.batch_size]
        for name in ("copied", "unpacked", "shared"):
            profile(name, lambda: paths[name].run(sample), peak)
    ratio = statistics.median(b / s for b, s in zip(seconds["baseline"], seconds["shared"]))
    print(f"RATIO {ratio:.2f}")


class PerExampleGenerate:
    """The baseline: `model.generate` on each full prompt, one at a time, greedy, up to the same stop tokens."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        from pipeline.backends.local import stop_token_ids

        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.stop_ids = stop_token_ids(model, tokenizer)

    def run(self, prompts):
        import torch

        from pipeline.backends.base import Call

        calls = []
        for prompt in prompts:
            ids = self.tokenizer(prompt.to_string(self.tokenizer), add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=torch.tensor([ids], device=self.model.device), max_new_tokens=self.max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=self.stop_ids,
                    pad_token_id=self.stop_ids[0])
            calls.append(Call(self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), len(ids), 0, 0.0))
        return calls


def matmul_flops(fn) -> tuple[float, float]:
    """FLOPs of the matmuls `fn` runs and its wall time without the profiler: torch.profiler's count for the
    matmul ops, and for the fused CPU attention kernel (which it does not count) 4 x query rows x keys x head
    dim x heads, from the shapes it recorded (its mask, where there is one, is not subtracted)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        fn()
    flops = counted_flops(prof)
    t0 = time.perf_counter()
    fn()
    return flops, time.perf_counter() - t0


FUSED_ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


PACKED_LINEAR = "mkldnn::_linear_pointwise"


def counted_flops(prof) -> float:
    """The matmuls' FLOPs (torch.profiler's count) plus, from their recorded shapes, the fused attention kernel's
    and the packed linear layers' (which it does not count)."""
    flops = sum(e.flops for e in prof.key_averages() if e.key in MATMUL_OPS)
    flops += sum(attention_flops(e.input_shapes) for e in prof.events() if e.name == FUSED_ATTENTION)
    return flops + sum(linear_flops(e.input_shapes) for e in prof.events() if e.name == PACKED_LINEAR)


def linear_flops(shapes) -> int:
    """One linear layer: input [..., K] times the weight [N, K] (its packed copy keeps the shape)."""
    rows = math.prod(shapes[0][:-1])
    return 2 * rows * shapes[1][0] * shapes[1][1]


def attention_flops(shapes) -> int:
    """Scores and weighted values of one attention call: query [N, H, q, D], keys [N, H, k, D]."""
    (n, heads, q, dim), (_, _, k, _) = shapes[0], shapes[1]
    return 4 * n * heads * q * k * dim


def matmul_tflops(dtype, device: str = "cpu", n: int = 2048, reps: int = 10) -> float:
    """Dense matmul rate of this machine in TFLOP/s: the roofline both paths are measured against."""
    import torch

    n = n if device == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile(name: str, fn, peak: float) -> None:
    """Run `fn` under torch.profiler; print where the CPU time went and the matmuls' FLOP rate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    mm = [e for e in events if e.key in MATMUL_OPS or e.key in (FUSED_ATTENTION, PACKED_LINEAR)]
    mm_s = sum(e.self_cpu_time_total for e in mm) / 1e6
    flops = counted_flops(prof)
    attention_s = sum(e.self_cpu_time_total for e in events if "attention" in e.key or e.key == "aten::_softmax") / 1e6
    # (the fused kernel's time is in both lines: it is attention, and its FLOPs are counted with the matmuls)
    ops = sum(e.count for e in events)
    print(f"--- profile: {name} ({wall:.2f} s wall under the profiler, {ops:,} ops) ---")
    print(f"matmuls and attention: {mm_s:.2f} s ({100 * mm_s / wall:.0f}% of wall), {flops / 1e12:.3f} TFLOP, "
          f"{flops / mm_s / 1e12:.3f} TFLOP/s inside them = {100 * flops / mm_s / 1e12 / peak:.0f}% of the "
          f"machine's rate; over the whole wall time {flops / wall / 1e12:.3f} TFLOP/s = "
          f"{100 * flops / wall / 1e12 / peak:.0f}%")
    print(f"attention and softmax: {attention_s:.2f} s ({100 * attention_s / wall:.0f}% of wall)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
