"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces (Marczak et al., ICML 2025).

Per 2-D matrix, with task vectors tau_t (t = 1..T) and r = min(rows, cols):

Iso-C:   Delta = sum_t tau_t (the sum, not the mean); U S V^T = svd(Delta); delta = mean(S) * U V^T,
         i.e. every singular value of the task-arithmetic matrix is replaced by their mean (a flat spectrum).

Iso-CTS: k = int(r * f) (f = ``common_fraction``), then k = r - round((r - k) / T) * T so the rest splits evenly,
         s = (r - k) / T per task (FusionBench's counts; ``round`` is Python's, half to even);
         the top-k singular triplets of Delta are the common subspace; each task adds the top-s triplets of
         tau_t - U_k U_k^T tau_t (its part outside the common left subspace); the stacked U* [rows, r] and
         V*^T [r, cols] are replaced by their polar factors and delta = mean(all r kept singular values) U* V*^T.

Other tensors (1-D, or more than 2-D) take the mean of the tau_t. theta = theta_0 + lam * delta. The SVDs need the
whole matrix, so a 2-D tensor is merged in one piece (``chunkable`` is False).
"""

from __future__ import annotations

import torch

from merging.registry import Chunk, Method, Param, register
from merging.tsv import polar


def iso_c(tau: torch.Tensor) -> torch.Tensor:
    """Iso-C of task matrices ``tau [T, rows, cols]``."""
    U, S, Vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
    return S.mean() * (U @ Vh)


def cts_sizes(r: int, T: int, fraction: float) -> tuple[int, int]:
    """(common rank k, per-task rank s) with k + T s = r. Where FusionBench's rounding would ask for more task
    directions than r holds (r < T s, only with a small fraction), s is cut to r // T."""
    k = int(r * fraction)
    s = min(round((r - k) / T), r // T)
    return r - s * T, s


def iso_cts(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS of task matrices ``tau [T, rows, cols]``."""
    T, m, n = tau.shape
    r = min(m, n)
    k, s = cts_sizes(r, T, fraction)
    U, S, Vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
    Uk = U[:, :k]
    Ustar, Sstar, Vstar = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
    for t in range(T if s else 0):
        Ut, St, Vht = torch.linalg.svd(tau[t] - Uk @ (Uk.T @ tau[t]), full_matrices=False)
        block = slice(t * s, (t + 1) * s)
        Ustar[:, block], Sstar[block], Vstar[block] = Ut[:, :s], St[:s], Vht[:s]
    Ustar[:, T * s :], Sstar[T * s :], Vstar[T * s :] = Uk, S[:k], Vh[:k]
    return Sstar.mean() * (polar(Ustar) @ polar(Vstar))


def _apply(chunk: Chunk, stats: dict, p: dict, cts: bool):
    tau = chunk.tau
    if len(chunk.shape) != 2:
        return chunk.base + p["lam"] * tau.mean(0), {}
    delta = iso_cts(tau, p["common_fraction"]) if cts else iso_c(tau)
    return chunk.base + p["lam"] * delta, {}


def _validate(p: dict, n: int) -> None:
    if not 0.0 <= p["common_fraction"] <= 1.0:
        raise ValueError(f"common_fraction={p['common_fraction']}: expected 0 <= common_fraction <= 1")


LAM = Param(1.0, "scale of the merged task vector (FusionBench default; the paper tunes it, 1.0-1.9)")
for name, pretty, cts in (("iso_c", "Iso-C (isotropic merging, common subspace)", False),
                          ("iso_cts", "Iso-CTS (isotropic merging, common and task subspaces)", True)):  # fmt: skip
    params = {"lam": LAM}
    if cts:
        params["common_fraction"] = Param(0.8, "share of the rank kept for the common subspace (paper default)")
    register(
        Method(
            name=name,
            pretty_name=pretty,
            reference_url="https://arxiv.org/abs/2502.04959",
            params=params,
            apply=lambda chunk, stats, p, cts=cts: _apply(chunk, stats, p, cts),
            chunkable=lambda p, shape: len(shape) != 2,
            validate=_validate if cts else (lambda p, n: None),
            doc=__doc__,
        )
    )
