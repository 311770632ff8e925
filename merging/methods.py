"""Merge methods: pure functions ``fn(base, finetuned, **params) -> merged`` over one tensor name, in fp32.

base: ``[...]``; finetuned: N tensors shaped like base. Task vectors are ``tau_t = finetuned_t - base``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

MergeFn = Callable[..., torch.Tensor]
METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def wrap(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        return fn

    return wrap


def _weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n)
    if len(weights) != n:
        raise ValueError(f"weights: expected {n} values (one per fine-tuned model), got {len(weights)}")
    return torch.tensor([float(w) for w in weights])


def _task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N, ...]`` fp32 stack of ``finetuned_t - base``."""
    return torch.stack([f.float() for f in finetuned]) - base.float()


def _bcast(w_N: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w_N.reshape(-1, *([1] * (like.dim() - 1)))


@register("linear")
def linear(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted average of the fine-tuned models, ``sum_t w_t theta_t / sum_t w_t`` (the base is unused)."""
    w = _weights(weights, len(finetuned))
    if w.sum() == 0:
        raise ValueError("weights: must not sum to 0 for the linear merge")
    stacked = torch.stack([f.float() for f in finetuned])
    return (stacked * _bcast(w, stacked)).sum(0) / w.sum()


@register("task_arithmetic")
def task_arithmetic(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], lam: float = 1.0, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``base + lam * sum_t w_t tau_t``."""
    tau = _task_vectors(base, finetuned)
    w = _weights(weights, len(finetuned))
    return base.float() + lam * (tau * _bcast(w, tau)).sum(0)


def trim_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, per task vector (dim 0), its ``m = ceil(density * d)`` largest magnitudes; zero the rest.

    Entries tied with the m-th largest magnitude are all kept. (The TIES reference code thresholds at the
    ``(d - int(d*K))``-th smallest magnitude, which keeps one entry more than ``int(d*K)``.)
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density}: expected 0 < density <= 1")
    flat = tau.reshape(tau.shape[0], -1)
    d = flat.shape[1]
    m = math.ceil(density * d)
    if m >= d:
        return tau.clone()
    thresh = flat.abs().kthvalue(d - m + 1, dim=1, keepdim=True).values
    return (flat * (flat.abs() >= thresh)).reshape(tau.shape)


def elect_sign(tau: torch.Tensor) -> torch.Tensor:
    """TIES sign election by total mass: ``sign(sum_t tau_t)``; zeros take the majority elected sign (+1 on a tie)."""
    sign = torch.sign(tau.sum(0))
    majority = 1.0 if sign.sum() >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_mean(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries whose sign agrees with the elected ``sign`` (zeros are not counted)."""
    agree = torch.sign(tau) == sign.unsqueeze(0)
    kept = tau * agree
    return kept.sum(0) / agree.sum(0).clamp_min(1)


@register("ties")
def ties(base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim to top-``density`` magnitudes, elect sign, disjoint mean, scale.

    ``base + lam * disjoint_mean(trim(tau), elect_sign(trim(tau)))``. Trimming here is per tensor.
    """
    trimmed = trim_topk(_task_vectors(base, finetuned), density)
    return base.float() + lam * disjoint_mean(trimmed, elect_sign(trimmed))


def method_params(method: str) -> dict[str, object]:
    """The parameters a method accepts and their defaults."""
    fn = METHODS[method]
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[2:]}


def merge_tensors(method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor], **params) -> torch.Tensor:
    """Apply a registered method to one tensor; returns fp32. Unknown methods or parameters raise ValueError."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    if not finetuned:
        raise ValueError("finetuned: expected at least one fine-tuned tensor")
    unknown = set(params) - set(method_params(method))
    if unknown:
        raise ValueError(f"method {method!r} does not take {sorted(unknown)}; it takes {sorted(method_params(method))}")
    for i, f in enumerate(finetuned):
        if f.shape != base.shape:
            raise ValueError(f"finetuned[{i}]: shape {tuple(f.shape)} differs from base {tuple(base.shape)}")
    return METHODS[method](base, finetuned, **params)
