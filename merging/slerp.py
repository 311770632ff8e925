"""SLERP: spherical linear interpolation between two models, tensor by tensor.

One fine-tuned model: between the base (a) and it (b), as mergekit's ``slerp`` (the base plus exactly one other).
Two: between them, a = models[0] and b = models[1], as FusionBench's ``SlerpMergeAlgorithm`` (the base then only
names the tensors). With a and b flattened over the whole tensor:

    cos(Omega) = <a / |a|, b / |b|>  (a norm <= 1e-8 counts as 1), clamped to [-1, 1]
    slerp(t)   = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b
    lerp(t)    = (1 - t) a + t b      when |cos(Omega)| > 0.9995 (colinear or antipodal: sin(Omega) ~ 0)

t = 0 gives a, t = 1 gives b. The norms and the dot product are gathered over the tensor first (fp64), so the
merge streams by rows.
"""

from __future__ import annotations

import math

import torch

from merging.registry import Chunk, Method, Param, Stage, register

DOT_THRESHOLD = 0.9995  # mergekit: above it in |cos|, interpolate linearly
EPS = 1e-8  # mergekit: a norm at most this counts as 1


def _ends(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): (base, model 0) or (model 0, model 1) of this chunk's rows."""
    if chunk.n == 1:
        return chunk.base, chunk.base + chunk.tau[0]
    return chunk.base + chunk.tau[0], chunk.base + chunk.tau[1]


def _moments(chunk: Chunk, stats: dict) -> torch.Tensor:
    """``[|a|^2, |b|^2, <a, b>]`` of this chunk's rows, in fp64."""
    a, b = (x.double() for x in _ends(chunk))
    return torch.stack([a.square().sum(), b.square().sum(), (a * b).sum()])


def coefficients(moments: torch.Tensor, t: float) -> tuple[float, float]:
    """(c_a, c_b) with slerp = c_a a + c_b b, from ``[|a|^2, |b|^2, <a, b>]``."""
    sq_a, sq_b, ab = (float(x) for x in moments)
    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _apply(chunk: Chunk, stats: dict, p: dict):
    ca, cb = coefficients(stats["moments"], p["t"])
    a, b = _ends(chunk)
    return a * ca + b * cb, {}


def _validate(p: dict, n: int) -> None:
    if n not in (1, 2):
        raise ValueError(f"models: slerp interpolates the base and one model, or two models; got {n} models")
    if not math.isfinite(p["t"]):
        raise ValueError(f"t={p['t']}: expected a finite interpolation factor")


register(
    Method(
        name="slerp",
        pretty_name="SLERP",
        reference_url="https://en.wikipedia.org/wiki/Slerp",
        params={"t": Param(0.5, "interpolation factor: 0 = the base (or models[0] of two), 1 = the last model")},
        apply=_apply,
        stages=lambda p: [Stage("moments", "sum", _moments)],
        validate=_validate,
        doc=__doc__,
    )
)
