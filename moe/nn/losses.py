"""Router auxiliary losses. All take fp32 router tensors and return a scalar that carries autograd."""

from __future__ import annotations

import torch

AUX_MODES = ("switch", "hf", "sequence")


def load_balancing_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    mode: str = "switch",
    seq_len: int | None = None,
    counts_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    probs: ``[T, E]`` router probabilities (a distribution over experts). ids: ``[T, k]`` chosen experts.
    ``P_e`` = mean probability of expert e (differentiable); ``f_e`` = share of routed slots on e (no gradient).

    - "switch": ``f_e = count_e / (T*k)``, so the loss is 1 at uniform routing, for any k.
    - "hf": ``f_e = count_e / T`` (transformers' ``load_balancing_loss_func``), so the loss is k at uniform.
    - "sequence": the "switch" loss computed within each sequence of ``seq_len`` tokens, averaged over sequences
      (DeepSeek-V2/V3 sequence-wise balance); 1 when every sequence is balanced.

    counts_E: the slot counts summed over the data-parallel group (global-batch balance, as Megatron's
    ``global_aux_loss``); ``f_e`` then comes from them (``count_e / sum(counts) * (1 or k)``) while ``P_e`` stays
    local, so the mean of the ranks' gradients is the gradient of the one-process loss on the whole batch.
    Ignored by "sequence", which is local by definition.
    """
    if mode not in AUX_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {AUX_MODES}")
    T, k = ids.shape
    if T == 0:
        return probs.sum() * 0.0
    if mode == "sequence":
        if not seq_len or T % seq_len:
            raise ValueError(f"seq_len={seq_len}: mode 'sequence' needs a sequence length dividing T={T}")
        B = T // seq_len
        counts_BE = torch.zeros(B, num_experts, device=ids.device, dtype=probs.dtype)
        counts_BE.scatter_add_(
            1, ids.reshape(B, seq_len * k), torch.ones(B, seq_len * k, dtype=probs.dtype, device=ids.device)
        )
        f_BE = counts_BE / (seq_len * k)
        P_BE = probs.reshape(B, seq_len, num_experts).mean(1)
        return num_experts * (f_BE * P_BE).sum(-1).mean()
    local_E = counts_E if counts_E is not None else torch.bincount(ids.reshape(-1), minlength=num_experts)
    return balance_loss(probs.sum(dim=0), local_E, T, k, mode, counts_E)


def balance_loss(
    prob_sums_E: torch.Tensor,
    counts_E: torch.Tensor,
    num_tokens: int,
    k: int,
    mode: str = "switch",
    global_counts_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """``load_balancing_loss`` ("switch" or "hf") from the column sums alone: ``E * sum_e f_e * prob_sums_e / T``.

    prob_sums_E: ``sum_t probs[t, e]`` (differentiable; what ``moe.kernels.fused_router`` returns). counts_E: this
    rank's slots per expert (no gradient). ``f_e`` as in ``load_balancing_loss``, from ``global_counts_E`` when
    given. Needs no ``[T, E]`` tensor.
    """
    if mode not in ("switch", "hf"):
        raise ValueError(f"mode={mode!r}: the loss from column sums covers 'switch' and 'hf'")
    if num_tokens == 0:
        return prob_sums_E.sum() * 0.0
    P_E = prob_sums_E / num_tokens
    if global_counts_E is not None:
        counts = global_counts_E.to(P_E.dtype)
        f_E = counts / counts.sum().clamp_min(1) * (1 if mode == "switch" else k)
    else:
        f_E = counts_E.to(P_E.dtype) / (num_tokens * k if mode == "switch" else num_tokens)
    return len(P_E) * torch.dot(f_E, P_E)


def router_loss(routings, aux_loss_coef: float, z_loss_coef: float) -> torch.Tensor:
    """The router's share of the training loss, over a model's layers (``RoutingResult`` each); the one place the
    coefficients are applied: ``aux_coef * sum aux + z_coef * sum z + sum extra`` (extra losses come scaled)."""
    if not routings:
        return torch.zeros(())
    aux = torch.stack([r.aux_loss for r in routings]).sum()
    z = torch.stack([r.z_loss for r in routings]).sum()
    extra = [v for r in routings for v in r.extra_losses.values()]
    return aux_loss_coef * aux + z_loss_coef * z + (torch.stack(extra).sum() if extra else 0.0)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` over ``[T, E]`` logits (computed in fp32)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return z_loss_from_lse(torch.logsumexp(logits.float(), dim=-1))


def z_loss_from_lse(lse_T: torch.Tensor) -> torch.Tensor:
    """``router_z_loss`` from the rows' logsumexp ``[T]`` (what ``moe.kernels.fused_router`` returns)."""
    if lse_T.shape[0] == 0:
        return lse_T.sum() * 0.0
    return lse_T.float().square().mean()


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (population variance); 0 for one expert."""
    if x_E.numel() <= 1:
        return x_E.sum() * 0.0
    return x_E.float().var(unbiased=False) / (x_E.float().mean().square() + eps)


def importance_loss(gates_TE: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017 importance loss ``CV(sum_t G_t)^2`` over the ``[T, E]`` gate values (0 when balanced)."""
    return cv_squared(gates_TE.sum(0))


def symmetric_kl(p_E: torch.Tensor, q_E: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``(KL(p||q) + KL(q||p)) / 2`` between two distributions over experts (clamped at ``eps``)."""
    p, q = p_E.float().clamp_min(eps), q_E.float().clamp_min(eps)
    return 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())


def band_kl_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, low: float = 1.5, high: float = 2.0) -> torch.Tensor:
    """SMAR-style penalty keeping two token groups' routing distributions ``[Ta, E]`` and ``[Tb, E]`` apart by a band.

    ``D = symmetric_kl(mean_t probs_a, mean_t probs_b)``; loss ``relu(low - D) + relu(D - high)`` (0 inside the band).
    """
    if not 0 <= low <= high:
        raise ValueError(f"low={low}, high={high}: expected 0 <= low <= high")
    if probs_a.shape[0] == 0 or probs_b.shape[0] == 0:
        return (probs_a.sum() + probs_b.sum()) * 0.0
    d = symmetric_kl(probs_a.mean(0), probs_b.mean(0))
    return torch.relu(low - d) + torch.relu(d - high)
