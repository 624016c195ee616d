"""GPU figures for the default model's shape, with random weights (the GGUF does not travel to a GPU machine).

    python bench/gpu.py --random-weights DIR [--banking77 DIR] [--skip ...]

DIR holds the model's config and tokenizer. Prints, for one CUDA GPU:
- step: one LoRA training step (batch 16 x 32 tokens, bf16 base, fp32 adapters on every linear layer,
  fused AdamW, clipping), launched eagerly vs replayed as a CUDA graph (`pipeline.training.graphed_step`),
  alternating --repeats times, median ms; then the graphed step's tokens/s at larger batches;
- finetune: the project's `finetune` on the default task (911 rows, 2 epochs), graphs on and off;
- banking77: `finetune` on BANKING77's full train split, one epoch, graphs on;
- eval: calls/s of the default experiment's prompts at the configured and a larger batch, and the
  median decoding pass (CUDA events around each pass of the decoder);
and the GPU's utilisation during each part (nvidia-smi, sampled every 100 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class GpuBusy:
    """The GPU's utilisation, sampled by nvidia-smi in the background, averaged over a part of the run."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def between(self, start: float, end: float) -> str:
        values = [v for t, v in self.samples if start <= t <= end]
        return f"GPU busy {statistics.mean(values):.0f}% (max {max(values):.0f}%)" if values else "GPU busy: no samples"


DEVICE = "cuda"


