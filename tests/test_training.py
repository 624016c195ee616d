"""Fine-tuning itself, on the real default model for a few steps: a resume never lies about the time
before the kill, and training shows a rich progress bar instead of printing the Trainer's log."""

import io
import json
import math
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from conftest import ROOT
from pipeline.training import checkpoints
from pipeline.training import lora as training
from pipeline.experiment.config import FinetuneConfig, ModelConfig
from pipeline.models.loading import load_model, resolve_source
from pipeline.models.dtype import pick_dtype

# Tiny: 12 short rows, 2 per step; checkpoints at steps 2, 4 and 6 (the Trainer keeps the last two).
pytestmark = pytest.mark.model  # real model runs: left out of make test-fast


CFG = FinetuneConfig(max_steps=6, batch_size=2, max_length=64, checkpoint_steps=2)
EARLIER_S = 1000.0  # added to the first run's clock, so a resume that drops the earlier time is plainly short


def _finetune(out: Path, tokenizer, cfg: FinetuneConfig = CFG, **kwargs) -> training.FinetuneResult:
    lines = (ROOT / "datasets" / "support_tickets" / "train.jsonl").read_text().splitlines()[:12]
    rows = [json.loads(line) for line in lines]
    dtype = pick_dtype("auto")
    model = load_model(resolve_source(ModelConfig()), dtype)  # a fresh one: training puts LoRA layers in it
    return training.finetune(model, tokenizer, [r["text"] for r in rows], [r["label"] for r in rows], cfg, dtype,
                             out, **kwargs)


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tokenizer):
    """A whole run with its checkpoints; its clock reads EARLIER_S more than the real time."""
    out = tmp_path_factory.mktemp("first")
    seconds = checkpoints.TrainClock.seconds
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints.TrainClock, "seconds", lambda clock: seconds(clock) + EARLIER_S)
        started = time.perf_counter()
        result = _finetune(out, tokenizer)
    return SimpleNamespace(out=out, result=result, wall_s=time.perf_counter() - started)


