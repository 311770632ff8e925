"""Fused MoE routing and expert dispatch: Triton kernels on CUDA, a pure-PyTorch reference everywhere else.

Public API (shapes: T tokens, E experts, K experts per token, D hidden size)::

    weights_TK, ids_TK, counts_E, prob_sums_E, lse_T = fused_router(logits_TE, k, score="softmax", renormalize=True,
                                                                    bias=None)  # bias_E: selection only
    x_SD, rows_TK = permute(x_TD, ids_TK, counts_E)      # S = T*K rows, contiguous per expert
    y_TD = unpermute(y_SD, weights_TK, rows_TK)          # deterministic weighted combine
    rows_TK = slot_rows(ids_TK, counts_E)                # permute's row map alone (no data movement)

All of them take ``impl="auto" | "triton" | "torch"``: "auto" runs Triton on CUDA tensors (when triton is installed
and E <= ``MAX_EXPERTS``) and the reference otherwise; "triton" insists (CUDA tensors, or CPU tensors when the
environment has ``TRITON_INTERPRET=1``, read at call time); "torch" is the reference. All are differentiable
(``torch.library`` custom ops with fake functions and autograd, see ``ops.py``), and ``torch.compile`` traces
around them.

Losses from the router's statistics (what ``moe.nn.losses`` computes from the dense ``[T, E]`` probabilities)::

    aux_loss = E * torch.dot(counts_E.float() / (T * k), prob_sums_E / T)   # Switch; "hf" mode: counts_E / T
    z_loss = lse_T.square().mean()

Why only softmax and sigmoid are fused: the kernel reads each row of logits once and must turn every logit into
its score on the spot, which needs a closed-form per-element normaliser: ``exp(x - lse)`` (softmax, one
max + sum reduction per row) or none at all (sigmoid). Sparsemax and entmax need a sort-and-threshold search over
the whole row, and the other gates of ``moe.nn.gating`` change the normaliser per row in ways whose top-k and
gradient this kernel does not implement; route those through ``moe.nn.routing`` / ``moe.nn.gating``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moe.kernels import ops
from moe.kernels.reference import FUSED_SCORES

__all__ = ["FUSED_SCORES", "MAX_EXPERTS", "fused_router", "permute", "slot_rows", "unpermute", "resolve_impl"]

MAX_EXPERTS = 512  # the Triton kernels keep a whole row of E logits (or a one-hot of E experts) in registers
_IMPLS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a fact of the environment, not a switch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def resolve_impl(impl: str, tensor: torch.Tensor, num_experts: int) -> str:
    """The implementation that runs for ``tensor``: "triton" or "torch" (see the module docstring)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {_IMPLS}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        use_triton = tensor.is_cuda and num_experts <= MAX_EXPERTS and _TRITON_INSTALLED
        return "triton" if use_triton else "torch"
    if not _TRITON_INSTALLED:
        raise ValueError("impl='triton': triton is not installed; use impl='auto' or 'torch'")
    if not (tensor.is_cuda or _interpreting()):
        raise ValueError(
            f"impl='triton': expected CUDA tensors, got device {tensor.device} "
            "(CPU tensors run in Triton's interpreter only with TRITON_INTERPRET=1 set before triton kernels load)"
        )
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"impl='triton': E={num_experts} experts, the kernels support at most {MAX_EXPERTS}")
    return "triton"


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != shape or t.device != device:
        raise ValueError(
            f"{name}: expected an int32/int64 tensor of shape {list(shape)} on {device}, "
            f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
        )


def _check_counts(counts: torch.Tensor, device: torch.device) -> None:
    if counts.dim() != 1 or counts.shape[0] == 0:
        raise ValueError(f"counts: expected shape [E] with E >= 1, got {list(counts.shape)}")
    _check_index("counts", counts, tuple(counts.shape), device)


