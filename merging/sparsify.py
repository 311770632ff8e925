"""Sparsifiers and sign consensus over a stack of task vectors ``tau [N, R, C]`` (N models, rows of one tensor).

Magnitude trim (TIES), Bernoulli drop (DARE), rank-based MagPrune (DELLA), sign election and the disjoint mean.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def weights_of(weights, n: int) -> torch.Tensor:
    """``[N]`` model weights (all 1 when None)."""
    return torch.ones(n) if weights is None else torch.tensor([float(w) for w in weights])


def per_model(w_N: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``[N]`` to broadcast against ``[N, ...]``."""
    return w_N.reshape(-1, *([1] * (like.dim() - 1)))


TRIM_RULES = ("floor", "mergelm")


def keep_rank(count: int, density: float, rule: str = "floor") -> int:
    """1-based ascending rank of the smallest magnitude a top-``density`` trim keeps (entries >= it stay), counted as
    each reference code counts:

    - "floor" keeps the top ``k = max(1, int(density * count))``: PEFT ``magnitude_based_pruning``
      (``k = int(density * tensor.numel())``, ``torch.topk``) and mergekit 0.1.5 ``sparsify.magnitude``
      (``k = max(1, int(density * tensor.numel()))``; PEFT keeps none where ``int`` gives 0). The TIES code keeps one
      entry more: its threshold is the ``(d - int(d * K))``-th smallest (``topk_values_mask``), which at the paper's
      scope is one entry of the whole model.
    - "mergelm" is MergeLM's trim after DARE (``mask_smallest_magnitude_param_values``): the threshold is the
      ``int(d * mask_rate)``-th smallest with ``mask_rate = 1 - density``, so ``d - int(d * (1 - density)) + 1``
      entries stay.
    """
    if rule == "mergelm":
        rank = int(count * (1 - density))
    elif rule == "floor":
        rank = count - max(1, int(density * count)) + 1
    else:
        raise ValueError(f"rule={rule!r}: expected one of {list(TRIM_RULES)}")
    return min(max(rank, 1), count)


def trim_topk(tau: torch.Tensor, density: float, rule: str = "floor") -> torch.Tensor:
    """Keep, per task vector (dim 0, flattened), the magnitudes at or above its ``keep_rank`` threshold; zero the
    rest. Entries tied with the threshold magnitude are all kept."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density}: expected 0 < density <= 1")
    flat = tau.reshape(tau.shape[0], -1)
    if density == 1.0:
        return tau.clone()
    thresh = flat.abs().kthvalue(keep_rank(flat.shape[1], density, rule), dim=1, keepdim=True).values
    return (flat * (flat.abs() >= thresh)).reshape(tau.shape)


def trim_rows(tau: torch.Tensor, density: float, rule: str = "floor") -> torch.Tensor:
    """``trim_topk`` applied to every row (last dim) of ``tau [N, R, C]`` separately."""
    if density == 1.0:
        return tau
    C = tau.shape[-1]
    thresh = tau.abs().kthvalue(keep_rank(C, density, rule), dim=-1, keepdim=True).values
    return tau * (tau.abs() >= thresh)


def outlier_ranks(count: int, density: float, gamma: float) -> tuple[int, int] | None:
    """Breadcrumbs: 1-based ascending ranks ``(lo, hi)`` of the magnitudes kept, ``lo <= rank <= hi``; None when
    nothing is kept. As mergekit's ``magnitude_outliers`` counts: keep ``k = int(density * n)``, drop the top
    ``int(gamma * n)`` and the bottom ``max(0, n - k - top)`` (fewer top entries go when the two overlap). The
    official code (``TaskVectorMiddleKeep``) drops the top ``int(gamma * n)``, then keeps the top ``int(beta * n)``
    of the rest: the same ranks whenever density + gamma <= 1."""
    k = int(density * count)
    if k == 0:
        return None
    bottom = max(0, count - k - int(gamma * count))
    return bottom + 1, bottom + k


def below(value: float) -> float:
    """The largest fp32 value below ``value``: ``|x| > below(t)`` is ``|x| >= t`` for fp32 x."""
    t = torch.tensor(value, dtype=torch.float32)
    return torch.nextafter(t, torch.tensor(-float("inf"))).item()


def trim_by(tau: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Zero the entries of each ``tau[t]`` whose magnitude is below ``thresh[t]`` (entries equal to it stay)."""
    out = torch.empty_like(tau)
    for t in range(tau.shape[0]):
        thr = float(thresh[t])
        if thr <= 0:
            out[t].copy_(tau[t])
        else:
            out[t].copy_(F.hardshrink(tau[t], below(thr)))
    return out


def elect_sign(tau: torch.Tensor, sign: str = "total", majority: torch.Tensor | float | None = None) -> torch.Tensor:
    """Elected sign per entry: ``sign(sum_t tau_t)`` ("total", by mass) or ``sign(sum_t sign(tau_t))``
    ("frequency", by vote count). Entries whose sum is 0 take ``majority`` (default: the sign of the sum of the
    elected signs over ``tau``, +1 on a tie), as the TIES reference code does.
    """
    s = tau.sum(0) if sign == "total" else torch.sign(tau).sum(0)
    gamma = torch.sign(s)
    if majority is None:
        majority = 1.0 if gamma.sum() >= 0 else -1.0
    return fill_zero_signs(gamma, majority)


