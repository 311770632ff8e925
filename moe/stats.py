"""Routing statistics per MoE layer, as flat ``{name: scalar}`` dicts with stable metric names."""

from __future__ import annotations

import torch

from moe.routing import RoutingResult


@torch.no_grad()
def routing_stats(r: RoutingResult, prefix: str, per_expert: bool = True) -> dict[str, torch.Tensor]:
    """``{prefix}/...`` metrics for one layer's routing of one batch.

    tokens_frac/e{i}: share of the T*k routed slots on expert i.  imbalance_max_mean: max(count)/mean(count).
    imbalance_cv: std(count)/mean(count) (population std).  entropy: mean over tokens of H(router probs), nats.
    """
    counts = r.load.float()  # summed over data-parallel ranks when the router reduces its counts
    mean = counts.mean().clamp_min(1e-9)
    p = r.probs
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    out = {
        f"{prefix}/imbalance_max_mean": counts.max() / mean,
        f"{prefix}/imbalance_cv": counts.std(unbiased=False) / mean,
        f"{prefix}/entropy": entropy,
        f"{prefix}/aux_loss": r.aux_loss.detach(),
        f"{prefix}/z_loss": r.z_loss.detach(),
        f"{prefix}/dead_experts": (counts == 0).sum().float(),
    }
    if r.dropped_fraction is not None:
        out[f"{prefix}/dropped_fraction"] = r.dropped_fraction.detach().float()
    if per_expert:
        frac = counts / counts.sum().clamp_min(1.0)
        out.update({f"{prefix}/tokens_frac/e{i}": f for i, f in enumerate(frac)})
    return out