def fused_router(
    logits: torch.Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = True,
    impl: str = "auto",
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing plus its load and loss statistics, from one pass over ``logits [T, E]``.

    Returns ``(weights_TK fp32, ids_TK int32, counts_E int32, prob_sums_E fp32, lse_T fp32)``:

    - ``weights_TK[t, j]``: score of the j-th best expert ``ids_TK[t, j]`` (descending; ties to the lower id),
      divided by the sum of the k kept scores when ``renormalize``;
    - with ``bias [E]`` (DeepSeek-V3 auxiliary-loss-free balancing) the experts are ranked by ``score + bias``
      instead; the weights stay the unbiased scores, and the bias gets no gradient;
    - ``counts_E[e]``: number of (token, choice) slots on expert e (sums to T*k);
    - ``prob_sums_E[e] = sum_t q_te``: the column sums of the router distribution (softmax probabilities, or
      sigmoid scores normalised per token), differentiable, so the load-balancing loss gets its gradient through
      them;
    - ``lse_T[t] = logsumexp(logits[t])``: differentiable, for the z-loss (for both score functions).

    Math in fp32 for any float dtype. ``-inf`` logits are masked: never chosen while a finite one is left; a row with
    fewer than k finite logits fills up with its lowest-id ``-inf`` experts at weight 0 (details in
    ``reference.py``). Gradients flow to ``logits`` from weights, prob_sums and lse.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} of shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"logits: expected a floating-point tensor of shape [T, E], got {got}")
    E = logits.shape[1]
    if E == 0:
        raise ValueError("logits: expected E >= 1 experts, got shape [T, 0]")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k={k!r}: expected an int with 1 <= k <= num_experts ({E})")
    if score not in FUSED_SCORES:
        raise ValueError(
            f"score={score!r}: only {FUSED_SCORES} are fused (the single pass needs a closed-form per-element "
            "normaliser); route other score functions through moe.nn.routing / moe.nn.gating"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (E,) or bias.device != logits.device:
            got = f"shape {list(bias.shape)} on {bias.device}" if isinstance(bias, torch.Tensor) else type(bias)
            raise ValueError(f"bias: expected a float tensor of shape [{E}] on {logits.device}, got {got}")
        bias = bias.detach().float().contiguous()
    return ops.router(logits, k, score, bool(renormalize), bias, resolve_impl(impl, logits, E))


def slot_rows(ids: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Row of every (token, choice) slot in the expert-sorted layout, ``rows_TK [T, K]`` int32.

    ``rows[t, j] = offset_e + #{earlier slots s' < t*K + j on e}`` with ``e = ids[t, j]`` and
    ``offset_e = sum_{e' < e} counts[e']``. ``counts`` must be the histogram of ``ids`` (not checked: that would
    synchronise with the device); then ``rows`` is a permutation of ``0..T*K-1``.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids: expected shape [T, K], got {list(ids.shape)}")
    _check_index("ids", ids, tuple(ids.shape), ids.device)
    _check_counts(counts, ids.device)
    return ops.slot_rows(ids.to(torch.int32), counts.to(torch.int32), resolve_impl(impl, ids, counts.shape[0]))


def permute(
    x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-sorted copy of the tokens: ``x [T, D] -> (x_sorted [T*K, D], rows_TK [T, K] int32)``.

    ``x_sorted[rows[t, j]] = x[t]``; expert e owns rows ``[offset_e, offset_e + counts[e])``, in slot order
    (stable by ``t*K + j``), ready for grouped GEMMs or an expert-parallel all-to-all. ``ids [T, K]`` and
    ``counts [E]`` come from ``fused_router`` (counts must be the histogram of ids). Differentiable w.r.t. x
    (the backward is a deterministic gather-sum).
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, D], got {list(x.shape)}")
    if ids.dim() != 2:
        raise ValueError(f"ids: expected shape [T, K], got {list(ids.shape)}")
    _check_index("ids", ids, (x.shape[0], ids.shape[1]), x.device)
    _check_counts(counts, x.device)
    return ops.permute_rows(x, ids.to(torch.int32), counts.to(torch.int32), resolve_impl(impl, x, counts.shape[0]))


def unpermute(y: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Weighted combine back to tokens: ``out[t] = sum_j weights[t, j] * y[rows[t, j]]``, ``[T, D]`` in y's dtype.

    ``y [T*K, D]`` is in the expert-sorted layout of ``permute`` and ``rows [T, K]`` is its row map. Each output row
    is computed by one program gathering its K rows in order j = 0..K-1 with fp32 accumulation: no atomics, so
    the result (and its backward) is bitwise deterministic. Differentiable w.r.t. y and weights.
    """
    if rows.dim() != 2:
        raise ValueError(f"rows: expected shape [T, K], got {list(rows.shape)}")
    T, K = rows.shape
    if y.dim() != 2 or y.shape[0] != T * K:
        raise ValueError(f"y: expected shape [T*K, D] = [{T * K}, D], got {list(y.shape)}")
    if not weights.is_floating_point() or tuple(weights.shape) != (T, K) or weights.device != y.device:
        raise ValueError(
            f"weights: expected a float tensor of shape [{T}, {K}] on {y.device}, "
            f"got {weights.dtype} of shape {list(weights.shape)} on {weights.device}"
        )
    _check_index("rows", rows, (T, K), y.device)
    return ops.combine_rows(y, weights, rows.to(torch.int32), resolve_impl(impl, y, 0))
