"""Token-choice routing: logits ``[T, E]`` -> a RoutingResult = a ``RoutingPlan`` for the dispatcher + ``RouterAux``.

Shapes: T tokens, E experts, K experts per token (top-k).

The plan is what moves tokens: ``weights_TK``, ``ids_TK``, ``counts_E``. The auxiliaries are what the training
loss and the statistics need: the losses, the column sums ``prob_sums_E = sum_t p_te`` and ``lse_T``; the full
distribution ``probs_TE`` is computed only when something reads it (a stats callback on a logging step, the
"sequence" aux loss), so the fused router (``moe.kernels.fused_router``) never writes a ``[T, E]`` tensor.

``route`` names its top-k order explicitly:

- ``order="score_then_topk"``: scores over all E experts, keep the top k; with ``renormalize=True`` the k kept
  scores are divided by their sum (for softmax this equals softmax over the k kept logits), with
  ``renormalize=False`` they are the full-distribution values (Switch/GShard style, sum <= 1).
- ``order="topk_then_score"``: keep the k largest logits, then apply the score function to those k only
  (Shazeer 2017 "KeepTopK then softmax").

Selection may use an auxiliary-loss-free ``bias`` (DeepSeek-V3; used to choose experts, never in the weights)
and group-limited routing (``n_group``/``topk_group``). Ties go to the lower expert id.

``route_fused`` gives the same result from one pass of the fused kernel, for softmax or sigmoid scores without
score options or group limits (``moe.nn.routers.TopKRouter`` picks between the two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from moe import kernels
from moe.nn.gating import score as apply_score
from moe.nn.losses import balance_loss, load_balancing_loss, router_z_loss, z_loss_from_lse

ORDERS = ("score_then_topk", "topk_then_score")


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Where each token goes, handed from the router to the dispatcher (``moe.dispatch``); nothing else.

    weights_TK: fp32 combine weights (autograd to the router). ids_TK: int64 expert ids, each row distinct.
    counts_E: int64 slots per expert, the histogram of ``ids_TK`` (dispatchers and the expert-parallel count
    exchange use it as it is, never recount). expert_tokens_EC: expert choice only, the ``C`` tokens each expert
    took (then ``weights_TK``/``ids_TK`` are ``[T, E]``: every expert, weight 0 where it did not take the token).
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    counts_E: torch.Tensor
    expert_tokens_EC: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class RouterAux:
    """The router's by-products for the loss and the statistics. Losses carry autograd and are unscaled.

    aux_loss, z_loss: fp32 scalars. extra_losses: further named scalars, already multiplied by their coefficients.
    global_counts_E: ``counts_E`` summed over the data-parallel group (``reduce_counts`` installed by
    ``moe.parallel``), else None. prob_sums_E ``[E]`` / lse_T ``[T]``: the column sums of the router distribution
    and the rows' logsumexp when the router has them (the fused kernel does), else None. probs: ``[T, E]`` fp32
    distribution (rows sum to 1), or a function computing it, evaluated once on first read.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    probs_fn: torch.Tensor | Callable[[], torch.Tensor]
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    global_counts_E: torch.Tensor | None = None
    prob_sums_E: torch.Tensor | None = None
    lse_T: torch.Tensor | None = None
    # ``(layer name, int64 [3])``: NaN-logit rows, all ``-inf`` rows and non-finite bias entries, counted on the
    # device when the router defers its checks to the training step (``raise_router_faults``); else None
    faults: tuple[str, torch.Tensor] | None = None

    @cached_property
    def probs(self) -> torch.Tensor:
        """``[T, E]`` router distribution; materialised here, on first read."""
        return self.probs_fn if isinstance(self.probs_fn, torch.Tensor) else self.probs_fn()

    @property
    def prob_sums(self) -> torch.Tensor:
        """``[E]`` ``sum_t probs[t, e]`` (without materialising ``probs`` when the router kept the sums)."""
        return self.probs.sum(0) if self.prob_sums_E is None else self.prob_sums_E


