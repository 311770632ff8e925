"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., CVPR 2025).

For each 2-D matrix, with T task vectors (each scaled by its weight w_t first) and r = min(rows, cols):

1. k = int(r * (1 / T)) (the official code's and FusionBench's count); each task's SVD U_t S_t V_t^T gives its top-k
   triplets, placed in block t of U^ [rows, r], s^ [r] and V^^T [r, cols] (slots past T k stay zero);
2. U^ and V^^T are replaced by their polar factors (the nearest orthogonal matrices: P Q^T from svd(X) = P S Q^T),
   which removes the interference between the tasks' singular vectors;
3. delta = U_perp diag(s^) V_perp^T, with the tasks' own singular values.

Every other tensor (1-D, or more than 2-D) takes the mean of the w_t tau_t. theta = theta_0 + lam * delta.
When r < T, k = 0 and the matrix keeps the base (as the reference code). The SVDs need the whole matrix, so a 2-D
tensor is merged in one piece (``chunkable`` is False), like STAR's exact SVD.
"""

from __future__ import annotations

import torch

from merging.registry import Chunk, Method, Param, register
from merging.sparsify import per_model, weights_of


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of ``x = P S Q^T`` (reduced SVD)."""
    P, _, Qh = torch.linalg.svd(x, full_matrices=False)
    return P @ Qh


def tsv_merge(tau: torch.Tensor) -> tuple[torch.Tensor, int]:
    """TSV-M of task matrices ``tau [T, rows, cols]``; returns (delta, k per task)."""
    T, m, n = tau.shape
    r = min(m, n)
    k = int(r * (1 / T))
    U, s, Vh = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
    for t in range(T):
        if k == 0:
            break
        Ut, St, Vht = torch.linalg.svd(tau[t], full_matrices=False)
        U[:, t * k : (t + 1) * k], s[t * k : (t + 1) * k], Vh[t * k : (t + 1) * k] = Ut[:, :k], St[:k], Vht[:k]
    return (polar(U) * s) @ polar(Vh), k


def _apply(chunk: Chunk, stats: dict, p: dict):
    w = weights_of(p["weights"], chunk.n)
    tau = chunk.tau * per_model(w, chunk.tau)
    if len(chunk.shape) != 2:
        return chunk.base + p["lam"] * tau.mean(0), {}
    delta, k = tsv_merge(tau)
    r = min(chunk.shape)
    info = {"rank_kept": torch.full((chunk.n,), float(k)), "rank_full": torch.full((chunk.n,), float(r))}
    return chunk.base + p["lam"] * delta, info


register(
    Method(
        name="tsv_m",
        pretty_name="TSV-M (task singular vectors merge)",
        reference_url="https://arxiv.org/abs/2412.00081",
        params={
            "lam": Param(1.0, "scale of the merged task vector (FusionBench alpha default; the paper tunes it)"),
            "weights": Param(None, "per-task scales applied to tau_t before the SVDs (FusionBench's alpha list)"),
        },
        apply=_apply,
        chunkable=lambda p, shape: len(shape) != 2,
        doc=__doc__,
    )
)
