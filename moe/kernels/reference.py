"""Pure-PyTorch reference kernels for fused routing and expert dispatch: the test oracle and the CPU path.

Every function here has the signature and the semantics of its Triton twin in ``triton_router.py`` or
``triton_permute.py``; ``tests/test_kernels.py`` holds the two to each other. These functions do no argument
checking (the public wrappers in ``moe/kernels/__init__.py`` do) and no autograd (``moe/kernels/ops.py`` registers
the backward functions below as the gradients of the forward ones).

Shapes: T = tokens, E = experts, K = experts per token (top-k), D = hidden size, S = T*K (token, choice) slots.
Slot ``s = t*K + j`` is choice j of token t.

Router semantics (shared with the Triton kernel)
------------------------------------------------
- All math is fp32, whatever the logits dtype (fp16, bf16, fp32; fp64 is rounded to fp32).
- Scores ``p``: softmax ``p_te = exp(x_te - lse_t)``, or sigmoid ``p_te = 1 / (1 + exp(-x_te))``.
- Selection ranks the fp32 *logits* (both score functions are strictly increasing, so this is the score order
  without the rounding collisions of the scores themselves, e.g. sigmoid saturating at 1.0), descending, ties to
  the lower expert id. -0.0 ties with +0.0.
- With a selection ``bias [E]`` (DeepSeek-V3's auxiliary-loss-free balancing) it ranks ``p_te + bias_e`` in fp32
  instead (``-inf`` logits stay ``-inf``), ties to the lower id; the weights stay the unbiased scores ``p`` and the
  bias gets no gradient.
- ``-inf`` logits mean "masked": they score 0 and are never selected while the row has another finite logit left.
  A row with fewer than K finite logits fills its remaining choices with its lowest-id ``-inf`` experts, at
  weight 0; they are real slots (counted, dispatched), they just contribute nothing and get no gradient.
  A row of only ``-inf`` gets weights 0, ids ``0..K-1``, scores 0 and ``lse = -inf`` (where plain softmax gives
  NaN). ``+inf`` and NaN logits are not supported.
- ``renormalize=True`` divides the K kept scores by their sum (0 if the sum is 0).
- ``prob_sums_E = sum_t q_te`` over *all* experts, ``q`` the router's distribution over experts: the softmax
  probabilities, or the sigmoid scores normalised per token, ``q_te = s_te / sum_e' s_te'`` (DeepSeek-V3's
  ``s'``; 0 on a row of zeros), as ``moe.nn.routing`` defines the aux loss' distribution. With it the Switch
  load-balancing loss is ``E * sum_e (counts_e / (T*K)) * (prob_sums_e / T)`` (``moe.nn.losses.balance_loss``).
- ``lse_T = logsumexp_e x_te`` for both score functions (the router z-loss is ``mean(lse**2)``; for sigmoid the
  z-loss still penalises the logits' log-partition, as ST-MoE defines it on logits).
"""

from __future__ import annotations

import torch

FUSED_SCORES = ("softmax", "sigmoid")


def _scores(x_TE: torch.Tensor, lse_T: torch.Tensor, score: str) -> torch.Tensor:
    """fp32 scores ``[T, E]`` from fp32 logits; softmax rows of only ``-inf`` give 0 instead of NaN."""
    if score == "sigmoid":
        return torch.sigmoid(x_TE)
    if x_TE.device.type != "cpu" or not bool(torch.isfinite(lse_T).all()):  # (a free check on the CPU)
        lse_T = torch.where(torch.isfinite(lse_T), lse_T, torch.zeros_like(lse_T))
    return torch.exp(x_TE - lse_T[:, None])  # exp(-inf - 0) = 0 on an all -inf row


def _softmax_probs(x_TE: torch.Tensor, lse_T: torch.Tensor) -> torch.Tensor:
    return _scores(x_TE, lse_T, "softmax")


def _inv_row_sums(s_TE: torch.Tensor) -> torch.Tensor:
    """``1 / sum_e s_te`` as ``[T, 1]``, 0 where the row sums to 0 (sigmoid scores of an all ``-inf`` row)."""
    total_T1 = s_TE.sum(dim=-1, keepdim=True)
    return torch.where(total_T1 > 0, 1.0 / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1)), 0.0)


