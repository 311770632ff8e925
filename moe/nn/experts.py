"""SwiGLU expert compute on expert-sorted rows, three ways, and the rule that picks one.

Shapes: S rows sorted by expert (``counts_E[e]`` rows for expert e, contiguous), d model width, f expert width,
E experts, C the largest count. Weights: ``w_gate, w_up [E, d, f]``, ``w_down [E, f, d]``. Every implementation
computes, for each row r of expert e::

    y_SD[r] = (silu(x_SD[r] @ w_gate[e]) * (x_SD[r] @ w_up[e])) @ w_down[e]

- "grouped_mm": ``F.grouped_mm`` with offsets from the counts (one call per weight; torch loops over experts in C++).
- "bmm": the rows scattered into a zero-padded ``[E, C, d]`` block, then ``torch.bmm`` (one batched GEMM per weight;
  padding rows are zero, so they add nothing to the outputs or the weight gradients).
- "loop": one Python-level matmul chain per expert over ``unbind``-ed weights (``w[e]`` indexing would make the
  backward write a zero ``[E, d, f]`` gradient per expert and sum them).

``pick_impl`` chooses from the mean rows per expert ``S / E`` and the thread count, with thresholds measured on
the 2-core CPU VM (``benchmarks/bench_experts.py``; BENCHMARKS.md, "MoE layer vs Hugging Face Mixtral").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

GROUPED_MM = getattr(F, "grouped_mm", None)
IMPLS = ("auto", "grouped_mm", "bmm", "loop")
# CPU, fp32, forward + backward, 2 threads: at 128 rows per expert the padded bmm beat grouped_mm (12.9-13.3 vs
# 14.5-14.8 ms, d=128 f=64 E=64), at 256 and 544 grouped_mm won (32.7 vs 36.7-37.5 ms; 16.9-18.7 vs 21.3-23.0 ms):
# the threshold sits between the two. On one thread grouped_mm won at every size (24 vs 30 ms at 128 rows).
BMM_MAX_ROWS_PER_EXPERT = 192
# ... as long as the padding stays below this fraction of the rows (a skewed router pads every expert to the largest)
BMM_MAX_PADDING = 0.5


def pick_impl(x_SD: torch.Tensor, counts_E: torch.Tensor, d_ff: int) -> str:
    """The implementation for these rows: "grouped_mm" | "bmm" | "loop" (see the module docstring for the rule).

    CUDA: grouped_mm for bf16, else the loop. CPU with more than one thread: bmm while rows per expert <=
    ``BMM_MAX_ROWS_PER_EXPERT`` and padding <= ``BMM_MAX_PADDING`` (reads the counts: a host sync, free on the CPU);
    otherwise grouped_mm. grouped_mm needs rows of 16-byte multiples (``d`` and ``d_ff``); where they are not, the
    loop, as under ``torch.compile`` for fp32 (grouped_mm's fake kernel refuses it).
    """
    S, E = x_SD.shape[0], counts_E.shape[0]
    if S == 0:  # grouped_mm's backward fails on zero rows (torch 2.13); the loop keeps an empty result in the graph
        return "loop"
    grouped_ok = GROUPED_MM is not None and all(n * x_SD.element_size() % 16 == 0 for n in (x_SD.shape[1], d_ff))
    if torch.compiler.is_compiling() and x_SD.dtype != torch.bfloat16:  # its fake kernel takes bf16 only (2.13)
        grouped_ok = False
    if x_SD.device.type != "cpu":
        return "grouped_mm" if grouped_ok and x_SD.dtype == torch.bfloat16 else "loop"
    if x_SD.dtype not in (torch.float32, torch.bfloat16):
        return "loop"
    small = S <= BMM_MAX_ROWS_PER_EXPERT * E and torch.get_num_threads() > 1
    if small and E * int(counts_E.max()) <= (1 + BMM_MAX_PADDING) * S:
        return "bmm"
    return "grouped_mm" if grouped_ok else "loop"


class _SwiGLU(torch.autograd.Function):
    """``h = silu(gate) * up`` saving one activation fewer than autograd's two ops.

    Forward keeps ``gate`` and ``up`` (not ``silu(gate)``: the backward recomputes it) and writes the product into
    the silu output. Backward: ``d_up = g * silu(gate)`` (in place into the recomputed silu) and ``d_gate =
    silu'(gate) * (g * up)`` (``silu_backward`` in place into ``g * up``): two fresh buffers, where autograd takes
    three. Saved for backward at the default model's shape: 21.2 instead of 25.4 MiB per MoE layer (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        d_gate = torch.mul(grad_h, up)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        d_up = F.silu(gate).mul_(grad_h)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes); the autograd function above when a gradient is needed."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


def swiglu_experts(
    x_SD: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """``y_SD [S, d]`` for expert-sorted rows ``x_SD [S, d]``; ``impl`` one of ``IMPLS`` ("auto": ``pick_impl``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        impl = pick_impl(x_SD, counts_E, w_gate.shape[2])
    if impl == "grouped_mm":
        if GROUPED_MM is None:
            raise ValueError("impl='grouped_mm': this torch has no torch.nn.functional.grouped_mm")
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_SF = swiglu(GROUPED_MM(x_SD, w_gate, offs=offs_E), GROUPED_MM(x_SD, w_up, offs=offs_E))
        return GROUPED_MM(h_SF, w_down, offs=offs_E)
    if impl == "bmm":
        return _padded_bmm(x_SD, counts_E, w_gate, w_up, w_down)
    return _loop(x_SD, counts_E, w_gate, w_up, w_down)


def padded_rows(counts_E: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(C, pad_S)``: C = max count, and ``pad_S[r] = e * C + (r - offset_e)`` for row r of expert e."""
    counts = counts_E.long()
    C = int(counts.max()) if counts.numel() else 0
    S = int(counts.sum())
    start_E = torch.cumsum(counts, 0) - counts
    expert_S = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=S)
    shift_E = torch.arange(counts.numel(), device=counts.device) * C - start_E
    return C, torch.arange(S, device=counts.device) + shift_E[expert_S]


def _padded_bmm(x_SD, counts_E, w_gate, w_up, w_down):
    E, d, _ = w_gate.shape
    C, pad_S = padded_rows(counts_E)
    if E * C == x_SD.shape[0]:  # every expert has C rows: the sorted rows are the block already
        x_ECD = x_SD.view(E, C, d)
    else:
        x_ECD = x_SD.new_zeros(E * C, d).index_copy(0, pad_S, x_SD).view(E, C, d)
    h_ECF = swiglu(torch.bmm(x_ECD, w_gate), torch.bmm(x_ECD, w_up))
    y_PD = torch.bmm(h_ECF, w_down).view(E * C, d)
    return y_PD if E * C == x_SD.shape[0] else y_PD.index_select(0, pad_S)


def _loop(x_SD, counts_E, w_gate, w_up, w_down):
    outs = []
    blocks = torch.split(x_SD, counts_E.tolist())
    for x_nD, g_DF, u_DF, down_FD in zip(blocks, w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)):
        if x_nD.shape[0]:
            outs.append(swiglu(x_nD @ g_DF, x_nD @ u_DF) @ down_FD)
    # no rows at all: an empty result that stays in the graph, so an expert-parallel backward still runs both
    # exchanges on this rank (a rank left out of a collective would hang its peers)
    return torch.cat(outs) if outs else x_SD * 0.0
