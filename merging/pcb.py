"""PCB-Merging (Du et al., NeurIPS 2024): parameter competition balancing.

For task vectors tau_i (i = 1..n), per population (the whole model as in the paper code, one tensor, or one row):

1. outlier clamp: A_i = |tau_i| clamped to its order statistics at ranks int(d q) + 1 and int(d (1 - q));
   tau~_i = sign(tau_i) A_i  (q = ``clamp_q``)
2. intra-balancing: exp(n * N(A_i)^2), N = min-max normalization over the population
3. inter-balancing: tanh(tau_i * sum_j tau_j)  (the official top-level and NLP code; raw task vectors)
4. beta_i = intra * inter; drop: beta_i clamped from below at its order statistic int(d (1 - r)) + 1, then min-max
   normalized, so only the top-r fraction keeps a nonzero weight (r = ``ratio``). When that order statistic is
   the maximum, the entries equal to it get weight 1.
5. merged = sum_i w_i beta^_i tau~_i / max(sum_i beta^_i, 1e-12); theta = theta_0 + lam * merged.
   ``weights`` are per-task lambdas (the paper's per-task lambda search sets them).
"""

from __future__ import annotations

import torch

from merging.registry import Chunk, Method, Param, Stage, register
from merging.sparsify import per_model, weights_of


def _clamp_ranks(d: int, q: float) -> list[int]:
    lo = min(int(d * q) + 1, d)
    return [lo, max(int(d * (1 - q)), lo)]


def _drop_ranks(d: int, r: float) -> list[int]:
    return [min(int(d * (1 - r)) + 1, d), d]


def _norm(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def _rows_stats(x: torch.Tensor, ranks_fn, param) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scope: the two order statistics of every row of ``x [N, R, C]`` -> ``[N, R, 1]`` each."""
    lo_k, hi_k = ranks_fn(x.shape[-1], param)
    return x.kthvalue(lo_k, dim=-1, keepdim=True).values, x.kthvalue(hi_k, dim=-1, keepdim=True).values


def _bounds(stats: dict, key: str, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = stats[key].float()
    return per_model(s[:, 0], tau), per_model(s[:, 1], tau)


def _clamped(chunk: Chunk, stats: dict, p: dict):
    tau = chunk.tau
    a = tau.abs()
    lo, hi = _rows_stats(a, _clamp_ranks, p["clamp_q"]) if p["scope"] == "row" else _bounds(stats, "clamp", tau)
    a = torch.minimum(torch.maximum(a, lo), hi)
    return a, lo, hi


def _beta(chunk: Chunk, stats: dict, p: dict):
    a, lo, hi = _clamped(chunk, stats, p)
    n = chunk.n
    intra = torch.exp(n * _norm(a, lo, hi) ** 2)
    inter = torch.tanh(chunk.tau * chunk.tau.sum(0, keepdim=True))
    return intra * inter, torch.sign(chunk.tau) * a


def _apply(chunk: Chunk, stats: dict, p: dict):
    beta, tau_c = _beta(chunk, stats, p)
    q, top = _rows_stats(beta, _drop_ranks, p["ratio"]) if p["scope"] == "row" else _bounds(stats, "beta", beta)
    b = torch.clamp(torch.maximum(beta, q), max=top)
    scale = torch.where(top > q, _norm(b, q, top), (beta >= q).float())
    w = weights_of(p["weights"], chunk.n)
    num = (scale * tau_c * per_model(w, tau_c)).sum(0)
    merged = num / scale.sum(0).clamp_min(1e-12)
    kept = scale * tau_c
    pos, neg = (kept > 0).any(0), (kept < 0).any(0)
    info = {"kept": (scale > 0).flatten(1).sum(1), "conflict": (pos & neg).sum(), "active": (pos | neg).sum()}
    return chunk.base + p["lam"] * merged, info


def _stages(p: dict) -> list[Stage]:
    if p["scope"] == "row":
        return []
    return [
        Stage(
            "clamp", "select", lambda c, s: c.tau.abs().flatten(1), p["scope"], lambda d: _clamp_ranks(d, p["clamp_q"])
        ),
        Stage(
            "beta",
            "select",
            lambda c, s: _beta(c, s, p)[0].flatten(1),
            p["scope"],
            lambda d: _drop_ranks(d, p["ratio"]),
        ),
    ]


def _validate(p: dict, n: int) -> None:
    if not 0.0 < p["ratio"] <= 1.0:
        raise ValueError(f"ratio={p['ratio']}: expected 0 < ratio <= 1")
    if not 0.0 <= p["clamp_q"] < 0.5:
        raise ValueError(f"clamp_q={p['clamp_q']}: expected 0 <= clamp_q < 0.5")


register(
    Method(
        name="pcb",
        pretty_name="PCB-Merging",
        reference_url="https://arxiv.org/abs/2410.02396",
        params={
            "ratio": Param(0.1, "kept fraction r of the balanced scores (pcb-merging.py default pcb_ratio)"),
            "clamp_q": Param(0.01, "outlier clamp quantile q of |tau| (vision and NLP code)"),
            "lam": Param(1.0, "scale of the merged task vector"),
            "weights": Param(None, "per-task lambdas (None = all 1)"),
            "scope": Param(
                "global",
                "population of the statistics: 'global' (whole model, paper), 'tensor', 'row'",
                ("tensor", "row", "global"),
            ),  # fmt: skip
        },
        apply=_apply,
        stages=_stages,
        validate=_validate,
        doc=__doc__,
    )
)
