"""Token-choice routing: logits ``[T, E]`` -> a typed RoutingResult (weights, ids, counts, losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.losses import load_balancing_loss, router_z_loss


@dataclass(frozen=True)
class RoutingResult:
    """What a router hands to the expert dispatch. Losses carry autograd; nothing is stored in module state.

    weights: ``[T, k]`` fp32 combine weights.  ids: ``[T, k]`` int64 expert ids.  counts: ``[E]`` slots per expert.
    probs: ``[T, E]`` fp32 router distribution (for statistics).  aux_loss, z_loss: fp32 scalars (unscaled).
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k. Returns (probs ``[T, E]``, weights ``[T, k]``, ids ``[T, k]``), all math in fp32.

    With ``renormalize=True`` the k kept weights are divided by their sum, which equals top-k-then-softmax over
    the k kept logits. With ``renormalize=False`` they are the full-softmax probabilities (Switch/GShard style).
    Ties go to the lower expert id (a stable descending sort; ``torch.topk`` leaves tie order unspecified).
    """
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: expected 1 <= k <= num_experts ({E})")
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = sorted_probs[..., :k], order[..., :k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def route(
    logits: torch.Tensor, k: int, score: str = "softmax", renormalize: bool = True, aux_loss_mode: str = "switch"
) -> RoutingResult:
    """Route ``[T, E]`` logits to k experts per token and compute the load-balancing and z losses."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E], got {tuple(logits.shape)}")
    if score != "softmax":
        raise ValueError(f"score={score!r}: only 'softmax' is available")
    E = logits.shape[-1]
    probs, weights, ids = softmax_topk(logits, k, renormalize)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return RoutingResult(
        weights=weights,
        ids=ids,
        counts=counts,
        probs=probs,
        aux_loss=load_balancing_loss(probs, ids, E, mode=aux_loss_mode),
        z_loss=router_z_loss(logits),
    )
