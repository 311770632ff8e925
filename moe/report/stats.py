"""Routing statistics as pure functions of counts (used by ``moe.callbacks.RoutingStatsCallback`` and the report).

load_E: routed slots per expert ``[E]`` (summed over data-parallel ranks by the caller). joint_EK: slots of expert e
on tokens of task (or token class) j, ``[E, K]``.
"""

from __future__ import annotations

import torch


def load_summary(load_E: torch.Tensor, top_k: int = 3) -> dict[str, float]:
    """Balance of one layer's load, with a bounded number of keys whatever E is.

    util_min: min load / ideal (ideal = mean load); max_mean: max load / ideal; cv: std / mean (population std);
    dead_frac: share of experts with no slot; eff_experts: exp(H(load / sum)), E when uniform, 1 when collapsed;
    top{j}_expert / top{j}_share and bottom{j}_*: the j-th most / least loaded experts and their share of the slots.
    """
    load = load_E.detach().double().cpu()
    E, total = load.numel(), load.sum()
    mean = total / E
    share = load / total if total > 0 else torch.full_like(load, 1.0 / E)
    nz = share[share > 0]
    out = {
        "util_min": (load.min() / mean).item() if mean > 0 else 0.0,
        "max_mean": (load.max() / mean).item() if mean > 0 else 0.0,
        "cv": (load.std(unbiased=False) / mean).item() if mean > 0 else 0.0,
        "dead_frac": (load == 0).double().mean().item(),
        "eff_experts": torch.exp(-(nz * nz.log()).sum()).item(),
    }
    order = torch.argsort(share, descending=True, stable=True)
    k = min(top_k, E)
    for j in range(k):
        top, bottom = order[j].item(), order[E - 1 - j].item()
        out.update({f"top{j + 1}_expert": float(top), f"top{j + 1}_share": share[top].item(),
                    f"bottom{j + 1}_expert": float(bottom), f"bottom{j + 1}_share": share[bottom].item()})  # fmt: skip
    return out


def mutual_information(joint_EK: torch.Tensor) -> float:
    """``I(expert; task) = sum p(e, t) log(p(e, t) / (p(e) p(t)))`` in nats from a count matrix ``[E, K]``.

    0 when routing ignores the task; ``H(task)`` when each task has experts of its own.
    """
    p = joint_EK.detach().double().cpu()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pe, pt = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return (p[nz] * (p[nz] / (pe * pt).expand_as(p)[nz]).log()).sum().item()


def mean_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the router distribution's entropy (nats); divide by the token count for the mean."""
    p = probs_TE.detach().float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum()
