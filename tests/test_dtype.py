"""`dtype: auto` on a CPU is decided by measurement (kept per machine), not by the flags the CPU reports."""

import itertools
import json

import torch

from pipeline.models import dtype as dtype_module
from pipeline.models.dtype import bf16_over_fp32_time, choose


def test_bf16_is_picked_only_where_it_ran_faster(tmp_path):
    assert choose(0.6, tmp_path).dtype == torch.bfloat16
    slower = choose(1.8, tmp_path)
    assert slower.dtype == torch.float32 and "took 1.80x fp32's time" in slower.reason and "reports bf16" in slower.reason
    assert choose(0.97, tmp_path).dtype == torch.float32  # within noise of fp32: not clearly faster


def test_the_ratio_is_the_median_over_alternating_rounds():
    """A scripted clock read at each pass's start and end: fp32 passes take 1 s; bf16 passes 3, 0.5 and 2 s, in
    alternating rounds. Ratios 3, 0.5, 2: the median is 2 (a mean would be 1.83, the last round 2, the first 3)."""
    durations = [1.0, 3.0, 1.0, 0.5, 1.0, 2.0]  # fp32, bf16, fp32, bf16, fp32, bf16
    readings = list(itertools.accumulate([0.0] + [d for d in durations for d in (d, 0.0)]))[:-1]
    clock = iter(readings)
    assert bf16_over_fp32_time(lambda: next(clock)) == 2.0


def test_auto_measures_once_per_machine_and_keeps_the_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(dtype_module, "cpu_supports_bf16", lambda: True)
    measured = []
    monkeypatch.setattr(dtype_module, "bf16_over_fp32_time", lambda: measured.append(1) or 1.7)
    dtype_module.auto_cpu_choice.cache_clear()
    try:
        first = dtype_module.auto_cpu_choice()
        dtype_module.auto_cpu_choice.cache_clear()  # a new process
        second = dtype_module.auto_cpu_choice()
    finally:
        dtype_module.auto_cpu_choice.cache_clear()
    assert first.dtype == second.dtype == torch.float32 and measured == [1]
    kept = list((tmp_path / "roi" / "dtype").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["bf16_over_fp32_time"] == 1.7


def test_without_native_bf16_auto_is_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(dtype_module, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(dtype_module, "bf16_over_fp32_time", lambda: (_ for _ in ()).throw(AssertionError("timed")))
    dtype_module.auto_cpu_choice.cache_clear()
    try:
        assert dtype_module.auto_cpu_choice().dtype == torch.float32
    finally:
        dtype_module.auto_cpu_choice.cache_clear()
