"""LoRA fine-tuning with trl's SFTTrainer: resumable checkpoints, training time that survives a kill."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import interrupts
from pipeline.config import FinetuneConfig
from pipeline.models import ModelError


@dataclass
class FinetuneResult:
    model: Any
    train_time_s: float
    train_tokens: int
    train_loss: float
    adapter_dir: Path
    resumed_from: str | None = None


class _TrainClock:
    """Training wall time that survives a resume: saved beside each checkpoint, added on restart."""

    FILE = "train_time.json"

    def __init__(self):
        self.started = time.perf_counter()
        self.before = 0.0

    def resume_from(self, checkpoint: str | None) -> None:
        path = Path(checkpoint) / self.FILE if checkpoint else None
        self.before = json.loads(path.read_text())["seconds"] if path and path.is_file() else 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class CheckpointHooks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                interrupts.check()  # a Ctrl-C swallowed inside the step still stops training here

            def on_save(self, args, state, control, **kwargs):
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    (checkpoint / clock.FILE).write_text(json.dumps({"seconds": clock.seconds()}))

        return CheckpointHooks()


def finetune(model: Any, tokenizer: Any, prompts: list[str], completions: list[str], cfg: FinetuneConfig,
             dtype: torch.dtype, out_dir: Path, report_to: list[str],
             on_resume: Callable[[str], None] | None = None) -> FinetuneResult:
    """Train a LoRA adapter with trl's SFTTrainer, loss on the completion only; save it as safetensors.

    Checkpoints go to `out_dir/trainer` every `cfg.checkpoint_steps` steps; when one is there
    (a run was killed), training resumes from the latest with its optimizer, scheduler, RNG
    state and data order, and the reported training time includes the time before the kill.
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    train = Dataset.from_dict({"prompt": prompts, "completion": completions})
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
    )
    use_cuda = torch.cuda.is_available()
    trainer_dir = out_dir / "trainer"
    args = SFTConfig(
        output_dir=str(trainer_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        completion_only_loss=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # On CPU the base weights are already bf16 (see load_model); autocast would only add casts.
        bf16=use_cuda and dtype == torch.bfloat16,
        fp16=use_cuda and dtype == torch.float16,
        logging_steps=5,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,
        save_only_model=False,
        report_to=report_to,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Rows of similar length share a batch, so little compute goes to padding.
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        warmup_steps=0.05,
        # trl turns this on by default to save memory; a 135M model does not need it and it costs a forward pass.
        gradient_checkpointing=False,
        lr_scheduler_type="linear",
    )
    serving_attention = model.config._attn_implementation
    if not use_cuda:
        # Training rows are short (tens of tokens): on CPU eager attention beats SDPA's kernels there.
        model.set_attn_implementation("eager")
    # The adapter's random init comes from the seed too, not from whatever ran before.
    set_seed(cfg.seed)
    # fp32 adapters on a bf16 base cost a cast per matmul (~1.25x slower on CPU), but in bf16 the optimizer's
    # small updates round away: 3 points of accuracy on the default task (bench/train.py).
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=dtype == torch.float32 or cfg.adapter_fp32)
    clock = _TrainClock()
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[clock.callback()])
    checkpoint = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    clock.resume_from(checkpoint)
    if checkpoint and on_resume:
        on_resume(checkpoint)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    train_time_s = clock.seconds()
    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
    model.set_attn_implementation(serving_attention)
    return FinetuneResult(peft_model.eval(), train_time_s, int(trainer.state.num_input_tokens_seen),
                          float(output.training_loss), adapter_dir, resumed_from=checkpoint)


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """A stored adapter on the base model, for a re-run that reuses a finished training stage."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{adapter_dir}: adapter does not fit this base model ({first})") from None
