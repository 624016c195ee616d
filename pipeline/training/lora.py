"""LoRA fine-tuning with trl's SFTTrainer: resumable checkpoints, training time that survives a kill."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipeline.training.adapter_matmuls import adapter_matmuls_in_input_dtype
from pipeline.training.checkpoints import TrainClock, last_complete_checkpoint, save_every, seed_the_length_groups
from pipeline.training.completion_head import score_completions_only
from pipeline.training.early_stopping import early_stopping_args, early_stopping_callbacks
from pipeline.experiment.config import FinetuneConfig
from pipeline.models.loading import ModelError

@dataclass
class FinetuneResult:
    model: Any
    train_time_s: float
    train_tokens: int
    train_loss: float
    adapter_dir: Path
    resumed_from: str | None = None
    trainer_args: str = "{}"  # the Trainer's full configuration, as JSON
    # Why the resumed training may differ from an uninterrupted one (one line); None when it is the same.
    resumed_inexact: str | None = None
    train_steps: int = 0
    # With early stopping: the step whose adapter was kept (lowest validation loss) and that loss.
    best_step: int | None = None
    best_eval_loss: float | None = None


class _ProgressBar:
    """Training progress on the tool's rich console: step/total, loss, tokens/s and time left.

    Transient, so the tool's own output stays as it was; the log itself goes to MLflow.
    """

    def __init__(self, console: Any):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss_text]}"), TextColumn("{task.fields[speed]}"),
                                 TimeRemainingColumn(), console=console, transient=True, refresh_per_second=4)
        self.task: Any = None
        self.started, self.tokens_before = 0.0, 0

    def begin(self, state: Any) -> None:
        # A resumed run starts at its checkpoint's step; tokens/s counts this session's tokens only.
        self.started, self.tokens_before = time.perf_counter(), state.num_input_tokens_seen
        self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step,
                                           loss=math.nan, loss_text="loss –", speed="– tokens/s")
        # Not drawn on a file or pipe (it would leave only a blank line there), but still kept up to date.
        if self.progress.console.is_interactive:
            self.progress.start()

    def step(self, state: Any) -> None:
        tokens_per_s = (state.num_input_tokens_seen - self.tokens_before) / (time.perf_counter() - self.started)
        self.progress.update(self.task, completed=state.global_step, speed=f"{tokens_per_s:,.0f} tokens/s")

    def log(self, logs: dict) -> None:
        loss = logs.get("loss")  # the running training loss, logged every `logging_steps`
        if isinstance(loss, (int, float)) and self.task is not None:
            self.progress.update(self.task, loss=float(loss), loss_text=f"loss {loss:.3f}")

    def close(self) -> None:
        """Stop drawing; called at the end of training and again if training raised."""
        if self.progress.live.is_started:  # rich prints a newline on every stop
            self.progress.stop()

    def callback(self) -> Any:
        from transformers import TrainerCallback

        bar = self

        class ProgressBar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                bar.begin(state)

            def on_step_end(self, args, state, control, **kwargs):
                bar.step(state)

            def on_log(self, args, state, control, logs=None, **kwargs):
                bar.log(logs or {})

            def on_train_end(self, args, state, control, **kwargs):
                bar.close()

        return ProgressBar()


def _log_callback(on_log: Callable[[dict[str, float], int], None]) -> Any:
    """A Trainer callback that hands each log entry's numbers, at its step, to `on_log`.

    The end-of-training summary (train_runtime, train_loss, ...) is left out: it counts only this
    session's time after a resume, and the arm logs its own train_time_s and train_loss.
    """
    from transformers import TrainerCallback

    class LogTo(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "train_loss" in (logs or {}):  # the summary; per-step entries carry `loss`
                return
            values = {k: float(v) for k, v in (logs or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if values and state.is_world_process_zero:
                on_log(values, state.global_step)

    return LogTo()


def _sft_args(cfg: FinetuneConfig, dtype: torch.dtype, trainer_dir: Path, validated: bool = False) -> Any:
    from trl import SFTConfig

    use_cuda = torch.cuda.is_available()
    evaluation = early_stopping_args(cfg.early_stopping, cfg.batch_size) if validated and cfg.early_stopping else {}
    return SFTConfig(
        **evaluation,
        output_dir=str(trainer_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        # batch_size is the global batch: split over the processes of a distributed run (pipeline.training.distributed).
        per_device_train_batch_size=cfg.batch_size // cfg.processes,
        max_length=cfg.max_length,
        completion_only_loss=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # On CPU the base weights are already bf16 (see load_model); autocast would only add casts.
        bf16=use_cuda and dtype == torch.bfloat16,
        fp16=use_cuda and dtype == torch.float16,
        logging_steps=cfg.logging_steps,
        save_strategy="no" if cfg.checkpoint_steps == 0 else "steps",
        # unset: the `save_every` callback decides when, by training time
        save_steps=cfg.checkpoint_steps or 10**9,
        save_total_limit=2,
        save_only_model=False,
        # No integration: its MLflow callback logs ~170 Trainer and model-config params and unprefixed
        # metrics on the arm run. The log goes to `on_log` (finetune); progress to our rich bar.
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Pinned memory only helps copies to a GPU; without one torch warns on every epoch.
        dataloader_pin_memory=use_cuda,
        # Rows of similar length share a batch, so little compute goes to padding.
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        warmup_steps=cfg.warmup_ratio,  # below 1: a fraction of the steps
        # trl turns this on by default to save memory; a 135M model does not need it and it costs a forward pass.
        # (`gradient_checkpointing`, trl's name for it, is a deprecated alias from transformers 5.24 on.)
        activation_checkpointing=False,
        lr_scheduler_type="linear",
        # One multi-tensor kernel per step for the ~400 adapter tensors, rather than several per tensor.
        optim="adamw_torch_fused",
    )


def finetune(model: Any, tokenizer: Any, prompts: list[str], completions: list[str], cfg: FinetuneConfig,
             dtype: torch.dtype, out_dir: Path, on_log: Callable[[dict[str, float], int], None] | None = None,
             on_resume: Callable[[str], None] | None = None, console: Any = None,
             validation: tuple[list[str], list[str]] | None = None) -> FinetuneResult:
    """Train a LoRA adapter with trl's SFTTrainer, loss on the completion only; save it as safetensors.

    Checkpoints go to `out_dir/trainer` every `cfg.checkpoint_steps` steps (unset: once a minute of
    training has passed since the last); when one is there
    (a run was killed), training resumes from the latest complete one with its optimizer, scheduler,
    RNG state and data order, and the reported training time includes the time before the kill.
    With a rich `console`, a transient progress bar shows on it. `on_log(values, step)` receives the
    Trainer's numeric log entries (loss, learning rate, grad norm, ...) as they are logged. With
    `cfg.early_stopping` and `validation` (prompts, completions), training stops when the validation loss stops
    improving and keeps the best evaluation's adapter (`training.early_stopping`).
    """
    trainer_dir = out_dir / "trainer"
    serving_attention = model.config._attn_implementation
    if not torch.cuda.is_available():
        # Training rows are short (tens of tokens): on CPU eager attention beats SDPA's kernels there.
        model.set_attn_implementation("eager")
    peft_model = _with_lora(model, cfg, dtype)
    clock = TrainClock()
    bar = _ProgressBar(console) if console is not None else None
    callbacks = [clock.callback()] + ([bar.callback()] if bar else []) + ([_log_callback(on_log)] if on_log else [])
    if cfg.checkpoint_steps is None:
        callbacks.append(save_every())
    validation = validation if cfg.early_stopping else None
    if validation:
        callbacks += early_stopping_callbacks(cfg.early_stopping, peft_model)
    trainer = _lora_trainer(peft_model, tokenizer, prompts, completions, cfg, dtype, trainer_dir, callbacks, validation)
    clock.trainer, clock.order = trainer, seed_the_length_groups(trainer, cfg.seed)
    checkpoint, _ = last_complete_checkpoint(trainer_dir) if trainer_dir.is_dir() else (None, 0.0)
    if checkpoint:
        clock.resume_from(Path(checkpoint))
        if on_resume:
            on_resume(checkpoint)
    # fp32 adapters on a bf16 base on CPU: their matmuls in bf16, as the Trainer's autocast does on a GPU.
    bf16_adapters = not torch.cuda.is_available() and dtype == torch.bfloat16 and cfg.adapter_fp32
    try:
        with _walking_trainable_only(trainer, peft_model), \
                adapter_matmuls_in_input_dtype(peft_model) if bf16_adapters else nullcontext():
            output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        if bar:
            bar.close()
    train_time_s = clock.seconds()
    adapter_dir = out_dir / "adapter"
    if trainer.is_world_process_zero():  # one writer when several processes trained it
        trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
    model.set_attn_implementation(serving_attention)
    best = getattr(trainer.state, "keep_best", None)
    return FinetuneResult(peft_model.eval(), train_time_s, int(trainer.state.num_input_tokens_seen),
                          clock.mean_loss(float(output.training_loss), trainer.state.global_step), adapter_dir,
                          resumed_from=checkpoint, trainer_args=trainer.args.to_json_string(),
                          resumed_inexact=clock.inexact() if checkpoint else None,
                          train_steps=trainer.state.global_step, best_step=best.best_step if best else None,
                          best_eval_loss=best.best_loss if best else None)


def _with_lora(model: Any, cfg: FinetuneConfig, dtype: torch.dtype) -> Any:
    """`model` as a peft model with `cfg`'s LoRA layers in it, newly initialised from `cfg.seed`."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
    )
    # The adapter's random init comes from the seed too, not from whatever ran before.
    set_seed(cfg.seed)
    # fp32 adapters on a bf16 base, so that the optimizer's small updates do not round away; their matmuls still
    # run in bf16 (autocast on a GPU, adapter_matmuls on CPU).
    return get_peft_model(model, lora, autocast_adapter_dtype=dtype == torch.float32 or cfg.adapter_fp32)


