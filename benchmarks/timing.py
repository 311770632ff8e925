"""Shared timing, reporting and JSON output of the kernel benchmarks (``bench_router.py``, ``bench_moe_layer.py``).

Timing: every candidate of one shape is timed in the same process, interleaved round-robin (round r times each
candidate once, in order), and the median (or the best) per candidate is reported, so a load change on a shared
machine hits all candidates alike. On CUDA each call sits between two CUDA events, after a write of 256 MB that
flushes the L2 cache (as ``triton.testing.do_bench`` does); on the CPU each call is timed with ``time.perf_counter``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    """One timed candidate on one shape. ``metric`` is GB/s (router) or TFLOP/s (layer)."""

    bench: str
    shape: str
    impl: str
    us: float | None
    metric: float | None = None
    metric_name: str = ""
    note: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def wait_quiet(limit_s: float, max_load: float = 0.5, poll_s: float = 5.0) -> tuple[float, float]:
    """Wait (at most ``limit_s``) until the 1-minute load average is below ``max_load``; returns (seconds waited,
    load average at the end). The load average lags by about a minute, so a quiet start is not a quiet run:
    report the load next to every figure."""
    t0 = time.perf_counter()
    while load_average() >= max_load and time.perf_counter() - t0 < limit_s:
        time.sleep(poll_s)
    return time.perf_counter() - t0, load_average()


def time_interleaved(
    candidates: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int, stat: str = "median"
) -> dict[str, float | str]:
    """Time per call in microseconds for each candidate (``stat``: "median" or "min" over the rounds), or the error
    text of a candidate that failed."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat={stat!r}: expected 'median' or 'min'")
    alive: dict[str, Callable[[], object]] = {}
    out: dict[str, float | str] = {}
    for name, fn in candidates.items():
        try:
            for _ in range(warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            alive[name] = fn
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            out[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    samples: dict[str, list[float]] = {name: [] for name in alive}
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    names = list(alive)
    for r in range(rounds if names else 0):
        # rotate the order each round: a candidate that runs right after another pays for the heap and cache state
        # it left (1-2 ms of a 20 ms CPU step, measured), so no candidate may hold one position throughout
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = alive[name]
            if flush is not None:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e6)
    for name, values in samples.items():
        out[name] = statistics.median(values) if stat == "median" else min(values)
    return out


def print_table(title: str, results: list[Result], project: str, baselines: list[str]) -> None:
    """One block per shape: time, metric, and the project's speed-up over each baseline (baseline time / ours)."""
    print(f"\n## {title}")
    by_shape: dict[str, list[Result]] = {}
    for r in results:
        by_shape.setdefault(r.shape, []).append(r)
    for shape, rows in by_shape.items():
        ours = next((r.us for r in rows if r.impl == project and r.us), None)
        print(f"\n{shape}")
        print(f"  {'impl':<44} {'time (us)':>12} {rows[0].metric_name:>10} {'ours is x faster':>17}")
        for r in rows:
            if r.us is None:
                print(f"  {r.impl:<44} {'-':>12} {'-':>10} {'-':>17}  {r.error or r.note}")
                continue
            ratio = f"{r.us / ours:.2f}" if ours and r.impl in baselines else ""
            metric = f"{r.metric:.3g}" if r.metric is not None else "-"
            print(f"  {r.impl:<44} {r.us:>12.1f} {metric:>10} {ratio:>17}  {r.note}")


def write_json(path: str | None, bench: str, device: torch.device, args: dict, results: list[Result]) -> None:
    if not path:
        return
    payload = {"bench": bench, "env": environment(device), "args": args, "results": [asdict(r) for r in results]}
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
