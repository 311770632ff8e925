"""Training-step timer for ``python train.py``, added as one more Lightning callback (what ``gpu_check.sh`` does):

    python train.py trainer=gpu trainer.max_steps=50 \
        '+callbacks.step_timer={_target_: benchmarks.bench_train_gpu.StepTimer, path: steps.json}'

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step and
the callbacks' batch-end work), with the device synchronised at both ends, so the time is the step's own, not the
launch queue's. ``path`` receives ``{"steps", "warmup", "step_ms", "median_ms", "mean_ms", "min_ms", "max_ms",
"first_ms", "tokens_per_step", "tokens_per_s"}``; the statistics skip the first ``warmup`` steps (Triton and
cuBLAS warm-up, the first routing-stats log).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _sync(module) -> None:
    device = getattr(module, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(batch) -> int | None:
    """Token count of ``batch["tokens"]`` (this project's batches), else of the first integer tensor, else None."""
    if isinstance(batch, dict) and isinstance(batch.get("tokens"), torch.Tensor):
        return batch["tokens"].numel()
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for item in items:
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            return item.numel()
    return None


class StepTimer(Callback):
    def __init__(self, path: str, warmup: int = 5):
        self.path = Path(path)
        self.warmup = warmup
        self.step_ms: list[float] = []
        self.tokens: int | None = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module)
        self.step_ms.append((time.perf_counter() - self._t0) * 1e3)
        if self.tokens is None:
            self.tokens = _tokens(batch)

    def summary(self) -> dict:
        timed = self.step_ms[self.warmup :] or self.step_ms
        out = {"steps": len(self.step_ms), "warmup": self.warmup, "step_ms": [round(t, 3) for t in self.step_ms]}
        if timed:
            median = statistics.median(timed)
            out |= {
                "median_ms": median,
                "mean_ms": statistics.fmean(timed),
                "min_ms": min(timed),
                "max_ms": max(timed),
                "first_ms": self.step_ms[0],
                "tokens_per_step": self.tokens,
                "tokens_per_s": self.tokens / (median / 1e3) if self.tokens else None,
            }
        return out

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(), indent=1))
