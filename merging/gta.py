"""Generalized task arithmetic: drop (DARE / DELLA / Breadcrumbs) -> trim (TIES) -> combine (sum, or elect +
disjoint mean).

``gta_method`` registers one configuration; ``merging/methods.py`` holds the configurations. Every step is a
row-local or elementwise operation given its population statistics (Stages), so a tensor can be merged in row
chunks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from merging.registry import DEFERRED, Chunk, Method, Stage, register
from merging.sparsify import (
    bernoulli_keep,
    disjoint_mean,
    elect_sign,
    fill_zero_signs,
    keep_rank,
    magprune_keep_prob,
    outlier_ranks,
    per_model,
    trim_by,
    trim_rows,
    weights_of,
)

RANDOM_DROPS = ("dare", "della")  # drops that draw from the model's random stream


def info_of(tau_hat: torch.Tensor, low: torch.Tensor | None = None, signs: torch.Tensor | None = None) -> dict:
    """Per chunk: kept (nonzero) entries per model; entries where kept entries of both signs meet (conflict);
    entries with any kept entry (active). Counted as sums of 0/1 floats (the fast reductions on the CPU).
    ``low``: ``min(0, tau_hat.amin(0))`` and ``signs``: ``torch.sign(tau_hat)``, when the caller has them."""
    pos = tau_hat.amax(0).clamp_min_(0)  # > 0 where some model's entry is positive
    neg = (tau_hat.amin(0).clamp_max_(0) if low is None else low).neg()  # > 0 where some entry is negative
    return {
        "kept": (torch.sign(tau_hat) if signs is None else signs).flatten(1).abs().sum(1).double(),
        "conflict": torch.minimum(pos, neg).sign_().sum().double(),
        "active": pos.add_(neg).sign_().sum().double(),
    }


def weighted(tau: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return tau if bool((w == 1).all()) else tau * per_model(w, tau)


def _dropped(chunk: Chunk, stats: dict, p: dict, drop: str | None) -> torch.Tensor:
    """tau after the drop step (DARE / DELLA) with its rescale; tau itself when there is none."""
    tau = chunk.tau
    if drop is None:
        return tau
    if drop == "breadcrumbs":
        return _crumbs(chunk, stats, p)
    R, C = tau.shape[1:]
    if drop == "dare":
        keep_prob = 1.0 - p["drop"]
        if keep_prob >= 1.0:
            return tau
    elif p["scope"] == "tensor":  # this chunk's rows of the probabilities ranked over the whole tensor
        keep_prob = stats["keep"][:, chunk.row0 * C : (chunk.row0 + R) * C].view(-1, R, C)
    else:
        keep_prob = magprune_keep_prob(tau.abs(), p["density"], p["epsilon"])
    mask = bernoulli_keep((R, C), keep_prob, chunk.gens)
    if p["rescale"] == "inverse":
        if torch.is_tensor(keep_prob):
            return mask.mul_(tau).div_(keep_prob)
        return torch.addcmul(torch.zeros(()), mask, tau, value=1.0 / keep_prob)  # one pass: tau / p where kept
    kept = mask.mul_(tau)
    if p["rescale"] == "l1" and "l1" in stats:
        full, part = stats["l1"][:, 0], stats["l1"][:, 1]
        ok = (full > 1e-7) & (part > 1e-7)
        scale = torch.where(ok, full / torch.where(ok, part, torch.ones_like(part)), torch.ones_like(full))
        return kept * per_model(scale.float(), kept)
    return kept


def _crumbs(chunk: Chunk, stats: dict, p: dict) -> torch.Tensor:
    """Breadcrumbs: each tau_t keeps the magnitudes ranked within ``outlier_ranks`` of its tensor (or of each row);
    entries tied with a bound stay."""
    tau = chunk.tau
    if p["scope"] == "row":
        ranks = outlier_ranks(tau.shape[-1], p["density"], p["gamma"])
        if ranks is None:
            return torch.zeros_like(tau)
        mag = tau.abs()
        lo, hi = (mag.kthvalue(r, dim=-1, keepdim=True).values for r in ranks)
    else:
        if outlier_ranks(math.prod(chunk.shape), p["density"], p["gamma"]) is None:
            return torch.zeros_like(tau)
        lo, hi = (per_model(stats["crumbs"][:, i].float(), tau) for i in (0, 1))
        mag = tau.abs()
    return tau * ((mag >= lo) & (mag <= hi))


def _trimmed(tau: torch.Tensor, stats: dict, p: dict) -> torch.Tensor:
    if p.get("density", 1.0) >= 1.0 or "trim_scope" not in p:
        return tau
    if p["trim_scope"] == "row":
        return trim_rows(tau, p["density"], p["trim_rule"])
    return trim_by(tau, stats["trim"][:, 0])


def _sparsified(chunk: Chunk, stats: dict, p: dict, spec: dict) -> torch.Tensor:
    return _trimmed(_dropped(chunk, stats, p, spec["drop"]), stats, p)


def _electorate(tau_hat: torch.Tensor, w: torch.Tensor, p: dict) -> torch.Tensor:
    return weighted(tau_hat, w) if p.get("weighted_sign", True) else tau_hat


def _gta_stages(spec: dict):
    def stages(p: dict) -> list[Stage]:
        out = []
        drop = spec["drop"]
        if drop == "breadcrumbs" and p["scope"] == "tensor":
            ranks = lambda d: list(outlier_ranks(d, p["density"], p["gamma"]) or (1, 1))  # noqa: E731
            out.append(Stage("crumbs", "select", lambda c, s: c.tau.abs().flatten(1), ranks=ranks))
        if drop == "della" and p["scope"] == "tensor":  # every entry's magnitude, then ranks over the tensor
            finish = lambda mag: magprune_keep_prob(mag, p["density"], p["epsilon"], out=mag)  # noqa: E731
            out.append(Stage("keep", "gather", lambda c, s: c.tau.abs().flatten(1), finish=finish))
        if drop in RANDOM_DROPS and p.get("rescale") == "l1":

            def l1(chunk, stats):
                kept = _dropped(chunk, stats, {**p, "rescale": "none"}, drop)
                return torch.stack(
                    [
                        chunk.tau.abs().flatten(1).sum(1, dtype=torch.float64),
                        kept.abs().flatten(1).sum(1, dtype=torch.float64),
                    ],
                    1,
                )

            out.append(Stage("l1", "sum", l1, level="tensor", random=True))
        trims = p.get("density", 1.0) < 1.0 and "trim_scope" in p
        if trims and p["trim_scope"] != "row":
            out.append(
                Stage(
                    "trim",
                    "select",
                    lambda c, s: _dropped(c, s, p, drop).abs().flatten(1),
                    level=p["trim_scope"],
                    ranks=lambda d: [keep_rank(d, p["density"], p["trim_rule"])],
                    random=drop in RANDOM_DROPS,
                )
            )
        if spec["majority"] and p["combine"] == "ties" and not (trims and p["trim_scope"] == "row"):

            def votes(chunk, stats):
                tau_hat = _sparsified(chunk, stats, p, spec)
                w = weights_of(p.get("weights"), chunk.n)
                return elect_sign(_electorate(tau_hat, w, p), p["sign"], majority=0.0).sum()

            level = p["trim_scope"] if trims else "tensor"
            out.append(Stage("votes", "sum", votes, level=level, random=drop in RANDOM_DROPS, inline=True,
                             deferrable=level == "tensor"))  # fmt: skip
        return out

    return stages


def _gta_apply(spec: dict):
    def apply(chunk: Chunk, stats: dict, p: dict):
        w = weights_of(p.get("weights"), chunk.n)
        tau_hat = _sparsified(chunk, stats, p, spec)
        if p["combine"] == "ties":
            raw = elect_sign(_electorate(tau_hat, w, p), p["sign"], majority=0.0)  # 0 where the vote ties
            deferred, low = None, None
            if not spec["majority"]:
                majority = 1.0
            elif stats.get(DEFERRED) and "votes" not in stats:  # +1 now; the flipped values for the caller
                majority = 1.0
                low = tau_hat.amin(0).clamp_max_(0)
                tie = raw.abs().neg_().add_(1).mul_(low)  # != 0: the vote is 0 with entries of both signs
                flip = torch.from_numpy(np.flatnonzero(tie.numpy().reshape(-1) != 0))  # 4x torch's nonzero
                alt = tau_hat.flatten(1)[:, flip]
                alt = chunk.base.flatten()[flip] + p["lam"] * disjoint_mean(alt, -torch.ones(flip.numel()), w,
                                                                            p.get("divisor", "weights"))  # fmt: skip
                deferred = (raw.sum(), flip, alt)
            elif "votes" in stats:
                majority = 1.0 if stats["votes"] >= 0 else -1.0
            else:  # this chunk is the whole population (inline), or row scope: the majority of each row
                row_scope = p.get("density", 1.0) < 1.0 and p.get("trim_scope") == "row"
                total = raw.sum(-1, keepdim=True) if row_scope else raw.sum()
                majority = torch.where(total >= 0, 1.0, -1.0)
            gamma = fill_zero_signs(raw, majority)
            signs = torch.sign(tau_hat)
            merged = disjoint_mean(tau_hat, gamma, w, p.get("divisor", "weights"), signs)
        else:
            merged, deferred, low, signs = weighted(tau_hat, w).sum(0), None, None, None
        info = info_of(tau_hat, low, signs)
        if deferred is not None:
            info[DEFERRED] = deferred
        return chunk.base + p["lam"] * merged, info

    return apply


def gta_method(name, pretty, url, params, prepare, drop=None, majority=True, validate=None, chunkable=None, doc=""):
    """Register a generalized-task-arithmetic method. ``prepare(p)`` adds the settings the method fixes itself
    (``combine``; ``trim_scope`` and ``trim_rule``, present only for methods that trim by magnitude: see
    ``sparsify.keep_rank``)."""
    spec = {"drop": drop, "majority": majority}
    full = prepare

    stages = _gta_stages(spec)
    apply = _gta_apply(spec)
    return register(
        Method(
            name=name,
            pretty_name=pretty,
            reference_url=url,
            params=params,
            apply=lambda chunk, stats, p: apply(chunk, stats, full(p)),
            stages=lambda p: stages(full(p)),
            random=lambda p: drop in RANDOM_DROPS,
            validate=lambda p, n: validate(full(p)) if validate else None,
            chunkable=(lambda p, shape: chunkable(full(p), shape)) if chunkable else (lambda p, shape: True),
            doc=doc,
        )
    )