def _lora_trainer(peft_model: Any, tokenizer: Any, prompts: list[str], completions: list[str], cfg: FinetuneConfig,
                  dtype: torch.dtype, trainer_dir: Path, callbacks: list[Any],
                  validation: tuple[list[str], list[str]] | None = None) -> Any:
    """The SFTTrainer for `peft_model`'s adapter with this project's step: the output head on completion
    positions only and, on one CUDA device, the step graphed."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=peft_model, args=_sft_args(cfg, dtype, trainer_dir, validated=bool(validation)),
                         train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
                         eval_dataset=(Dataset.from_dict({"prompt": validation[0], "completion": validation[1]})
                                       if validation else None),
                         processing_class=tokenizer, callbacks=callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # they print raw log dicts between our output
        trainer.remove_callback(printer)
    score_completions_only(peft_model.get_base_model())  # after SFTTrainer has added its fused head
    graphed = _graphed_step(trainer, peft_model, cfg, dtype)
    if graphed:
        trainer.training_step = graphed
    # The Trainer counts FLOPs each step from the parameter count, which it recounts each step by walking every
    # module (a step's worth of host time on a GPU). Counted once, the same figure.
    parameters = peft_model.num_parameters(exclude_embeddings=True)
    trainer.floating_point_ops = lambda inputs: 6 * inputs["input_ids"].numel() * parameters
    return trainer


@contextmanager
def _walking_trainable_only(trainer: Any, peft_model: Any) -> Iterator[None]:
    """Gradient clipping and zeroing over the adapter's tensors only (420 for the default model), not every
    parameter of the model (692): the Trainer walks `model.parameters()` for both after each step, host time
    that a small model's GPU step cannot hide. The frozen base has no gradients,
    so the norm, the clipping and the zeroing are the same. (One process: several wrap the model in DDP,
    whose own zero_grad the Trainer calls; the clipping is the same there too.) Undone on exit."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def clip(_model: Any) -> Any:
        return trainer.accelerator.clip_grad_norm_(trainable, trainer.args.max_grad_norm)

    def zero_grad(set_to_none: bool = True) -> None:
        trainer.optimizer.zero_grad(set_to_none=set_to_none)  # built over the trainable tensors alone

    trainer._clip_grad_norm = clip
    peft_model.zero_grad = zero_grad  # what the Trainer calls on the model it trains, in one process
    try:
        yield
    finally:
        del trainer._clip_grad_norm, peft_model.zero_grad


def _graphed_step(trainer: Any, peft_model: Any, cfg: FinetuneConfig, dtype: torch.dtype) -> Any:
    """The CUDA-graphed training step for this training, or None where it does not apply: off in the config,
    not on one CUDA device, several processes, fp16 (whose loss scaling the Trainer's own step does)."""
    from pipeline.training.graphed_step import GraphedTrainingStep

    model = peft_model.get_base_model()
    if not cfg.cuda_graphs or model.device.type != "cuda" or cfg.processes > 1 or dtype == torch.float16:
        return None
    # The loss reads each row's completion tokens (labels other than -100, built by SFTTrainer): the longest
    # bounds how many positions a batch's loss projects.
    labels = trainer.train_dataset["labels"]
    labelled_per_row = max(sum(token != -100 for token in row) for row in labels)
    return GraphedTrainingStep(model, cfg.batch_size, max(labelled_per_row, 1),
                               torch.bfloat16 if dtype == torch.bfloat16 else None, longest=max(map(len, labels)))


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """A stored adapter on the base model, for a re-run that reuses a finished training stage."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{adapter_dir}: adapter does not fit this base model ({first})") from None
