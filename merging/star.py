"""STAR (Lee et al., NAACL 2025): spectral truncation and rescale of each task matrix, then average.

Per task t and per matrix M = tau_t (a tensor of ndim >= 3 is a batch of matrices over its last two dims):
SVD M = U diag(s) V^T; keep the smallest k with s_1 + ... + s_k >= eta/100 * sum(s); rescale the kept
s_i by sum(s) / (s_1 + ... + s_k) so the nuclear norm is unchanged; rebuild. Then
theta = theta_0 + lam * sum_t w_t STAR(tau_t) / sum_t w_t  (the paper: w = 1, lam = 1).

1-D tensors (norms, biases) are not matrices: STAR's official code leaves them out of the task vectors, so they
stay at the base (``one_d="base"``); ``one_d="mean"`` averages their task vectors instead.
``svd="randomized"`` replaces the exact SVD by a seeded randomized range finder of rank ``rank`` + 5 (cut to
``rank``), like the official code's ``torch.svd_lowrank`` path but reproducible.

``svd="gram"`` takes the same decomposition from the fp64 Gram matrix on the short side instead, and streams: for
a matrix with r >= c rows, G = M^T M (c x c) is summed over row chunks, its eigenvectors V give the singular values
s_i = sqrt(lambda_i) and the truncation M V_k V_k^T, applied chunk by chunk. Memory is N c^2 fp64 instead of the
N whole task matrices (the 32000 x 1024 embedding: 32 MB instead of 650 MB). A wide matrix (r < c) uses
G = M M^T and U_k U_k^T M, which needs the whole matrix.
"""

from __future__ import annotations

import math

import torch

from merging.registry import Chunk, Method, Param, Stage, register
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
    k, scale = rank_and_scale(S, eta)
    s = S * (torch.arange(S.shape[-1]) < k.unsqueeze(-1)) * scale.unsqueeze(-1)
    return (U * s.unsqueeze(-2)) @ Vh, k


def rank_and_scale(S: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values ``S [..., s]`` (descending) -> (kept rank k, the factor total / kept mass; 0 if no mass)."""
    total = S.sum(-1, keepdim=True)
    k = ((S.cumsum(-1) < eta / 100 * total).sum(-1, keepdim=True) + 1).clamp_max(S.shape[-1])
    kept_mass = (S * (torch.arange(S.shape[-1]) < k)).sum(-1, keepdim=True)
    scale = torch.where(kept_mass > 0, total / torch.where(kept_mass > 0, kept_mass, 1.0), 0.0)
    return k.squeeze(-1), scale.squeeze(-1)


def _tall(shape) -> bool:
    return shape[-2] >= shape[-1]


def _segments(row0: int, rows: int, r: int):
    """(matrix index, first, end) of the chunk rows ``[row0, row0 + rows)`` of a stack of r-row matrices."""
    i = 0
    while i < rows:
        b = (row0 + i) // r
        end = min(rows, (b + 1) * r - row0)
        yield b, i, end
        i = end


def _gram(chunk: Chunk, stats: dict) -> torch.Tensor:
    """``[N, B, s, s]`` fp64 Gram matrices on the short side s of the chunk's task matrices (a tall matrix's
    M^T M summed over its rows in this chunk; a wide matrix, always whole: M M^T)."""
    shape, tau = chunk.shape, chunk.tau
    if len(shape) < 2:  # not a matrix (see one_d)
        return torch.zeros(chunk.n)
    r, c = shape[-2:]
    B = math.prod(shape[:-2])
    if not _tall(shape):
        m = tau.reshape(chunk.n, B, r, c).double()
        return m @ m.mT
    out = torch.zeros(chunk.n, B, c, c, dtype=torch.float64)
    for b, i, end in _segments(chunk.row0, tau.shape[1], r):
        x = tau[:, i:end].double()
        out[:, b] += x.mT @ x
    return out


def _factors(eta: float):
    def finish(gram: torch.Tensor) -> dict:
        """Per model and matrix: ``q [N, B, s, k_max]``, the top-k eigenvectors in fp32 (zero past each k);
        ``qs``, the same times the nuclear-norm rescale; ``k [N, B]``, the kept ranks."""
        if gram.dim() < 4:
            return None
        lam, vec = torch.linalg.eigh(gram)  # ascending
        S = lam.clamp_min(0).sqrt().flip(-1)
        k, scale = rank_and_scale(S, eta)
        kmax = int(k.max())
        keep = (torch.arange(kmax) < k.unsqueeze(-1)).double()  # [N, B, kmax]
        q = vec.flip(-1)[..., :kmax] * keep.unsqueeze(-2)
        return {"q": q.float(), "qs": (q * scale[..., None, None]).float(), "k": k}

    return finish


def _apply_gram(chunk: Chunk, stats: dict, p: dict, w: torch.Tensor):
    f, shape, tau = stats["gram"], chunk.shape, chunk.tau
    r, c = shape[-2:]
    acc = torch.zeros(tau.shape[1:])
    kept = torch.empty(chunk.n)
    for t in range(chunk.n):
        if _tall(shape):  # rows x V_k (s V_k)^T, matrix by matrix
            out = torch.empty(tau.shape[1:])
            for b, i, end in _segments(chunk.row0, tau.shape[1], r):
                out[i:end] = (tau[t, i:end] @ f["q"][t, b]) @ f["qs"][t, b].mT
        else:  # the whole stack: U_k (s U_k)^T M
            m = tau[t].reshape(-1, r, c)
            out = (f["qs"][t] @ (f["q"][t].mT @ m)).reshape(tau.shape[1:])
        kept[t] = torch.sign(out).abs_().sum()
        acc.add_(out, alpha=float(w[t]))
    info = {"kept": kept}
    if chunk.row0 == 0:  # once per tensor
        info["rank_kept"] = f["k"].sum(-1).double()
        info["rank_full"] = torch.full((chunk.n,), float(min(r, c) * math.prod(shape[:-2])))
    return chunk.base + p["lam"] * acc / w.sum(), info


def _apply(chunk: Chunk, stats: dict, p: dict):
    tau, shape = chunk.tau, chunk.shape
    w = weights_of(p["weights"], chunk.n)
    info = {"kept": (tau != 0).flatten(1).sum(1)}
    if len(shape) < 2:
        if p["one_d"] == "base":
            return chunk.base.clone(), {"kept": torch.zeros(chunk.n, dtype=torch.int64)}
        return chunk.base + p["lam"] * (tau * per_model(w, tau)).sum(0) / w.sum(), info
    if p["svd"] == "gram":
        return _apply_gram(chunk, stats, p, w)
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
                "exact",
                "'exact' (torch.linalg.svd), 'randomized' (seeded range finder) or 'gram' (fp64 eigendecomposition of "
                "the short-side Gram matrix; streams tall matrices by rows)",
                ("exact", "randomized", "gram"),
            ),
            "rank": Param(16, "svd='randomized': rank of the approximation"),
            "seed": Param(0, "svd='randomized': seed of the range finder"),
            "one_d": Param(
                "base", "1-D tensors: 'base' (official code) or 'mean' of the task vectors", ("base", "mean")
            ),  # fmt: skip
        },
        apply=_apply,
        stages=lambda p: [Stage("gram", "sum", _gram, finish=_factors(p["eta"]))] if p["svd"] == "gram" else [],
        chunkable=lambda p, shape: p["svd"] == "gram" and (len(shape) < 2 or _tall(shape)),
        random=lambda p: p["svd"] == "randomized",
        validate=_validate,
        doc=__doc__,
    )
)