def _top_ids(key_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys' ids per row, descending, ties to the lower id (-0.0 ties with +0.0).

    On the CPU, ``topk`` of k+1 keys (2-3x cheaper than a full stable sort at E = 8..64) when no two of them are
    equal, which is the only case where ``topk``'s unspecified tie order could differ; else the stable sort. The
    check reads one flag on the host: free on the CPU, so other devices keep the sort."""
    E = key_TE.shape[1]
    if key_TE.device.type == "cpu" and k < E:
        vals_TJ, ids_TJ = torch.topk(key_TE, k + 1, dim=-1)
        if not bool((vals_TJ[:, 1:] == vals_TJ[:, :-1]).any()):
            return ids_TJ[:, :k]
    return torch.sort(key_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def fused_router(
    logits: torch.Tensor, k: int, score: str = "softmax", renormalize: bool = True, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing with every statistic a training step needs, from one read of the logits.

    logits: ``[T, E]`` any float dtype. bias: None or ``[E]`` fp32, for selection only. Returns ``(weights_TK fp32,
    ids_TK int32, counts_E int32, prob_sums_E fp32, lse_T fp32)``: ``weights_TK[t, j]`` is the (optionally
    renormalised) score of ``ids_TK[t, j]``, in selection order; ``counts_E[e] = #{(t, j): ids_TK[t, j] = e}``;
    ``prob_sums_E[e] = sum_t q_te``; ``lse_T[t] = logsumexp_e logits[t, e]``. See the module docstring for ties,
    the bias and ``-inf``.
    """
    x_TE = logits.float()
    T, E = x_TE.shape
    lse_T = torch.logsumexp(x_TE, dim=-1)
    p_TE = _scores(x_TE, lse_T, score)
    if bias is None:
        key_TE = x_TE  # -0.0 == 0.0 for the comparison sort, so they tie and the lower id wins, as in the kernel
    else:
        key_TE = torch.where(x_TE == float("-inf"), float("-inf"), p_TE + bias.float())
    ids_TK = _top_ids(key_TE, k)
    weights_TK = p_TE.gather(1, ids_TK)
    if renormalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    ids_S = ids_TK.reshape(-1)
    counts_E = torch.zeros(E, dtype=torch.int32, device=logits.device)
    counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S, dtype=torch.int32))
    q_TE = p_TE if score == "softmax" else p_TE * _inv_row_sums(p_TE)
    prob_sums_E = q_TE.sum(dim=0)
    return weights_TK, ids_TK.to(torch.int32), counts_E, prob_sums_E, lse_T


