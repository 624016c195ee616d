"""Early stopping on the validation split: the Trainer evaluates the validation loss every `eval_steps`,
transformers' EarlyStoppingCallback ends training after `patience` evaluations without improvement, and the
adapter weights of the best evaluation are put back at the end.

The best weights are kept in memory rather than through the Trainer's `load_best_model_at_end`, which
needs a checkpoint on disk at every evaluation; this project's checkpoints are timed for resuming a killed
run (`checkpoints.save_every`), and an adapter's weights are a few MB.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.experiment.config import EarlyStoppingConfig


def early_stopping_args(cfg: EarlyStoppingConfig, batch_size: int) -> dict[str, Any]:
    """The SFTConfig settings that evaluate the validation loss every `cfg.eval_steps` steps."""
    return {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "per_device_eval_batch_size": batch_size,
            "metric_for_best_model": "eval_loss", "greater_is_better": False}


def early_stopping_callbacks(cfg: EarlyStoppingConfig, model: Any) -> list[Any]:
    """The Trainer callbacks: stop after `cfg.patience` evaluations without a better loss; keep the best."""
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.patience, early_stopping_threshold=cfg.min_delta),
            KeepBest(model).callback()]


class KeepBest:
    """The trainable (adapter) weights at the lowest validation loss so far, restored when training ends."""

    def __init__(self, model: Any):
        self.model = model
        self.best_loss: float | None = None
        self.best_step = 0
        self.evaluations = 0
        self._best: dict[str, torch.Tensor] | None = None

    def saw(self, loss: float, step: int) -> None:
        self.evaluations += 1
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self._best = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self) -> None:
        if self._best is None:
            return
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._best:
                    param.copy_(self._best[name])

    def callback(self) -> Any:
        from transformers import TrainerCallback

        keep = self

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                if metrics and "eval_loss" in metrics:
                    keep.saw(float(metrics["eval_loss"]), state.global_step)

            def on_train_end(self, args, state, control, **kwargs):
                keep.restore()
                state.keep_best = keep  # read back by finetune() for the run's figures

        return Callback()
