"""STAR (Lee et al., NAACL 2025): spectral truncation and rescale of each task matrix, then average.

Per task t and per matrix M = tau_t (a tensor of ndim >= 3 is a batch of matrices over its last two dims):
SVD M = U diag(s) V^T; keep the smallest k with s_1 + ... + s_k >= eta/100 * sum(s); rescale the kept
s_i by sum(s) / (s_1 + ... + s_k) so the nuclear norm is unchanged; rebuild. Then
theta = theta_0 + lam * sum_t w_t STAR(tau_t) / sum_t w_t  (the paper: w = 1, lam = 1).

1-D tensors (norms, biases) are not matrices: STAR's official code leaves them out of the task vectors, so they
stay at the base (``one_d="base"``); ``one_d="mean"`` averages their task vectors instead.
``svd="randomized"`` replaces the exact SVD by a seeded randomized range finder of rank ``rank`` + 5 (cut to
``rank``), like the official code's ``torch.svd_lowrank`` path but reproducible.
"""

from __future__ import annotations

import torch

from merging.registry import Chunk, Method, Param, register
from merging.sparsify import per_model, weights_of


def randomized_svd(m: torch.Tensor, q: int, gen: torch.Generator, niter: int = 2):
    """Approximate top-q SVD of a batch of matrices ``[B, r, c]`` (Halko et al. 2011), seeded by ``gen``."""
    omega = torch.randn(m.shape[0], m.shape[-1], q, generator=gen)
    Q = torch.linalg.qr(m @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(m @ torch.linalg.qr(m.mT @ Q).Q).Q
    U, S, Vh = torch.linalg.svd(Q.mT @ m, full_matrices=False)
    return Q @ U, S, Vh


def truncate(m: torch.Tensor, eta: float, svd: str = "exact", rank: int = 16, gen: torch.Generator | None = None):
    """STAR's truncate-and-rescale of a batch of matrices ``[B, r, c]``; returns (matrices, kept ranks [B])."""
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    else:
        q = min(rank + 5, *m.shape[-2:])
        U, S, Vh = randomized_svd(m, q, gen)
        U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    total = S.sum(-1, keepdim=True)
    k = ((S.cumsum(-1) < eta / 100 * total).sum(-1, keepdim=True) + 1).clamp_max(S.shape[-1])  # [B, 1]
    keep = torch.arange(S.shape[-1]) < k
    kept_mass = (S * keep).sum(-1, keepdim=True)
    s = torch.where(kept_mass > 0, S * keep * total / torch.where(kept_mass > 0, kept_mass, 1.0), torch.zeros_like(S))
    return (U * s.unsqueeze(-2)) @ Vh, k.squeeze(-1)


def _apply(chunk: Chunk, stats: dict, p: dict):
    tau, shape = chunk.tau, chunk.shape
    w = weights_of(p["weights"], chunk.n)
    info = {"kept": (tau != 0).flatten(1).sum(1)}
    if len(shape) < 2:
        if p["one_d"] == "base":
            return chunk.base.clone(), {"kept": torch.zeros(chunk.n, dtype=torch.int64)}
        return chunk.base + p["lam"] * (tau * per_model(w, tau)).sum(0) / w.sum(), info
    mats = tau.reshape(chunk.n, -1, shape[-2], shape[-1])
    acc, kept, ranks = torch.zeros(mats.shape[1:]), torch.empty(chunk.n), []
    for t in range(chunk.n):  # one truncated task matrix at a time: the sum is all that is kept
        gen = chunk.gens[t].torch if chunk.gens else None
        m, k = truncate(mats[t], p["eta"], p["svd"], p["rank"], gen)
        acc.add_(m * w[t])
        kept[t] = torch.sign(m).abs_().sum()
        ranks.append(k.sum())
        del m
    merged = acc.reshape(tau.shape[1:]) / w.sum()
    full = min(shape[-2:]) * mats.shape[1]
    info = {
        "kept": kept,
        "rank_kept": torch.stack(ranks),
        "rank_full": torch.tensor([full] * chunk.n),
    }
    return chunk.base + p["lam"] * merged, info


def _validate(p: dict, n: int) -> None:
    if not 0.0 < p["eta"] <= 100.0:
        raise ValueError(f"eta={p['eta']}: expected 0 < eta <= 100 (percent of the nuclear norm)")
    if p["rank"] < 1:
        raise ValueError(f"rank={p['rank']}: expected >= 1")
    if p["weights"] is not None and sum(p["weights"]) == 0:
        raise ValueError("weights: must not sum to 0 for STAR's average")


register(
    Method(
        name="star",
        pretty_name="STAR (spectral truncation and rescale)",
        reference_url="https://arxiv.org/abs/2502.10339",
        params={
            "eta": Param(40.0, "percent of the nuclear norm the kept singular values must reach (official default)"),
            "lam": Param(1.0, "scale of the averaged task vector (the paper: 1)"),
            "weights": Param(None, "averaging weights (None = equal)"),
            "svd": Param(
                "exact", "'exact' (torch.linalg.svd) or 'randomized' (seeded range finder)", ("exact", "randomized")
            ),  # fmt: skip
            "rank": Param(16, "svd='randomized': rank of the approximation"),
            "seed": Param(0, "svd='randomized': seed of the range finder"),
            "one_d": Param(
                "base", "1-D tensors: 'base' (official code) or 'mean' of the task vectors", ("base", "mean")
            ),  # fmt: skip
        },
        apply=_apply,
        chunkable=lambda p: False,
        random=lambda p: p["svd"] == "randomized",
        validate=_validate,
        doc=__doc__,
    )
)