@dataclass(frozen=True, eq=False)
class RoutingResult:
    """What a layer returns about its routing: the dispatch ``plan``, the router's ``aux``, and the share of slots a
    capacity-limited dispatcher dropped (``dropped_fraction``; None when nothing can be dropped).

    The read-only properties below (``weights``, ``ids``, ``counts``, ``probs``, ``aux_loss``, ...) forward to
    ``plan`` and ``aux`` so that loss code and statistics read one object; nothing is stored in module state.
    """

    plan: RoutingPlan
    aux: RouterAux
    dropped_fraction: torch.Tensor | None = None

    weights = property(lambda self: self.plan.weights_TK, doc="``[T, K]`` fp32 combine weights")
    ids = property(lambda self: self.plan.ids_TK, doc="``[T, K]`` int64 expert ids")
    counts = property(lambda self: self.plan.counts_E, doc="``[E]`` slots per expert on this rank")
    expert_tokens = property(lambda self: self.plan.expert_tokens_EC, doc="expert choice: ``[E, C]`` token ids")
    probs = property(lambda self: self.aux.probs, doc="``[T, E]`` router distribution (materialised on read)")
    prob_sums = property(lambda self: self.aux.prob_sums, doc="``[E]`` column sums of ``probs``")
    aux_loss = property(lambda self: self.aux.aux_loss, doc="load-balancing loss, unscaled")
    z_loss = property(lambda self: self.aux.z_loss, doc="router z-loss, unscaled")
    extra_losses = property(lambda self: self.aux.extra_losses, doc="named losses, already scaled")
    global_counts = property(lambda self: self.aux.global_counts_E, doc="``counts`` summed over data parallel")

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


def _check_args(logits: torch.Tensor, k: int, order: str, bias: torch.Tensor | None) -> tuple[int, int]:
    """``route``'s and ``route_fused``'s argument checks; returns ``(T, E)``."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: expected 1 <= k <= num_experts ({E})")
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {ORDERS}")
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias: expected shape [{E}], got {tuple(bias.shape)}")
    return T, E


def _check(logits_TE, bias_E, check: str | None, defer: bool) -> tuple[str, torch.Tensor] | None:
    """``route``'s non-finite checks: now (a device sync) or, with ``defer``, counted for the step's end."""
    if defer and check is not None:
        return check, input_faults(logits_TE, bias_E)
    if bias_E is not None and not bool(torch.isfinite(bias_E).all()):
        raise ValueError(f"{check or 'router'}.expert_bias: non-finite values {bias_E.tolist()[:8]}")
    if check is not None:
        check_logits(logits_TE, check)
    return None


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


def input_faults(logits_TE: torch.Tensor, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[3]``: rows with a NaN logit, rows whose every logit is ``-inf``, non-finite ``bias`` entries. No
    device sync: a router that defers its checks returns these and the training step reads them all at once."""
    nan = torch.isnan(logits_TE).any(-1).sum()
    empty = (logits_TE == float("-inf")).all(-1).sum()
    bias = (~torch.isfinite(bias_E)).sum() if bias_E is not None else torch.zeros_like(nan)
    return torch.stack([nan, empty, bias.to(nan)])


def raise_router_faults(faults: list[tuple[str, torch.Tensor]]) -> None:
    """Raise, naming every layer, if any router deferred a fault (``input_faults``); one device sync for all."""
    if not faults:
        return
    counts = torch.stack([f for _, f in faults]).tolist()
    bad = []
    for (where, _), (nan, empty, bias) in zip(faults, counts):
        what = [f"NaN logits in {nan} tokens" if nan else "", f"every logit -inf in {empty} tokens" if empty else "",
                f"{bias} non-finite expert_bias values" if bias else ""]  # fmt: skip
        if any(what):
            bad.append(f"{where}: {', '.join(w for w in what if w)}")
    if bad:
        raise ValueError(
            f"{'; '.join(bad)} (this training step): the layer's input or the router weights are not finite; lower "
            "the learning rate or check the data"
        )


def softmax_limit(logits_TE: torch.Tensor) -> torch.Tensor:
    """Rows holding ``+inf`` become ``0`` on the ``+inf`` experts and ``-inf`` elsewhere: the softmax limit as those
    logits grow (one-hot on a single ``+inf``, uniform over several; the same for sparsemax, entmax and the
    temperature variants). Unnormalised scores (softpick, self-adjust) score such a row 0. No device sync (on the CPU,
    where a sync is free, a tensor without ``+inf`` is returned as it is)."""
    pos = logits_TE == float("inf")
    if logits_TE.device.type == "cpu" and not bool(pos.any()):  # the usual case; reading the flag is free on the CPU
        return logits_TE
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
    defer: bool = False,
    **score_kw,
) -> RoutingResult:
    """Route ``[T, E]`` logits to k experts per token and compute the load-balancing and z losses.

    score: a name in ``moe.nn.gating.SCORE_FUNCTIONS`` (``score_kw`` go to it). bias ``[E]``: added to the scores for
    selection only. scaling: multiplies the final weights (DeepSeek-V3 ``routed_scaling_factor``). The aux loss
    uses the scores normalised to a distribution, and counts all k choices (``seq_len`` is needed by the
    "sequence" aux mode). reduce_counts: ``counts [E] -> counts summed over the data-parallel group`` (a
    collective, called on every rank in every forward), or None for this rank's counts. check: a layer name to
    refuse NaN / all ``-inf`` logits with (``check_logits``; routers pass it in training mode); with ``defer``
    they are counted into ``aux.faults`` instead, without a device sync (``raise_router_faults``). ``+inf`` logits
    follow the score's limit (``softmax_limit``; sigmoid scores take them as they are, ``sigmoid(inf) = 1``).
    """
    T, E = _check_args(logits, k, order, bias)
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group: set both or neither")
    logits32 = logits.float()
    faults = _check(logits32, bias, check, defer)
    if score != "sigmoid":
        logits32 = softmax_limit(logits32)
    scores_TE = apply_score(logits32, score, **score_kw)
    select_TE = scores_TE if order == "score_then_topk" else logits32
    if bias is not None:  # a masked (-inf) expert stays out of reach whatever its bias
        select_TE = torch.where(logits32 == float("-inf"), float("-inf"), select_TE.detach() + bias.to(select_TE))
    else:
        select_TE = select_TE.detach()
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
    aux_loss = load_balancing_loss(probs, ids, E, mode=aux_loss_mode, seq_len=seq_len, counts_E=global_counts)
    return RoutingResult(
        RoutingPlan(weights * scaling, ids, counts),
        RouterAux(aux_loss, router_z_loss(logits32), probs, global_counts_E=global_counts, faults=faults),
    )