def fill_zero_signs(gamma: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """``gamma`` (entries -1, 0, 1) with its zeros replaced by ``value`` (float arithmetic: on the CPU a bool-mask
    ``where`` / ``masked_fill`` costs several times more)."""
    if not torch.is_tensor(value) and value == 0:
        return gamma
    return gamma.abs().neg_().add_(1).mul_(value).add_(gamma)


def disjoint_mean(
    tau: torch.Tensor,
    sign: torch.Tensor,
    w_N: torch.Tensor | None = None,
    divisor="weights",
    signs: torch.Tensor | None = None,
):
    """``sum_t w_t tau_t [sign(tau_t) = sign] / sum_t d_t [sign(tau_t) = sign]`` (0/0 -> 0); zeros never agree.

    ``d_t = w_t`` (divisor "weights": the weighted mean; the TIES mean when all w_t = 1) or 1 ("count", PEFT).
    ``signs``: ``torch.sign(tau)`` when the caller has it.
    """
    agree = (torch.sign(tau) if signs is None else signs).mul(sign.unsqueeze(0)).relu_()  # 1 where it agrees
    if w_N is not None and not bool((w_N == 1).all()):
        wb = per_model(w_N, tau)
        num = (tau * agree).mul_(wb).sum(0)
        den = (agree * wb).sum(0) if divisor == "weights" else agree.sum(0)
    else:
        num, den = (tau * agree).sum(0), agree.sum(0)
    return num / den.abs().sign_().neg_().add_(1).add_(den)  # den = 0 (then num = 0) -> 1


def bernoulli_keep(shape, keep_prob, gens) -> torch.Tensor:
    """``[N, R, C]`` float keep mask (0 or 1) for ``shape = (R, C)``: model t draws uniform int32 r from ``gens[t]``
    (a ``registry.Stream``) and keeps where ``float(r) < T``, ``T = -2^31 + keep_prob * 2^32`` in fp32 (probability
    keep_prob to about 2^-24; keep_prob: float or ``[N, R, C]``). The N streams are drawn on up to two threads.
    The mask is built with float arithmetic: bool masks and ``where`` cost several times more on the CPU. A float
    keep_prob gives an integer-valued T, so ``T - float(r)`` is 0 or below where dropped and 1 or above where
    kept, and one clamp makes the mask."""
    R, C = shape
    out = torch.empty(len(gens), R, C)
    if torch.is_tensor(keep_prob):
        threshold = None
        draw = lambda t: out[t].copy_(gens[t].int32(R, C))  # noqa: E731
    else:
        threshold = torch.tensor(float(math.floor(keep_prob * _TWO32 - _TWO31)))  # integer-valued in fp32 too
        draw = lambda t: torch.sub(threshold, out[t].copy_(gens[t].int32(R, C)), out=out[t]).clamp_(0, 1)  # noqa: E731
    if len(gens) > 1 and R * C >= 1 << 16 and torch.get_num_threads() > 1:
        list(_pool().map(draw, range(len(gens))))
    else:
        for t in range(len(gens)):
            draw(t)
    if threshold is not None:
        return out
    torch.sub(keep_prob * _TWO32 - _TWO31, out, out=out)
    return out.sign_().clamp_min_(0)  # 1 where float(r) < threshold


_TWO31, _TWO32 = float(1 << 31), float(1 << 32)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="merging-rng")


def magprune_keep_prob(mag: torch.Tensor, density: float, epsilon: float, out: torch.Tensor | None = None):
    """DELLA MagPrune keep probabilities of magnitudes ``mag [N, ..., m]``, ranked ascending along the last dim
    (a row, or a whole tensor flattened); normalized rank r in [0, 1]; ``p_keep = density - epsilon + 2 epsilon r``.
    A single-entry population gets r = 1/2 (p_keep = density). Equal magnitudes are ranked by position.
    ``out`` may be ``mag`` itself (each model's magnitudes are read before its probabilities are written)."""
    m = mag.shape[-1]
    out = torch.empty(mag.shape) if out is None else out
    for t in range(mag.shape[0]):  # one model at a time: the int64 sort keys of a whole tensor are large
        order = rank_order(mag[t])
        for i in range(0, m, 1 << 20):  # ranks [i, j): their keep probabilities, scattered to their entries
            j = min(m, i + (1 << 20))
            r = torch.arange(i, j, dtype=torch.float32).div_(m - 1) if m > 1 else torch.full((1,), 0.5)
            p_rank = r.mul_(2 * epsilon).add_(density - epsilon)
            out[t].scatter_(-1, order[..., i:j], p_rank.expand_as(order[..., i:j]))
        del order  # before the next model's keys are allocated
    return out


def rank_order(mag: torch.Tensor) -> torch.Tensor:
    """``mag.argsort(dim=-1, stable=True)`` for fp32 ``mag >= 0``, 3-4x faster on the CPU: each entry's fp32 bits
    (ordered like the values) above its position make a unique int64 key, numpy sorts the keys in place (a SIMD
    sort, without the GIL), and the low bits of the sorted keys are the order."""
    m = mag.shape[-1]
    bits = max(1, (m - 1).bit_length())
    if bits > 32:
        raise ValueError(f"rank_order: rows of {m} entries; at most 2^32 are supported")
    key, mag_bits = torch.empty(mag.shape, dtype=torch.int64), mag.contiguous().view(torch.int32)
    for i in range(0, m, 1 << 20):  # in blocks along the row: no whole-row temporaries besides the keys
        j = min(m, i + (1 << 20))
        key[..., i:j].copy_(mag_bits[..., i:j]).bitwise_left_shift_(bits).bitwise_or_(torch.arange(i, j))
    key.numpy().sort(axis=-1)
    return key.bitwise_and_((1 << bits) - 1)
