"""LoRA training speed: this project's path vs trl SFTTrainer with fp32 defaults, same data and seed.

Both trainings run in this process, alternating, `--repeats` times; the ratio is tokens/s of the
new path over the baseline's in the same repeat, counting the same non-padding tokens, and the
median ratio is printed. Accuracy of each path's adapter on the same test rows is printed beside
it, and the roofline: the FLOPs of the new path's matmuls (counted by torch's FlopCounterMode in one
more, untimed run of the same seeded training) over its median wall time, against this machine's
dense matmul rate in the training dtype. Last line: RATIO <tokens/s new / baseline>.

    python bench/train.py [--train-rows 300] [--eval-rows 150] [--epochs 1] [--repeats 3]

The accuracy of 300 rows for 1 epoch is a short training's; for the default experiment's own
(911 rows, 2 epochs, all 456 test rows), run with --train-rows 911 --epochs 2 --eval-rows 456
--repeats 1 (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _accuracy(model, tokenizer, renderer, rows, labels, max_new_tokens) -> float:
    from pipeline.backends.local import measure_local
    from pipeline.measure.scoring import parse_label

    calls = measure_local(model, tokenizer, [renderer.render(t) for t in rows["text"]], 8, max_new_tokens).calls
    return sum(labels[p] == g if p >= 0 else False
               for p, g in zip((parse_label(c.output, labels) for c in calls), rows["label"])) / len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.yaml"))
    parser.add_argument("--train-rows", type=int, default=300)
    parser.add_argument("--eval-rows", type=int, default=150)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from pipeline.training.lora import finetune
    from pipeline.experiment.load import load_experiment
    from pipeline.task.splits import eval_rows, load_task
    from pipeline.models.loading import load_model, load_tokenizer, resolve_source
    from pipeline.models.dtype import pick_dtype
    from pipeline.task.prompts import PromptRenderer, load_template

    hf_logging.set_verbosity_error()
    plan = load_experiment(args.config, [f"data.train_limit={args.train_rows}", f"finetune.epochs={args.epochs}"])
    cfg = plan.config
    task = load_task(cfg.task, cfg.data)
    train, test = task.splits["train"], eval_rows(task, args.eval_rows, cfg.data.seed)
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source)
    arm = next(a for a in plan.arms if a.trains)
    renderer = PromptRenderer(load_template(arm.prompt), tokenizer, task.labels, [])
    prompts, completions = [renderer.render(t) for t in train["text"]], list(train["label"])
    f = cfg.finetune
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    dtype = pick_dtype(f.dtype if f.dtype != "auto" else cfg.model.dtype)

    def baseline(run_dir: Path):
        """trl defaults in fp32 (gradient checkpointing, random batches, fp32 adapters): tokens/s, model."""
        trainer = SFTTrainer(
            model=load_model(source, torch.float32),
            train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=f.lora.r, lora_alpha=f.lora.alpha, lora_dropout=f.lora.dropout,
                                   target_modules=f.lora.target_modules, task_type="CAUSAL_LM"),
            args=SFTConfig(output_dir=str(run_dir), num_train_epochs=f.epochs, learning_rate=f.learning_rate,
                           per_device_train_batch_size=f.batch_size, max_length=f.max_length, seed=f.seed,
                           data_seed=f.seed, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                           include_num_input_tokens_seen="non_padding", disable_tqdm=True, bf16=False),
        )
        t0 = time.perf_counter()
        trainer.train()
        return trainer.state.num_input_tokens_seen / (time.perf_counter() - t0), trainer.model.eval()

    new_walls: list[float] = []

    def new(run_dir: Path):
        """What `roi run` does (bf16 where native, eager attention, no checkpointing, length grouping,
        the loss head on completion tokens only): tokens/s, model."""
        result = finetune(load_model(source, dtype), tokenizer, prompts, completions, f, dtype, run_dir)
        new_walls.append(result.train_time_s)
        return result.train_tokens / result.train_time_s, result.model

    rates: dict[str, list[float]] = {"baseline": [], "new": []}
    models = {}
    for repeat in range(args.repeats):  # alternating, so a slow spell of the machine hits both
        for name, train_path in (("baseline", baseline), ("new", new)):
            models.pop(name, None)  # the previous repeat's model, freed before the next one loads
            rate, models[name] = train_path(out / f"{name}-{repeat}")
            rates[name].append(rate)
            print(f"repeat {repeat + 1}: {name:<8} {rate:7.0f} tokens/s", flush=True)
    # Training is seeded and deterministic here: the last repeat's adapters stand for all of them.
    accuracy = {name: _accuracy(model, tokenizer, renderer, test, task.label_names, cfg.eval.max_new_tokens)
                for name, model in models.items()}

    print(f"{len(prompts)} training rows, {args.epochs:g} epoch(s), eval on {len(test)} test rows, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} alternating repeats")
    for name, label in (("baseline", "trl SFTTrainer fp32 defaults"),
                        ("new", f"roi finetune ({str(dtype).removeprefix('torch.')})")):
        print(f"{name:<9} {label:<30} {statistics.median(rates[name]):7.0f} tokens/s "
              f"({', '.join(f'{r:.0f}' for r in rates[name])})  accuracy {100 * accuracy[name]:.1f}%")
    _print_roofline(lambda: new(out / "profiled"), statistics.median(new_walls), dtype)
    print(f"RATIO {statistics.median(n / b for n, b in zip(rates['new'], rates['baseline'])):.2f}")


def _print_roofline(train, wall_s: float, dtype) -> None:
    """The new path's FLOPs (one more run of the same seeded training, counted op by op by torch's FlopCounterMode:
    matmuls, forward and backward) over its timed wall time, against this machine's dense matmul rate in `dtype`.
    (torch.profiler's count held every event of the training, ~24 GB for 300 rows, and was killed.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from prompt_arm import matmul_tflops

    peak = matmul_tflops(dtype)
    with FlopCounterMode(display=False) as counter:
        train()
    flops = counter.get_total_flops()
    rate = flops / wall_s / 1e12
    print(f"roofline: this machine's dense {str(dtype).removeprefix('torch.')} matmul rate {peak:.3f} TFLOP/s; the new "
          f"path's matmuls ({flops / 1e12:.2f} TFLOP) over its median wall time ({wall_s:.1f} s): {rate:.3f} TFLOP/s "
          f"= {100 * rate / peak:.0f}%")


if __name__ == "__main__":
    main()