def random_model(folder: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(DEVICE)


def step_bench(folder: str, repeats: int, busy: GpuBusy) -> None:
    """Eager vs graphed LoRA steps on the same batches, alternating; then the graphed step at larger batches."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.training.graphed_step import GraphedTrainingStep

    peft = get_peft_model(random_model(folder), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = peft.config.vocab_size if hasattr(peft.config, "vocab_size") else peft.get_base_model().config.vocab_size

    def batches(rows: int, length: int = 32, labelled: int = 4, count: int = 4) -> list[dict]:
        out = []
        for _ in range(count):
            ids = torch.randint(0, vocab, (rows, length), device="cuda")
            labels = torch.full_like(ids, -100)
            labels[:, -labelled:] = ids[:, -labelled:]
            out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
        return out

    def eager(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            peft(**batch, use_cache=False).loss.backward()

    def timed(step, data, steps: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(steps):
            step(data[i % len(data)])
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / steps * 1000

    data = batches(16)
    graphed = GraphedTrainingStep(peft.get_base_model(), 16, 4, torch.bfloat16)
    paths = {"eager": eager, "graphed": lambda b: graphed(peft, b)}
    for path in paths.values():
        timed(path, data, 3)  # warm-up; captures the graph
    ms: dict[str, list[float]] = {name: [] for name in paths}
    started = time.perf_counter()
    for _ in range(repeats):
        for name, path in paths.items():
            ms[name].append(timed(path, data, 30))
    for name in paths:
        print(f"step  batch 16 x 32 {name:<8} {statistics.median(ms[name]):7.2f} ms/step "
              f"(median of {repeats}: {', '.join(f'{m:.2f}' for m in ms[name])})")
    print(f"step  eager / graphed: {statistics.median(e / g for e, g in zip(ms['eager'], ms['graphed'])):.1f}x; "
          f"graph captures failed: {graphed.captures_failed}; {busy.between(started, time.perf_counter())}")
    if graphed.graphs:
        replay = next(iter(graphed.graphs.values())).graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            replay.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"step  the graph alone (forward + backward on the GPU): {start.elapsed_time(end) / 20:.2f} ms")
    for rows in (64, 256, 1024):
        del graphed
        torch.cuda.empty_cache()
        graphed = GraphedTrainingStep(peft.get_base_model(), rows, 4, torch.bfloat16)
        data = batches(rows, count=2)
        timed(lambda b: graphed(peft, b), data, 2)
        started = time.perf_counter()
        step_ms = timed(lambda b: graphed(peft, b), data, 10)
        print(f"step  batch {rows} x 32 graphed {step_ms:7.2f} ms/step = {rows * 32 / step_ms * 1000:,.0f} tokens/s; "
              f"{busy.between(started, time.perf_counter())}")


def finetune_bench(folder: str, config: str, overrides: list[str], label: str, busy: GpuBusy,
                   graphs: list[bool], profile: bool = False) -> None:
    """The project's `finetune` on a task's training split, with and without CUDA graphs."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.experiment.load import load_experiment
    from pipeline.task.splits import load_task
    from pipeline.task.prompts import PromptRenderer, load_template
    from pipeline.training.lora import finetune

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for on in graphs:
        plan = load_experiment(config, overrides + [f"finetune.cuda_graphs={str(on).lower()}"])
        cfg = plan.config
        task = load_task(cfg.task, cfg.data)
        train = task.splits["train"]
        arm = next(a for a in plan.arms if a.trains)
        renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, [])
        prompts = [renderer.render(t) for t in train["text"]]
        model = random_model(folder)
        started = time.perf_counter()
        result = finetune(model, tokenizer, prompts, list(train["label"]), arm.finetune, torch.bfloat16,
                          Path(tempfile.mkdtemp(prefix="gpu-bench-")))
        wall = time.perf_counter() - started
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(finetune, random_model(folder), tokenizer, prompts, list(train["label"]), arm.finetune,
                             torch.bfloat16, Path(tempfile.mkdtemp(prefix="gpu-bench-")))
            print(f"{label} profile of one more run (host time, cProfile; its overhead included):")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        steps = -(-len(prompts) // cfg.finetune.batch_size) * cfg.finetune.epochs
        print(f"{label} graphs {'on ' if on else 'off'} {len(prompts)} rows x {cfg.finetune.epochs:g} epochs, batch "
              f"{cfg.finetune.batch_size}: {result.train_time_s:6.1f} s training ({wall:.1f} s with set-up), "
              f"{result.train_tokens / result.train_time_s:,.0f} tokens/s, {result.train_time_s / steps * 1000:.1f} "
              f"ms/step, loss {result.train_loss:.4f}; {busy.between(started, time.perf_counter())}")
        del model, result
        torch.cuda.empty_cache()


def eval_bench(folder: str, busy: GpuBusy, batch_sizes: list[int], rows: int | None) -> None:
    """The default experiment's prompt arms on its test rows: calls/s and the median decoding pass."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.backends.local import LocalBackend, LocalSettings
    from pipeline.experiment.load import load_experiment
    from pipeline.task.splits import eval_rows, load_task
    from pipeline.task.prompts import PromptRenderer, load_template, pick_examples

    plan = load_experiment(str(ROOT / "experiments" / "default.yaml"))

    cfg = plan.config
    task = load_task(cfg.task, cfg.data)
    texts = eval_rows(task, rows, cfg.data.seed)["text"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = random_model(folder).eval()
    examples = pick_examples(task.splits["train"]["text"], task.splits["train"]["label"], cfg.prompts.few_shot_k,
                             cfg.data.seed)
    passes: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
    steps = _time_static_steps()

    def before(module, args, kwargs):
        if torch.cuda.is_current_stream_capturing():  # an event recorded into a graph cannot be timed
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        passes.append((kwargs["input_ids"].shape[1], start, None))

    def after(module, args, kwargs, output):
        if torch.cuda.is_current_stream_capturing():
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        passes[-1] = (*passes[-1][:2], end)

    if DEVICE == "cuda":
        decoder = model.get_decoder()
        decoder.register_forward_pre_hook(before, with_kwargs=True)
        decoder.register_forward_hook(after, with_kwargs=True)
    runs = [(arm, batch, None) for arm in plan.arms if arm.name in ("naive", "engineered", "finetuned")
            for batch in batch_sizes]
    # the baseline: the same arm decoded with continuous batching, op by op
    runs += [(next(a for a in plan.arms if a.name == "engineered"), batch_sizes[0], False)]
    for arm, batch_size, static in runs:
        renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, examples)
        prompts = [renderer.prompt(t) for t in texts]
        settings = LocalSettings(batch_size, cfg.eval.max_new_tokens, prefix_cache=arm.eval.prefix_cache,
                                 static_decoding=static)
        backend = LocalBackend(model, tokenizer, settings, prefix_probe=renderer.prefix_probe())
        backend.run(prompts[:batch_size])  # warm-up at the timed batch size; builds the prefix cache (and graph)
        passes.clear()
        steps.clear()
        started = time.perf_counter()
        calls = backend.run(prompts)
        wall = time.perf_counter() - started
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        decode = [s.elapsed_time(e) for n, s, e in passes if n == 1 and e is not None] if DEVICE == "cuda" else []
        decoder = backend._static.get(batch_size)
        how = ("continuous batching, op by op" if decoder is None else
               f"static waves, {'CUDA graph' if decoder.graph is not None else 'no graph'}")
        step_ms = statistics.median(steps) if decoder is not None and steps else (
            statistics.median(decode) if decode else float("nan"))
        tokens = sum(c.completion_tokens for c in calls)
        print(f"eval  {arm.name:<10} batch {batch_size:<4} {len(calls) / wall:8.1f} calls/s, {tokens / wall:9,.0f} "
              f"generated tokens/s, decoding step median {step_ms:.2f} ms ({how}); "
              f"{busy.between(started, time.perf_counter())}")
        backend.close()


def _time_static_steps() -> list[float]:
    """Wall ms of each static decoding step, its result on the host (what a step costs the decoding loop)."""
    import torch

    from pipeline.backends.decoding.static_cache import StaticDecoder

    steps: list[float] = []
    step = StaticDecoder._decode_step

    def timed(self):
        started = time.perf_counter()
        step(self)
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        steps.append((time.perf_counter() - started) * 1000)

    StaticDecoder._decode_step = timed
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-weights", metavar="DIR", required=True)
    parser.add_argument("--banking77", metavar="DIR", help="BANKING77's folder (train.csv, test.csv, categories.json)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "finetune", "banking77", "eval"])
    parser.add_argument("--graphed-only", action="store_true", help="finetune: no run with graphs off")
    parser.add_argument("--profile", action="store_true", help="finetune: cProfile one more graphed run")
    parser.add_argument("--smoke", action="store_true", help="a check of the script on CPU: tiny sizes, no step part")
    args = parser.parse_args()

    import torch

    global DEVICE
    if args.smoke:
        DEVICE, args.skip = "cpu", args.skip + ["step"]
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    import transformers

    print(f"{torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'CPU'}, torch {torch.__version__}, transformers {transformers.__version__}")
    busy = GpuBusy()
    default = str(ROOT / "experiments" / "default.yaml")
    smoke = ["data.train_limit=16", "finetune.epochs=1"] if args.smoke else []
    parts = {
        "step": lambda: step_bench(args.random_weights, args.repeats, busy),
        "finetune": lambda: finetune_bench(args.random_weights, default, smoke, "finetune", busy,
                                           [True] if args.graphed_only else [True, False, True], profile=args.profile),
        "banking77": lambda: args.banking77 and [
            finetune_bench(args.random_weights, str(ROOT / "experiments" / "banking77.yaml"),
                           [f"task.path={args.banking77}", "data.train_limit=null", "finetune.epochs=1",
                            f"finetune.batch_size={batch}"] + smoke, "banking77", busy, [True]) for batch in (16, 64)],
        "eval": lambda: eval_bench(args.random_weights, busy, [4] if args.smoke else [32, 256], 8 if args.smoke else None),
    }
    for name, part in parts.items():
        if name in args.skip:
            continue
        started = time.perf_counter()
        try:
            part()
        except Exception as exc:  # one part's failure must not cost the others' figures on a lent machine
            import traceback

            traceback.print_exc()
            print(f"{name} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
