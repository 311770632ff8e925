"""Model Stock (Jang et al., ECCV 2024): interpolate between the base and the average of N >= 2 fine-tuned models,
with a per-layer ratio from the angle between their task vectors.

Per tensor (or per row of the last dim with ``filter_wise``), with tau_i = theta_i - theta_0:

    cos = mean over pairs i < j of <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), each clamped to [-1, 1]
    t   = N cos / (1 + (N - 1) cos)      (0 where |1 + (N - 1) cos| < 1e-6)
    theta = t * mean_i theta_i + (1 - t) * theta_0 = theta_0 + t * mean_i tau_i

The paper's t = 2 cos / (1 + cos) for N = 2, and its N-model form; the pair average and the guards are mergekit's
``model_stock``. The pairwise dot products are a Gram matrix gathered over the tensor, so the merge streams by rows.
"""

from __future__ import annotations

import torch

from merging.registry import Chunk, Method, Param, Stage, register


def _gram(chunk: Chunk, stats: dict) -> torch.Tensor:
    """``[N, N]`` fp64 Gram matrix of this chunk's task vectors."""
    x = chunk.tau.flatten(1).double()
    return x @ x.T


def ratio(gram: torch.Tensor) -> torch.Tensor:
    """Model Stock's t from Gram matrices ``[..., N, N]`` -> ``[...]``."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    cos = (gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp_min(1e-6)).clamp(-1, 1).mean(-1)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))


def _apply(chunk: Chunk, stats: dict, p: dict):
    tau = chunk.tau
    if p["filter_wise"]:  # one ratio per row: its Gram matrix [R, N, N]
        x = tau.double().permute(1, 0, 2)
        t = ratio(x @ x.mT).float().unsqueeze(-1)  # [R, 1]
    else:
        t = ratio(stats["gram"]).float()
    return chunk.base + t * tau.mean(0), {}


def _validate(p: dict, n: int) -> None:
    if n < 2:
        raise ValueError(f"models: model_stock needs at least 2 fine-tuned models (the angle between them), got {n}")


register(
    Method(
        name="model_stock",
        pretty_name="Model Stock",
        reference_url="https://arxiv.org/abs/2403.19522",
        params={"filter_wise": Param(False, "one ratio per row (last dim) instead of per tensor (mergekit option)",
                                     (False, True))},  # fmt: skip
        apply=_apply,
        stages=lambda p: [] if p["filter_wise"] else [Stage("gram", "sum", _gram)],
        validate=_validate,
        doc=__doc__,
    )
)
