"""Router auxiliary losses. All take fp32 router tensors and return a scalar that carries autograd."""

from __future__ import annotations

import torch


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int, mode: str = "switch") -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    probs: ``[T, E]`` router probabilities (softmax over all experts). ids: ``[T, k]`` chosen experts.
    ``P_e`` = mean probability of expert e (differentiable); ``f_e`` = share of routed slots on e (no gradient).
    mode "switch": ``f_e = count_e / (T*k)``, so the loss is 1 at uniform routing, for any k.
    mode "hf":     ``f_e = count_e / T`` (transformers' ``load_balancing_loss_func``), so the loss is k at uniform.
    """
    if mode not in ("switch", "hf"):
        raise ValueError(f"mode={mode!r}: expected 'switch' or 'hf'")
    T, k = ids.shape
    if T == 0:
        return probs.sum() * 0.0
    counts_E = torch.bincount(ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    f_E = counts_E / (T * k if mode == "switch" else T)
    P_E = probs.mean(dim=0)
    return num_experts * torch.dot(f_E, P_E)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` over ``[T, E]`` logits (computed in fp32)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
