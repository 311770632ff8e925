"""``torch.library`` custom ops over the reference and Triton kernels, with fake (meta) functions and autograd.

Each op takes a resolved ``impl`` string, "torch" (``reference.py``; the permute ops on CPU tensors use
``cpu_permute.py``, same results in fewer passes) or "triton" (``triton_router.py`` / ``triton_permute.py``, imported
on first use so the package works without triton). Being custom ops, they are
opaque leaves to ``torch.compile``: it traces around them from the fake functions, without looking inside
(neither the Triton launch nor the interpreter is traceable). The public, validating API is
``moe/kernels/__init__.py``; these ops trust their arguments.

Eager mode takes the ``torch.autograd.Function`` twins at the end of this file (``router``, ``permute_rows``,
``combine_rows``): the same backends and the same gradient functions, without the custom-op dispatch, which costs
about 80 us a call in Python on the 2-core CPU VM (0.6 ms of a 15 ms MoE layer step, forward + backward, measured).
Under ``torch.compile`` they call the custom ops.

Shapes: T = tokens, E = experts, K = experts per token, D = hidden size.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from moe.kernels import cpu_permute, reference

_LIB = "moe_kernels"


def _router_backend(impl: str) -> ModuleType:
    return reference if impl == "torch" else importlib.import_module("moe.kernels.triton_router")


def _permute_backend(impl: str, t: torch.Tensor) -> ModuleType:
    """For "torch": ``cpu_permute`` on CPU tensors (the reference's results in fewer passes), else the reference."""
    if impl == "torch":
        return cpu_permute if t.device.type == "cpu" else reference
    return importlib.import_module("moe.kernels.triton_permute")


# ---------------------------------------------------------------------------------------------------------------
# fused router
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::fused_router", mutates_args=())
def fused_router(
    logits: torch.Tensor, k: int, score: str, renormalize: bool, bias: torch.Tensor | None, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int32, counts_E int32, prob_sums_E fp32, lse_T fp32) from ``logits [T, E]``;
    ``bias [E]`` (or None) only ranks the experts."""
    return _router_backend(impl).fused_router(logits, k, score, renormalize, bias)


@fused_router.register_fake
def _(logits, k, score, renormalize, bias, impl):
    T, E = logits.shape
    return (
        logits.new_empty(T, k, dtype=torch.float32),
        logits.new_empty(T, k, dtype=torch.int32),
        logits.new_empty(E, dtype=torch.int32),
        logits.new_empty(E, dtype=torch.float32),
        logits.new_empty(T, dtype=torch.float32),
    )


@torch.library.custom_op(f"{_LIB}::fused_router_backward", mutates_args=())
def fused_router_backward(
    logits: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    grad_weights: torch.Tensor | None,
    grad_prob_sums: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    score: str,
    renormalize: bool,
    impl: str,
) -> torch.Tensor:
    """``grad_logits [T, E]`` (``logits.dtype``); see ``reference.fused_router_backward``."""
    return _router_backward_impl(
        logits, weights, ids, lse, grad_weights, grad_prob_sums, grad_lse, score, renormalize, impl
    )


def _router_backward_impl(logits, weights, ids, lse, grad_weights, grad_prob_sums, grad_lse, score, renormalize, impl):
    return _router_backend(impl).fused_router_backward(
        logits, weights, ids, lse, grad_weights, grad_prob_sums, grad_lse, score, renormalize
    )


@fused_router_backward.register_fake
def _(logits, weights, ids, lse, grad_weights, grad_prob_sums, grad_lse, score, renormalize, impl):
    return torch.empty_like(logits)


def _fused_router_setup(ctx, inputs, output):
    logits, _, score, renormalize, _, impl = inputs
    weights, ids, _, _, lse = output
    ctx.save_for_backward(logits, weights, ids, lse)  # no [T, E] score tensor: the backward recomputes it
    ctx.score, ctx.renormalize, ctx.impl = score, renormalize, impl


def _router_grad(ctx, grad_weights, grad_prob_sums, grad_lse, backward_fn) -> tuple:
    """Gradients for ``(logits, k, score, renormalize, bias, impl)``; ``backward_fn``: the op or its backend."""
    if not ctx.needs_input_grad[0] or (grad_weights is None and grad_prob_sums is None and grad_lse is None):
        return None, None, None, None, None, None
    logits, weights, ids, lse = ctx.saved_tensors
    grad_logits = backward_fn(
        logits, weights, ids, lse, grad_weights, grad_prob_sums, grad_lse, ctx.score, ctx.renormalize, ctx.impl
    )
    return grad_logits, None, None, None, None, None  # the bias only selects: no gradient


def _fused_router_grad(ctx, grad_weights, grad_ids, grad_counts, grad_prob_sums, grad_lse):
    return _router_grad(ctx, grad_weights, grad_prob_sums, grad_lse, fused_router_backward)


fused_router.register_autograd(_fused_router_grad, setup_context=_fused_router_setup)


# ---------------------------------------------------------------------------------------------------------------
# slot rows, permute, unpermute
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::slot_rows", mutates_args=())
def slot_rows(ids: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    """``rows_TK [T, K]`` int32: the expert-sorted row of each (token, choice) slot."""
    return _permute_backend(impl, ids).slot_rows(ids, counts)


@slot_rows.register_fake
def _(ids, counts, impl):
    return torch.empty_like(ids, dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::permute", mutates_args=())
def permute(x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, D] -> (x_sorted [T*K, D], rows_TK [T, K] int32)``."""
    return _permute_backend(impl, x).permute(x, ids, counts)


@permute.register_fake
def _(x, ids, counts, impl):
    T, K = ids.shape
    return x.new_empty(T * K, x.shape[1]), torch.empty_like(ids, dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::gather_rows", mutates_args=())
def gather_rows(y_sorted: torch.Tensor, weights: torch.Tensor | None, rows: torch.Tensor, impl: str) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[rows[t, j]]`` (unweighted if weights is None), ``[T, D]``."""
    return _permute_backend(impl, y_sorted).unpermute(y_sorted, weights, rows)


@gather_rows.register_fake
def _(y_sorted, weights, rows, impl):
    return y_sorted.new_empty(rows.shape[0], y_sorted.shape[1])


@torch.library.custom_op(f"{_LIB}::unpermute_backward", mutates_args=())
def unpermute_backward(
    grad_out: torch.Tensor,
    y_sorted: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    need_grad_weights: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_sorted ``[T*K, D]``, grad_weights ``[T, K]``, or an empty ``[0]`` tensor when not needed)."""
    return _unpermute_backward_impl(grad_out, y_sorted, weights, rows, need_grad_weights, impl)


def _unpermute_backward_impl(grad_out, y_sorted, weights, rows, need_grad_weights, impl):
    grad_y, grad_w = _permute_backend(impl, grad_out).unpermute_backward(
        grad_out, y_sorted, weights, rows, need_grad_weights
    )
    return grad_y, (weights.new_empty(0) if grad_w is None else grad_w)


@unpermute_backward.register_fake
def _(grad_out, y_sorted, weights, rows, need_grad_weights, impl):
    return torch.empty_like(y_sorted), (torch.empty_like(weights) if need_grad_weights else weights.new_empty(0))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.impl = inputs[3]


def _permute_grad(ctx, grad_x_sorted, grad_rows, combine=None):
    """Gradients for ``(x, ids, counts, impl)``: each token sums its K rows' gradients (``combine``: the
    gather_rows op, or its eager twin)."""
    if grad_x_sorted is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    (rows,) = ctx.saved_tensors
    return (combine or gather_rows)(grad_x_sorted, None, rows, ctx.impl), None, None, None


permute.register_autograd(_permute_grad, setup_context=_permute_setup)


def _gather_rows_setup(ctx, inputs, output):
    y_sorted, weights, rows, impl = inputs
    ctx.save_for_backward(y_sorted, weights, rows)
    ctx.impl = impl


def _gather_rows_grad(ctx, grad_out, backward_fn=None):
    """Gradients for ``(y_sorted, weights, rows, impl)``; ``backward_fn``: the unpermute_backward op (default) or
    ``_unpermute_backward_impl``."""
    backward_fn = backward_fn or unpermute_backward
    y_sorted, weights, rows = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if weights is None:
        # unweighted sum: each sorted row receives its token's gradient
        ones = torch.ones(rows.shape, dtype=torch.float32, device=rows.device)
        grad_y, _ = backward_fn(grad_out, y_sorted, ones, rows, False, ctx.impl)
        return (grad_y if need_y else None), None, None, None
    grad_y, grad_w = backward_fn(grad_out, y_sorted, weights, rows, need_w, ctx.impl)
    return (grad_y if need_y else None), (grad_w if need_w else None), None, None


gather_rows.register_autograd(_gather_rows_grad, setup_context=_gather_rows_setup)


# ---------------------------------------------------------------------------------------------------------------
# eager twins: the same backends and gradients as plain autograd.Functions (see the module docstring)
# ---------------------------------------------------------------------------------------------------------------


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, score, renormalize, bias, impl):
        output = _router_backend(impl).fused_router(logits, k, score, renormalize, bias)
        _fused_router_setup(ctx, (logits, k, score, renormalize, bias, impl), output)
        ctx.mark_non_differentiable(output[1], output[2])
        return output

    @staticmethod
    def backward(ctx, grad_weights, grad_ids, grad_counts, grad_prob_sums, grad_lse):
        return _router_grad(ctx, grad_weights, grad_prob_sums, grad_lse, _router_backward_impl)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, counts, impl):
        output = _permute_backend(impl, x).permute(x, ids, counts)
        _permute_setup(ctx, (x, ids, counts, impl), output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_x_sorted, grad_rows):
        return _permute_grad(ctx, grad_x_sorted, grad_rows, combine_rows)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, rows, impl):
        _gather_rows_setup(ctx, (y_sorted, weights, rows, impl), None)
        return _permute_backend(impl, y_sorted).unpermute(y_sorted, weights, rows)

    @staticmethod
    def backward(ctx, grad_out):
        return _gather_rows_grad(ctx, grad_out, _unpermute_backward_impl)


def router(logits, k, score, renormalize, bias, impl):
    """``fused_router``: the custom op under ``torch.compile``, its autograd.Function twin in eager mode."""
    if torch.compiler.is_compiling():
        return fused_router(logits, k, score, renormalize, bias, impl)
    return _Router.apply(logits, k, score, renormalize, bias, impl)


def permute_rows(x, ids, counts, impl):
    """``permute``: the custom op under ``torch.compile``, its autograd.Function twin in eager mode."""
    if torch.compiler.is_compiling():
        return permute(x, ids, counts, impl)
    return _Permute.apply(x, ids, counts, impl)


def combine_rows(y_sorted, weights, rows, impl):
    """``gather_rows``: the custom op under ``torch.compile``, its autograd.Function twin in eager mode."""
    if torch.compiler.is_compiling():
        return gather_rows(y_sorted, weights, rows, impl)
    return _GatherRows.apply(y_sorted, weights, rows, impl)