def fused_applies(score: str, order: str = "score_then_topk", bias: bool = False, n_group: int | None = None,
                  score_kw: dict | None = None) -> str | None:  # fmt: skip
    """None when ``route_fused`` covers these options, else the reason it does not (for error messages)."""
    if score not in kernels.FUSED_SCORES:
        return f"score={score!r} (the kernel fuses {kernels.FUSED_SCORES})"
    if score_kw:
        return f"score options {sorted(score_kw)}"
    if n_group is not None:
        return "group-limited routing (n_group)"
    if bias and order != "score_then_topk":
        return "a selection bias with order='topk_then_score'"
    return None


def route_fused(
    logits: torch.Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = True,
    order: str = "score_then_topk",
    bias: torch.Tensor | None = None,
    scaling: float = 1.0,
    aux_loss_mode: str = "switch",
    seq_len: int | None = None,
    reduce_counts=None,
    check: str | None = None,
    impl: str = "auto",
    defer: bool = False,
) -> RoutingResult:
    """``route`` for softmax/sigmoid scores through ``moe.kernels.fused_router``: one pass over ``logits [T, E]``.

    Same arguments and result as ``route`` (see ``fused_applies`` for what it covers), plus ``impl``
    ("auto" | "triton" | "torch", see ``moe.kernels``). Differences are fp32 rounding only: without a bias the
    kernel ranks the logits, ``route`` the scores (the same order but where scores round to equal values).
    Losses come from the kernel's statistics, never from ``[T, E]``::

        aux ("switch") = E * sum_e (counts_e / (T k)) * (prob_sums_e / T)   ("hf": counts_e / T)
        z = mean_t lse_t^2

    except the "sequence" aux loss, which reads ``probs`` per sequence (and so materialises it).
    ``check``/``softmax_limit`` treat non-finite logits as ``route`` does.
    """
    T, E = _check_args(logits, k, order, bias)
    reason = fused_applies(score, order, bias is not None)
    if reason is not None:
        raise ValueError(f"route_fused: the fused kernel does not cover {reason}; use moe.nn.routing.route")
    logits32 = logits.float()
    faults = _check(logits32, bias, check, defer)
    if score != "sigmoid":
        logits32 = softmax_limit(logits32)
    # softmax over the k kept logits is the renormalised full softmax: topk_then_score == score_then_topk + renorm
    renorm = renormalize or (order == "topk_then_score" and score == "softmax")
    weights_TK, ids_TK, counts_E, prob_sums_E, lse_T = kernels.fused_router(
        logits32, k, score, renorm, impl=impl, bias=bias
    )
    ids_TK, counts_E = ids_TK.long(), counts_E.long()
    global_counts = reduce_counts(counts_E) if reduce_counts is not None else None

    def probs_TE() -> torch.Tensor:  # [T, E], built only when read
        return _as_distribution(apply_score(logits32, score))

    if aux_loss_mode == "sequence":  # per-sequence means: the one loss that needs [T, E]
        probs = probs_TE()
        aux_loss = load_balancing_loss(probs, ids_TK, E, "sequence", seq_len)
    else:
        probs = probs_TE
        aux_loss = balance_loss(prob_sums_E, counts_E, T, k, aux_loss_mode, global_counts)
    aux = RouterAux(aux_loss, z_loss_from_lse(lse_T), probs, global_counts_E=global_counts, prob_sums_E=prob_sums_E,
                    lse_T=lse_T, faults=faults)  # fmt: skip
    return RoutingResult(RoutingPlan(weights_TK * scaling if scaling != 1.0 else weights_TK, ids_TK, counts_E), aux)
