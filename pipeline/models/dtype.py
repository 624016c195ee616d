"""Which dtype a model runs in: as configured, or for `auto` the one that is faster on this machine, measured.

On a GPU `auto` is bf16 where supported (else fp16). On a CPU, flags do not say it: a CPU that reports AVX-512
bf16 may still multiply bf16 slower than fp32. So `auto` times the default model's linear shapes in both
dtypes, alternating, once per machine (processor, threads, torch version), keeps the answer under
$XDG_CACHE_HOME/roi/dtype, and picks bf16 only where it is faster; `auto_cpu_choice().reason` says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import torch

# The default model's linear layers at the row counts decoding (32) and training (512) run.
SHAPES = ((32, 576, 1536), (512, 576, 1536), (512, 1536, 576))
ROUNDS = 3


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def pick_dtype(name: str) -> torch.dtype:
    """The dtype a model config's `dtype` means on this machine."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return auto_cpu_choice().dtype


def cpu_supports_bf16() -> bool:
    """True where the CPU reports native bf16 matmuls (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@cache
def auto_cpu_choice() -> DtypeChoice:
    """`dtype: auto` on this CPU: fp32 without native bf16; else whichever ran the model's shapes faster here,
    measured once per machine and kept."""
    if not cpu_supports_bf16():
        return DtypeChoice(torch.float32, "this CPU has no native bf16 matmuls")
    path = _cache_file()
    try:
        kept = json.loads(path.read_text())
        ratio = float(kept["bf16_over_fp32_time"])
        if not ratio > 0 or ratio == float("inf"):  # a damaged record: measure again
            raise ValueError(ratio)
    except (OSError, ValueError, KeyError, TypeError):
        ratio = bf16_over_fp32_time()
        _keep({"bf16_over_fp32_time": ratio, "shapes": SHAPES}, path)
    return choose(ratio, path)


# bf16 must be clearly faster: within a few percent the two are the same speed here, and fp32 is exact.
BF16_MARGIN = 0.95


def choose(bf16_over_fp32_time: float, kept_in: Path) -> DtypeChoice:
    """bf16 where its matmuls took clearly less time than fp32's at the model's shapes (BF16_MARGIN)."""
    if bf16_over_fp32_time < BF16_MARGIN:
        return DtypeChoice(torch.bfloat16, f"bf16 matmuls ran {1 / bf16_over_fp32_time:.2f}x faster than fp32 "
                                           f"at the model's shapes on this CPU (measured once, kept in {kept_in})")
    return DtypeChoice(torch.float32, f"bf16 matmuls took {bf16_over_fp32_time:.2f}x fp32's time at the model's "
                                      f"shapes on this CPU, though it reports bf16: not clearly faster (measured "
                                      f"once, kept in {kept_in})")


def bf16_over_fp32_time(timer: Callable[[], float] = time.perf_counter) -> float:
    """Median over alternating rounds of (bf16 time / fp32 time) for one linear at each of SHAPES."""
    operands = {dtype: [(torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)) for m, k, n in SHAPES]
                for dtype in (torch.float32, torch.bfloat16)}

    def seconds(dtype: torch.dtype) -> float:
        for x, w in operands[dtype]:  # warm: oneDNN builds its kernels on a shape's first call
            torch.nn.functional.linear(x, w)
        start = timer()
        for _ in range(5):
            for x, w in operands[dtype]:
                torch.nn.functional.linear(x, w)
        return timer() - start

    ratios = []
    with torch.inference_mode():
        for _ in range(ROUNDS):
            fp32 = seconds(torch.float32)
            ratios.append(seconds(torch.bfloat16) / fp32)
    return statistics.median(ratios)


def _cache_file() -> Path:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    key = json.dumps([cpu, torch.get_num_threads(), torch.__version__, SHAPES])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roi" / "dtype"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _keep(record: dict, path: Path) -> None:
    """Written aside, then renamed: a half-written file is never read. A failure only costs a later run a
    measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:
        pass