def _kill_while_saving(checkpoint: Path, damage: str) -> None:
    """Leave `checkpoint` as a SIGKILL during its save would."""
    (checkpoint / "train_time.json").unlink(missing_ok=True)  # where the time was kept before it moved to the state
    state = checkpoint / "trainer_state.json"
    if damage == "state_missing":  # killed after the weights, optimizer and RNG state, before the state file
        state.unlink()
    elif damage == "state_truncated":  # killed while the state file was being written
        state.write_text(state.read_text()[: state.stat().st_size // 2])
    else:  # the Trainer's files all there, the training time not recorded
        data = json.loads(state.read_text())
        data["stateful_callbacks"].pop("TrainClock", None)
        state.write_text(json.dumps(data))


# The time missing from a finished-looking checkpoint is the case the old code got wrong; the two
# other ways a kill can leave a checkpoint run with `make test-slow`.
@pytest.mark.parametrize("damage", [pytest.param("state_missing", marks=pytest.mark.slow),
                                    pytest.param("state_truncated", marks=pytest.mark.slow), "time_missing"])
def test_resume_skips_a_checkpoint_killed_while_saving(first_run, damage, tmp_path, tokenizer):
    out = tmp_path / "out"
    shutil.copytree(first_run.out, out)
    newest, complete = out / "trainer" / "checkpoint-6", out / "trainer" / "checkpoint-4"
    assert newest.is_dir() and complete.is_dir()
    _kill_while_saving(newest, damage)

    seen = []
    started = time.perf_counter()
    result = _finetune(out, tokenizer, on_resume=lambda checkpoint: seen.append((checkpoint, newest.exists())))
    wall_s = time.perf_counter() - started

    # It resumed from the last complete checkpoint, the incomplete one deleted first ...
    assert result.resumed_from == str(complete) and seen == [(str(complete), False)]
    # ... with the time recorded there (EARLIER_S + the first run's seconds to step 4), not 0.
    assert EARLIER_S < result.train_time_s < EARLIER_S + first_run.wall_s + wall_s
    # Steps 5-6 again from step 4's optimizer, RNG and data order: the same adapter up to bf16 rounding.
    a, b = _adapter(first_run.out), _adapter(out)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 0.02 * max(float(a[k].float().abs().max()) for k in a), worst


def test_training_on_cpu_scores_the_loss_on_completion_positions_only(first_run):
    """The head trl would use projects every position on CPU; a trl or transformers release that trips one of
    completion_head's guards would silently bring it back."""
    assert getattr(first_run.result.model.get_base_model().forward, "labelled_positions_only", False)


def test_training_shows_a_progress_bar_and_prints_no_raw_logs(tmp_path, tokenizer, capfd, monkeypatch):
    bars = []

    class Spy(training._ProgressBar):
        def __init__(self, console):
            super().__init__(console)
            bars.append(self)

    monkeypatch.setattr(training, "_ProgressBar", Spy)
    console = Console(file=io.StringIO(), force_terminal=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 5 steps: the loss is logged every 5
        _finetune(tmp_path, tokenizer, CFG.model_copy(update={"max_steps": 5, "checkpoint_steps": 0}),
                  console=console)
    printed = "".join(capfd.readouterr())
    assert "{'train_runtime'" not in printed and "{'loss'" not in printed, printed[-2000:]
    assert "pin_memory" not in printed and not [w for w in caught if "pin_memory" in str(w.message)]
    (bar,) = bars
    (task,) = bar.progress.tasks
    assert task.completed == task.total == 5 and task.finished
    assert math.isfinite(task.fields["loss"]) and task.fields["speed"].endswith("tokens/s")
    assert console.file.getvalue() == ""  # not a terminal: the bar draws nothing there, not even a blank line


def test_trainer_settings_use_no_deprecated_name(tmp_path):
    """The CLI and pytest hide FutureWarnings, so a renamed Trainer setting would go unseen until the old name
    is removed (`gradient_checkpointing` became `activation_checkpointing` in transformers 5.24)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training._sft_args(CFG, torch.float32, tmp_path)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecated == [] and args.activation_checkpointing is False


def test_progress_bar_draws_on_a_terminal_and_clears_itself():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    bar = training._ProgressBar(console)
    state = SimpleNamespace(max_steps=4, global_step=2, num_input_tokens_seen=100)  # as resumed at step 2
    bar.begin(state)
    state.global_step, state.num_input_tokens_seen = 3, 160
    bar.step(state)
    bar.log({"loss": 1.2345, "learning_rate": 1e-3})
    bar.progress.refresh()
    bar.close()
    bar.close()  # again, as when training raised: no second stop
    drawn = console.file.getvalue()
    assert "3/4" in drawn and "loss 1.234" in drawn and "tokens/s" in drawn
    assert not bar.progress.live.is_started
    assert drawn.endswith("\x1b[1A\x1b[2K")  # transient: it ends by erasing its own line


@pytest.mark.parametrize("every_s, kept", [(0.0, ["checkpoint-2", "checkpoint-3"]), (1e9, [])])
def test_unset_checkpoint_steps_saves_by_training_time(tmp_path, tokenizer, monkeypatch, every_s, kept):
    """Unset, a checkpoint goes down once CHECKPOINT_EVERY_S of training has passed since the last: at every step
    when that is 0 (the Trainer keeps the last two), never within a short training when it is long."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY_S", every_s)
    _finetune(tmp_path, tokenizer, CFG.model_copy(update={"max_steps": 3, "checkpoint_steps": None}))
    assert sorted(p.name for p in (tmp_path / "trainer").glob("checkpoint-*")) == kept


def test_clipping_and_zeroing_walk_the_adapter_only_and_change_nothing(tmp_path, tokenizer, monkeypatch):
    """The Trainer clips and zeroes over every model parameter; over the adapter's alone the gradient norms
    and the trained adapter are the same."""
    import torch
    from accelerate import Accelerator

    clipped = []
    clip = Accelerator.clip_grad_norm_

    # At the Accelerator, which every Trainer clip goes through (accelerate >= 1.16 no longer calls torch's own).
    def spy(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        clipped.append(len(parameters))
        return clip(self, parameters, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    cfg = CFG.model_copy(update={"max_steps": 3, "checkpoint_steps": 0, "logging_steps": 1})
    norms = {"adapter": [], "model": []}
    lean = _finetune(tmp_path / "lean", tokenizer, cfg, on_log=lambda v, step: norms["adapter"].append(v["grad_norm"]))
    adapter_tensors = sum(p.requires_grad for p in lean.model.parameters())
    assert clipped == [adapter_tensors] * 3 and adapter_tensors < len(list(lean.model.parameters()))

    assert "zero_grad" not in vars(lean.model) and "_clip_grad_norm" not in vars(lean.model)  # undone after training
    monkeypatch.setattr(training, "_walking_trainable_only", lambda trainer, model: nullcontext())  # the Trainer's own
    _finetune(tmp_path / "whole", tokenizer, cfg, on_log=lambda v, step: norms["model"].append(v["grad_norm"]))
    assert clipped[3:] == [len(list(lean.model.parameters()))] * 3
    assert len(norms["adapter"]) == 3 and norms["adapter"] == norms["model"]
    a, b = _adapter(tmp_path / "lean"), _adapter(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_training_runs_the_adapters_in_bf16_on_every_linear_layer(tmp_path, tokenizer, monkeypatch):
    """finetune() turns adapter_matmuls on for fp32 adapters on a bf16 base on CPU, and off for bf16 adapters."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    if torch.cuda.is_available() or pick_dtype("auto") != torch.bfloat16:
        pytest.skip("the bf16 adapter matmuls are for fp32 adapters on a bf16 base on CPU")
    layers = []
    original = training.adapter_matmuls_in_input_dtype

    @contextmanager
    def spy(model):
        with original(model) as replaced:
            layers.append(replaced)
            yield replaced

    monkeypatch.setattr(training, "adapter_matmuls_in_input_dtype", spy)
    cfg = CFG.model_copy(update={"max_steps": 1, "checkpoint_steps": 0})
    result = _finetune(tmp_path / "fp32", tokenizer, cfg)
    assert layers == [30 * 7]  # every linear layer of the default model's 30 blocks
    lora_layers = [m for m in result.model.modules() if isinstance(m, LoraLinear)]
    assert len(lora_layers) == 30 * 7 and not any("forward" in vars(m) for m in lora_layers)  # peft's forward is back
    _finetune(tmp_path / "bf16", tokenizer, cfg.model_copy(update={"adapter_fp32": False}))
    assert layers == [30 * 7]  # bf16 adapters compute in bf16 already


# Two epochs of 4 steps (16 rows, 4 a step), a checkpoint every 3 steps: checkpoint-3 in the first epoch,
# checkpoint-6 in the second. fp32, so a resume that restores everything gives the same numbers to the last bit;
# LoRA dropout and the length-grouped order (the defaults) draw random numbers in every step and epoch.
EXACT = FinetuneConfig(epochs=2, batch_size=4, max_length=64, checkpoint_steps=3, logging_steps=1)


_LORA_TRAINER = training._lora_trainer  # as built, before any test wraps it


class _Stop(Exception):
    """Raised right after a checkpoint is written: training ends there as a kill would."""


def _exact_finetune(out: Path, tokenizer, monkeypatch, stop_after: int | None = None):
    """A fp32 training of 16 rows; its per-step losses and learning rates; stopped after checkpoint `stop_after`."""
    import torch
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == stop_after:
                raise _Stop

    def with_stop(*args, **kwargs):
        trainer = _LORA_TRAINER(*args, **kwargs)
        trainer.add_callback(StopAfter())
        return trainer

    monkeypatch.setattr(training, "_lora_trainer", with_stop)
    rows = [json.loads(line) for line in
            (ROOT / "datasets" / "support_tickets" / "train.jsonl").read_text().splitlines()[:16]]
    steps: dict[int, tuple[float, float]] = {}
    model = load_model(resolve_source(ModelConfig()), torch.float32)
    try:
        result = training.finetune(model, tokenizer, [r["text"] for r in rows], [r["label"] for r in rows], EXACT,
                                   torch.float32, out,
                                   on_log=lambda v, step: steps.__setitem__(step, (v["loss"], v["learning_rate"])))
    except _Stop:
        result = None
    return result, steps


def test_a_resume_in_either_epoch_is_the_uninterrupted_training(tmp_path, tokenizer, monkeypatch):
    """Stopped after a checkpoint in the first or the second epoch and resumed, training goes on as if never
    stopped: the same loss and learning rate at every step after the checkpoint, the same adapter to 1e-6, the
    same reported training loss. (The second epoch's order was drawn from the global RNG at the resume before.)"""
    whole, whole_steps = _exact_finetune(tmp_path / "whole", tokenizer, monkeypatch)
    assert sorted(whole_steps) == list(range(1, 9))
    stopped, _ = _exact_finetune(tmp_path / "stopped", tokenizer, monkeypatch, stop_after=6)
    assert stopped is None
    for checkpoint in (3, 6):
        out = tmp_path / f"from{checkpoint}"
        shutil.copytree(tmp_path / "stopped", out)
        for newer in (out / "trainer").glob("checkpoint-*"):
            if int(newer.name.split("-")[1]) > checkpoint:
                shutil.rmtree(newer)
        resumed, steps = _exact_finetune(out, tokenizer, monkeypatch)
        assert resumed.resumed_from == str(out / "trainer" / f"checkpoint-{checkpoint}")
        assert resumed.resumed_inexact is None
        assert sorted(steps) == list(range(checkpoint + 1, 9))
        for step, (loss, lr) in steps.items():
            assert loss == pytest.approx(whole_steps[step][0], abs=1e-6), (checkpoint, step)
            assert lr == whole_steps[step][1], (checkpoint, step)
        a, b = _adapter(tmp_path / "whole"), _adapter(out)
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, checkpoint
        assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-6)  # the whole training's mean


def test_a_resume_that_draws_another_data_order_says_so(tmp_path, tokenizer, monkeypatch):
    """Where the epoch in progress is drawn again in another order than the checkpoint recorded, the result
    says the resume is inexact rather than passing it off as the same training."""
    _exact_finetune(tmp_path, tokenizer, monkeypatch, stop_after=3)
    monkeypatch.setattr(checkpoints.EpochSeededLengthGroups, "set_epoch", lambda self, epoch: None)
    state = tmp_path / "trainer" / "checkpoint-3" / "trainer_state.json"
    recorded = json.loads(state.read_text())
    recorded["stateful_callbacks"]["TrainClock"]["attributes"]["order"]["digest"] = "another order"
    state.write_text(json.dumps(recorded))
    resumed, _ = _exact_finetune(tmp_path, tokenizer, monkeypatch)
    assert resumed.resumed_inexact and "data order" in resumed.resumed_inexact


def test_early_stopping_stops_when_the_validation_loss_stops_improving_and_keeps_the_best_step(tmp_path, tokenizer):
    from pipeline.experiment.config import EarlyStoppingConfig

    lines = (ROOT / "datasets" / "support_tickets" / "validation.jsonl").read_text().splitlines()[:8]
    rows = [json.loads(line) for line in lines]
    # A rate far too high: the validation loss falls for a step or two, then climbs.
    cfg = FinetuneConfig(max_steps=16, batch_size=2, max_length=64, checkpoint_steps=0, learning_rate=0.05,
                         early_stopping=EarlyStoppingConfig(patience=2, eval_steps=1))
    logged: list[tuple[int, float]] = []
    result = _finetune(tmp_path, tokenizer, cfg, validation=([r["text"] for r in rows], [r["label"] for r in rows]),
                       on_log=lambda values, step: logged.extend([(step, values["eval_loss"])] if "eval_loss" in values
                                                                  else []))
    losses = dict(logged)
    assert result.train_steps < 16, "it trained the whole schedule"
    # Stopped `patience` evaluations after the best, and kept the best one.
    best_step = min(losses, key=losses.get)
    assert (result.best_step, result.best_eval_loss) == (best_step, losses[best_step])
    assert result.train_steps == best_step + 2
