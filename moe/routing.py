"""Token-choice routing: logits ``[T, E]`` -> a typed RoutingResult (weights, ids, counts, losses).

``route`` names its top-k order explicitly:

- ``order="score_then_topk"``: scores over all E experts, keep the top k; with ``renormalize=True`` the k kept
  scores are divided by their sum (for softmax this equals softmax over the k kept logits), with
  ``renormalize=False`` they are the full-distribution values (Switch/GShard style, sum <= 1).
- ``order="topk_then_score"``: keep the k largest logits, then apply the score function to those k only
  (Shazeer 2017 "KeepTopK then softmax").

Selection may use an auxiliary-loss-free ``bias`` (DeepSeek-V3; used to choose experts, never in the weights)
and group-limited routing (``n_group``/``topk_group``). Ties go to the lower expert id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe.gating import score as apply_score
from moe.losses import load_balancing_loss, router_z_loss

ORDERS = ("score_then_topk", "topk_then_score")


@dataclass(frozen=True)
class RoutingResult:
    """What a router hands to the expert dispatch. Losses carry autograd; nothing is stored in module state.

    weights: ``[T, k]`` fp32 combine weights.  ids: ``[T, k]`` int64 expert ids.  counts: ``[E]`` slots per expert.
    probs: ``[T, E]`` fp32 router distribution over experts (sums to 1; used by the aux loss and statistics).
    aux_loss, z_loss: fp32 scalars, unscaled. extra_losses: further named scalars, already multiplied by their
    coefficients (added to the training loss as they are). dropped_fraction: share of slots a capacity-limited
    layer dropped (0 when dropless). global_counts: ``counts`` summed over the data-parallel group when the
    router has a ``reduce_counts`` installed (``moe.parallel``), else None; the aux loss, the bias update and the
    routing statistics use it.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped_fraction: torch.Tensor | None = None
    expert_tokens: torch.Tensor | None = None  # expert choice: ``[E, C]`` token ids each expert takes
    global_counts: torch.Tensor | None = None

    @property
    def load(self) -> torch.Tensor:
        """Slots per expert ``[E]`` over the whole data-parallel batch (this rank's when nothing is reduced)."""
        return self.counts if self.global_counts is None else self.global_counts


def stable_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties to the lower index (``torch.topk`` leaves tie order unspecified)."""
    sorted_vals, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_vals[..., :k], order[..., :k]


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax-then-top-k. Returns (probs ``[T, E]``, weights ``[T, k]``, ids ``[T, k]``), all in fp32."""
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: expected 1 <= k <= num_experts ({E})")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = stable_topk(probs, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def group_limited_mask(scores_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited routing: bool ``[T, E]`` of the experts in each token's ``topk_group`` best groups.

    A group's score is the sum of its two largest expert scores (its one score when a group holds one expert).
    """
    T, E = scores_TE.shape
    if E % n_group:
        raise ValueError(f"n_group={n_group}: must divide the number of experts ({E})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group}: expected 1 <= topk_group <= n_group ({n_group})")
    grouped = scores_TE.view(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    _, keep_groups = stable_topk(group_scores, topk_group)
    mask_TG = torch.zeros(T, n_group, dtype=torch.bool, device=scores_TE.device)
    mask_TG.scatter_(1, keep_groups, True)
    return mask_TG.repeat_interleave(E // n_group, dim=1)


def _as_distribution(scores_TE: torch.Tensor) -> torch.Tensor:
    """Rows normalised to sum to 1 (softmax-family scores already do; sigmoid/softpick scores do not)."""
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def check_logits(logits_TE: torch.Tensor, where: str) -> None:
    """Refuse router logits with a NaN, or a row whose every logit is ``-inf`` (no expert left to take the token),
    naming the layer (``where``). One device sync; routers call it in training mode only."""
    nan = torch.isnan(logits_TE).any(-1)
    empty = (logits_TE == float("-inf")).all(-1)
    bad = nan | empty
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        what = "NaN logits" if bool(nan.any()) else "every logit -inf"
        raise ValueError(
            f"{where}: {what} in {int(bad.sum())} of {logits_TE.shape[0]} tokens (rows {rows}...): the layer's input "
            "or the router weights are not finite; lower the learning rate or check the data"
        )


def softmax_limit(logits_TE: torch.Tensor) -> torch.Tensor:
    """Rows holding ``+inf`` become ``0`` on the ``+inf`` experts and ``-inf`` elsewhere: the softmax limit as those
    logits grow (one-hot on a single ``+inf``, uniform over several; the same for sparsemax, entmax and the
    temperature variants). Unnormalised scores (softpick, self-adjust) score such a row 0. No device sync."""
    pos = logits_TE == float("inf")
    rows = pos.any(-1, keepdim=True)
    return torch.where(rows, torch.where(pos, 0.0, float("-inf")), logits_TE)


def route(
    logits: torch.Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = True,
    order: str = "score_then_topk",
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    scaling: float = 1.0,
    aux_loss_mode: str = "switch",
    seq_len: int | None = None,
    reduce_counts=None,
    check: str | None = None,
    **score_kw,
) -> RoutingResult:
    """Route ``[T, E]`` logits to k experts per token and compute the load-balancing and z losses.

    score: a name in ``moe.gating.SCORE_FUNCTIONS`` (``score_kw`` go to it). bias ``[E]``: added to the scores for
    selection only. scaling: multiplies the final weights (DeepSeek-V3 ``routed_scaling_factor``). The aux loss
    uses the scores normalised to a distribution, and counts all k choices (``seq_len`` is needed by the
    "sequence" aux mode). reduce_counts: ``counts [E] -> counts summed over the data-parallel group`` (a
    collective, called on every rank in every forward), or None for this rank's counts. check: a layer name to
    refuse NaN / all ``-inf`` logits with (``check_logits``; routers pass it in training mode). ``+inf`` logits
    follow the score's limit (``softmax_limit``; sigmoid scores take them as they are, ``sigmoid(inf) = 1``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: expected 1 <= k <= num_experts ({E})")
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {ORDERS}")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias: expected shape [{E}], got {tuple(bias.shape)}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group: set both or neither")
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{check or 'router'}.expert_bias: non-finite values {bias.tolist()[:8]}")
    logits32 = logits.float()
    if check is not None:
        check_logits(logits32, check)
    if score != "sigmoid":
        logits32 = softmax_limit(logits32)
    scores_TE = apply_score(logits32, score, **score_kw)
    select_TE = scores_TE if order == "score_then_topk" else logits32
    select_TE = select_TE.detach() + (bias.to(select_TE) if bias is not None else 0.0)
    if n_group is not None:
        select_TE = select_TE.masked_fill(~group_limited_mask(select_TE, n_group, topk_group), float("-inf"))
    _, ids = stable_topk(select_TE, k)
    if order == "score_then_topk":
        weights = scores_TE.gather(1, ids)
    else:
        weights = apply_score(logits32.gather(1, ids), score, **score_kw)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    probs = _as_distribution(scores_TE)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    global_counts = reduce_counts(counts) if reduce_counts is not None else None
    return RoutingResult(
        weights=weights * scaling,
        ids=ids,
        counts=counts,
        probs=probs,
        aux_loss=load_balancing_loss(probs, ids, E, mode=aux_loss_mode, seq_len=seq_len, counts_E=global_counts),
        z_loss=router_z_loss(logits32),
        global_counts=global_counts,
    )
