"""Checkpoints a resume can trust: when one is saved, which are complete, and what a resume needs besides the
Trainer's own state (the training time, the loss so far, and an epoch's batch order, drawn the same way again)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline import interrupts

# What the Trainer reads back on resume besides trainer_state.json (`_load_from_checkpoint`,
# `_load_optimizer_and_scheduler`, `_load_rng_state`). A missing optimizer, scheduler or RNG state
# (or state file: step 0) is skipped there without an error, resuming into a different run.
RESUME_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")
STATE_FILE = "trainer_state.json"



class TrainClock:
    """What a resume needs besides the Trainer's own state: the training wall time, the sum of the step losses
    (the reported training loss is the whole training's mean, not the resumed part's) and the data order of the
    epoch in progress (to check that the resume draws the same one). Recorded in each checkpoint, added on restart.

    They go into the checkpoint's trainer_state.json, as the state of an `ExportableState` callback: the Trainer
    writes that file in one write, last, after the weights, optimizer, scheduler and RNG state. So a checkpoint
    has them exactly when it is complete; a kill mid-save leaves a checkpoint without a (valid) state file, which
    resuming skips.
    """

    NAME = "TrainClock"  # the callback's class name: its key in the state's `stateful_callbacks`

    def __init__(self):
        self.started = time.perf_counter()
        self.before = 0.0
        self.loss_before: float | None = 0.0  # None: resumed from a checkpoint that did not record it
        self.steps_before = 0
        self.trainer: Any = None  # set once built: the step losses so far are the Trainer's
        self.order: Any = None  # the training's `EpochSeededLengthGroups`, when it has one
        self.resumed_order: Any = None  # the order the checkpoint resumed from recorded

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def loss_sum(self) -> float:
        """The sum of every step's loss so far, this session's (the Trainer's running sums) and before."""
        trainer = self.trainer
        if not hasattr(trainer, "_tr_loss"):  # the Trainer asks for the state once before training too
            return self.loss_before or 0.0
        return (self.loss_before or 0.0) + trainer._total_loss_scalar + float(trainer._tr_loss.item())

    def mean_loss(self, session_mean: float, steps: int) -> float:
        """The whole training's mean step loss, from this session's (the Trainer's figure) over `steps` in all."""
        if self.loss_before is None:
            return session_mean
        return (self.loss_before + session_mean * (steps - self.steps_before)) / max(steps, 1)

    def callback(self) -> Any:
        from transformers import TrainerCallback
        from transformers.trainer_callback import ExportableState

        clock = self

        class TrainClock(TrainerCallback, ExportableState):
            def state(self) -> dict:
                # Called inside Trainer._save_checkpoint right before it writes trainer_state.json.
                attributes = {"seconds": clock.seconds(), "loss_sum": clock.loss_sum(),
                              "steps": clock.trainer.state.global_step if clock.trainer else 0}
                if clock.order is not None:
                    attributes["order"] = clock.order.drawn()
                return {"args": {}, "attributes": attributes}

            def on_step_end(self, args, state, control, **kwargs):
                interrupts.check()  # a Ctrl-C swallowed inside the step still stops training here

        return TrainClock()

    @classmethod
    def recorded(cls, checkpoint: Path) -> float | None:
        """The time a checkpoint recorded; None when it is incomplete (a kill while it was saved)."""
        attributes = cls.attributes(checkpoint)
        seconds = attributes.get("seconds") if attributes else None
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            return None
        return float(seconds) if math.isfinite(seconds) and seconds >= 0 else None

    @classmethod
    def attributes(cls, checkpoint: Path) -> dict | None:
        """All a complete checkpoint recorded here; None when it is incomplete."""
        if not all((checkpoint / name).is_file() for name in RESUME_FILES):
            return None
        try:
            state = json.loads((checkpoint / STATE_FILE).read_text())
            attributes = state["stateful_callbacks"][cls.NAME]["attributes"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return attributes if isinstance(attributes, dict) else None

    def resume_from(self, checkpoint: Path) -> None:
        attributes = self.attributes(checkpoint) or {}
        self.before = self.recorded(checkpoint) or 0.0
        self.resumed_order = attributes.get("order")
        loss_sum, steps = attributes.get("loss_sum"), attributes.get("steps")
        known = isinstance(loss_sum, (int, float)) and isinstance(steps, int)
        self.loss_before, self.steps_before = (float(loss_sum), steps) if known else (None, 0)

    def inexact(self) -> str | None:
        """Why the resumed training may differ from the uninterrupted one; None if it does not.

        Checked: the data order of the epoch that was in progress, as the checkpoint recorded it against as drawn
        again after the resume.
        """
        if self.order is None:  # a random order: accelerate's sampler draws each epoch from data_seed + epoch
            return None
        recorded = self.resumed_order
        if not isinstance(recorded, dict):
            return "the checkpoint records no data order, so the batches after the resume may differ"
        epoch, digest = recorded.get("epoch"), recorded.get("digest")
        again = self.order.digests.get(epoch)
        if again is None:
            # That epoch was finished at the checkpoint (none of its batches were left), or never drawn again
            # because training ended there: nothing of it to differ.
            return None
        if again != digest:
            return f"the data order of epoch {epoch} differs after the resume from the interrupted training's"
        return None


class EpochSeededLengthGroups(torch.utils.data.Sampler):
    """The Trainer's length-grouped order (rows of similar length in a batch), its shuffle drawn from `seed +
    epoch` rather than from the global RNG.

    The Trainer's own `LengthGroupedSampler` shuffles with the global torch RNG at the start of each epoch, where
    its state depends on all that ran before (dropout draws in the epochs before): a run resumed in its second
    epoch drew that epoch's order from the state at the resume, another order than the uninterrupted run's. This
    one draws the same order for an epoch whenever it is drawn, as accelerate's sampler does for a random order
    (`data_seed + epoch`); the Trainer and accelerate call `set_epoch` before each epoch, resumed or not.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0
        self.digests: dict[int, str] = {}  # epoch -> the order drawn for it, hashed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import hashlib

        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        self.digests[self.epoch] = hashlib.sha256(json.dumps(order).encode()).hexdigest()[:16]
        return iter(order)

    def drawn(self) -> dict:
        """The epoch in progress and its order's digest: what a resume must draw again."""
        return {"epoch": self.epoch, "digest": self.digests.get(self.epoch)}


def last_complete_checkpoint(trainer_dir: Path) -> tuple[str | None, float]:
    """The newest complete checkpoint and its recorded training time (None, 0 when there is none).

    Newer incomplete ones are deleted: the Trainer would otherwise save into them again and rotate
    checkpoints by modification time around their leftovers.
    """
    numbered = [p for p in trainer_dir.glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit()]
    for checkpoint in sorted(numbered, key=lambda p: int(p.name[len("checkpoint-"):]), reverse=True):
        seconds = TrainClock.recorded(checkpoint)
        if seconds is not None:
            return str(checkpoint), seconds
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None, 0.0


# With `checkpoint_steps` unset, a checkpoint once this much training time has passed since the last: what a
# kill can cost, whatever a step takes on this machine.
CHECKPOINT_EVERY_S = 60.0


def save_every(seconds: float | None = None) -> Any:
    """A Trainer callback that asks for a checkpoint at the first step end `seconds` (default
    CHECKPOINT_EVERY_S) after the last save."""
    from transformers import TrainerCallback

    seconds = CHECKPOINT_EVERY_S if seconds is None else seconds

    class SaveEveryMinute(TrainerCallback):
        def __init__(self):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # Also at the last step, where the Trainer would save one more: the adapter is saved right after.
            control.should_save = time.perf_counter() - self.last >= seconds

        def on_save(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

    return SaveEveryMinute()


def seed_the_length_groups(trainer: Any, seed: int) -> EpochSeededLengthGroups | None:
    """Make the Trainer's length-grouped order a function of `seed` and the epoch (`EpochSeededLengthGroups`);
    the sampler it will train with, None for a random order (already drawn from data_seed + epoch)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    grouped = trainer._get_train_sampler()
    if not isinstance(grouped, LengthGroupedSampler):
        return None
    sampler = EpochSeededLengthGroups(grouped.lengths, grouped.batch_size, seed)
    trainer._get_train_sampler = lambda train_dataset=None: sampler  # asked for the training data only
    return sampler