def fused_router_backward(
    logits: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    grad_weights: torch.Tensor | None,
    grad_prob_sums: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    score: str = "softmax",
    renormalize: bool = True,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits [T, E]`` of the forward's weights, prob_sums and lse, recomputed from the logits.

    Needs only the forward's small outputs (``weights_TK``, ``ids_TK``, ``lse_T``), never a saved ``[T, E]`` score
    tensor. Any of the three incoming gradients may be None (that output was not used). With ``w = weights``,
    ``gw = grad_weights``, ``gP = grad_prob_sums``, ``gl = grad_lse``, ``dot_t = sum_j gw_tj w_tj`` and
    ``scatter`` adding a ``[T, K]`` term onto the ids' columns:

    softmax (``p = exp(x - lse)``)::

        grad = p * (gP - <gP, p>_t + gl_t - [not renorm] dot_t) + scatter(w * (gw - [renorm] dot))

    sigmoid (``s = sigmoid(x)``, ``S_t = sum_e s_te``, ``n = s / S``, ``q = exp(x - lse)``)::

        grad = s (1 - s) / S_t * (gP - <gP, n>_t) + gl_t * q
               + scatter(renorm ? (gw - dot) * w * (1 - s_sel) : gw * w * (1 - w))

    The selection bias does not appear: it only chose ``ids``.

    Returned in ``logits.dtype``.
    """
    x_TE = logits.float()
    T, E = x_TE.shape
    ids_TK = ids.long()
    grad_TE = torch.zeros_like(x_TE)
    coef_T = torch.zeros_like(lse)
    slot_TK = None
    if grad_weights is not None:
        gw_TK = grad_weights.float()
        dot_T1 = (gw_TK * weights).sum(dim=-1, keepdim=True)
    if score == "softmax":
        p_TE = _softmax_probs(x_TE, lse)
        if grad_prob_sums is not None:
            gP_E = grad_prob_sums.float()
            grad_TE += p_TE * gP_E
            coef_T -= (p_TE * gP_E).sum(dim=-1)
        if grad_lse is not None:
            coef_T += grad_lse.float()
        if grad_weights is not None:
            if renormalize:
                slot_TK = weights * (gw_TK - dot_T1)
            else:
                coef_T -= dot_T1[:, 0]
                slot_TK = weights * gw_TK
        grad_TE += p_TE * coef_T[:, None]
    else:
        s_TE = torch.sigmoid(x_TE)
        if grad_prob_sums is not None:
            inv_T1 = _inv_row_sums(s_TE)
            gP_E = grad_prob_sums.float()
            gPn_T1 = (s_TE * inv_T1 * gP_E).sum(dim=-1, keepdim=True)
            grad_TE += s_TE * (1 - s_TE) * inv_T1 * (gP_E - gPn_T1)
        if grad_lse is not None:
            grad_TE += grad_lse.float()[:, None] * _softmax_probs(x_TE, lse)
        if grad_weights is not None:
            if renormalize:
                s_sel_TK = s_TE.gather(1, ids_TK)
                slot_TK = (gw_TK - dot_T1) * weights * (1 - s_sel_TK)
            else:
                slot_TK = gw_TK * weights * (1 - weights)
    if slot_TK is not None:
        grad_TE.scatter_add_(1, ids_TK, slot_TK)  # the K ids of a row are distinct: no collisions
    return grad_TE.to(logits.dtype)


def slot_rows(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row of every (token, choice) slot in the expert-sorted layout: ``rows_TK [T, K]`` int32.

    ``rows[t, j] = offset_e + rank``, with ``e = ids[t, j]``, ``offset_e = sum_{e' < e} counts[e']`` and ``rank``
    the number of earlier slots ``s' < t*K + j`` that also chose e (stable by slot index). ``counts`` must be the
    histogram of ``ids`` (as ``fused_router`` returns it); then ``rows`` is a permutation of ``0..T*K-1`` and
    expert e owns the contiguous rows ``[offset_e, offset_e + counts_e)``.
    """
    T, K = ids.shape
    E = counts.shape[0]
    ids_S = ids.reshape(-1).long()
    S = ids_S.numel()
    order_S = torch.argsort(ids_S, stable=True)  # sorted position -> slot
    expert_S = ids_S[order_S]
    own_counts_E = torch.zeros(E, dtype=torch.long, device=ids.device).scatter_add_(0, ids_S, torch.ones_like(ids_S))
    own_start_E = torch.cumsum(own_counts_E, 0) - own_counts_E
    offsets_E = torch.cumsum(counts.long(), 0) - counts.long()
    rank_S = torch.arange(S, device=ids.device) - own_start_E[expert_S]
    rows_S = torch.empty_like(ids_S)
    rows_S[order_S] = offsets_E[expert_S] + rank_S
    return rows_S.to(torch.int32).view(T, K)


def permute(x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-sorted copy of the token rows: ``x [T, D] -> (x_sorted [T*K, D], rows_TK [T, K] int32)``.

    ``x_sorted[rows[t, j]] = x[t]``: expert e's rows are the contiguous block ``[offset_e, offset_e + counts_e)``,
    in slot order (see ``slot_rows``), which is the layout an expert-parallel all-to-all sends. ``rows_TK`` is
    all that ``unpermute`` needs.
    """
    T, K = ids.shape
    rows_TK = slot_rows(ids, counts)
    token_S = torch.empty(T * K, dtype=torch.long, device=x.device)
    token_S[rows_TK.reshape(-1).long()] = torch.arange(T * K, device=x.device) // K
    return x.index_select(0, token_S), rows_TK


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] * y_sorted[rows[t, j]]``, ``[T, D]``.

    Gather-based and deterministic (no scatter-add): K row gathers accumulated in order j = 0..K-1, in fp32,
    output in ``y_sorted.dtype``. ``weights=None`` sums the K rows unweighted (that is the backward of ``permute``).
    """
    T, K = rows.shape
    rows_KT = rows.long().t()
    acc = torch.promote_types(y_sorted.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    out = torch.zeros(T, y_sorted.shape[1], dtype=acc, device=y_sorted.device)
    for j in range(K):
        y_TD = y_sorted.index_select(0, rows_KT[j]).to(acc)
        if weights is None:
            out += y_TD
        else:
            out.addcmul_(weights[:, j, None].to(acc), y_TD)
    return out.to(y_sorted.dtype)


def permute_backward(grad_x_sorted: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Gradient of ``permute`` w.r.t. x: ``grad_x[t] = sum_j grad_x_sorted[rows[t, j]]`` (a gather, deterministic)."""
    return unpermute(grad_x_sorted, None, rows)


def unpermute_backward(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, need_grad_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``unpermute``: ``grad_y_sorted[rows[t, j]] = weights[t, j] * grad_out[t]`` (in ``y_sorted.dtype``)
    and ``grad_weights[t, j] = <grad_out[t], y_sorted[rows[t, j]]>`` (fp32, or None when not needed).

    ``grad_y_sorted`` is built as a gather through the inverse permutation (row -> slot), not a scatter.
    """
    T, K = rows.shape
    rows_S = rows.reshape(-1).long()
    slot_S = torch.empty_like(rows_S).scatter_(0, rows_S, torch.arange(T * K, device=rows.device))  # row -> slot
    acc = torch.promote_types(y_sorted.dtype, torch.float32)
    g_TD = grad_out.to(acc)
    grad_y = (g_TD.index_select(0, slot_S // K) * weights.reshape(-1).to(acc)[slot_S, None]).to(y_sorted.dtype)
    grad_w = None
    if need_grad_weights:
        rows_KT = rows.long().t()
        grad_w = torch.stack(
            [torch.linalg.vecdot(y_sorted.index_select(0, rows_KT[j]).to(acc), g_TD) for j in range(K)], dim=1
        ).to(weights.dtype)
    return grad_y, grad_w
