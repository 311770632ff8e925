"""Expert-sorted permute and deterministic combine in Triton, with their backward kernels.

Same signatures and semantics as ``reference.slot_rows / permute / unpermute / permute_backward /
unpermute_backward``. Imported lazily by ``moe/kernels/ops.py`` only when ``impl="triton"`` runs.

Shapes: T = tokens, E = experts (at most ``moe.kernels.MAX_EXPERTS``), K = experts per token, D = hidden size,
S = T*K slots (slot ``s = t*K + j``), B = number of slot blocks (each ``chunks`` chunks of ``CHUNK`` slots).

Slot positions (no per-slot atomics, no sort):

1. ``_slot_histogram_kernel``: block b counts its slots per expert, ``hist_BE[b, e]`` (one-hot column sums).
2. ``_block_scan_kernel``: ``base_BE[b, e] = offset_e + sum_{b' < b} hist_BE[b', e]`` with
   ``offset_e = sum_{e' < e} counts_e'``; an exclusive scan down each expert's column, chunk by chunk.
3. ``_slot_rows_kernel``: ``rows[s] = base_BE[b, e] + local rank``, the local rank being an inclusive
   ``tl.cumsum`` of a chunk's one-hot ``[CHUNK, BLOCK_E]`` matrix read at the slot's own expert, minus 1, plus
   the block's running per-expert count of the earlier chunks.

Data movement (each output row written by exactly one program, fixed summation order, so bitwise deterministic):

- ``_scatter_rows_kernel`` (permute): ``x_sorted[rows[t, j]] = x[t]``, reading each token row once for its K copies.
- ``_gather_rows_kernel`` (unpermute, and permute's backward): ``out[t] = sum_j w[t, j] * y[rows[t, j]]``,
  j = 0..K-1 in order, fp32 accumulation.
- ``_unpermute_bwd_kernel``: ``grad_y[rows[t, j]] = w[t, j] * g[t]`` and ``grad_w[t, j] = <g[t], y[rows[t, j]]>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels.triton_router import sm_count


@triton.jit
def _slot_histogram_kernel(ids_ptr, hist_ptr, S, E, chunks, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    counts = tl.zeros([CHUNK, BLOCK_E], dtype=tl.int32)  # reduced over the chunk's rows once, at the end
    for c in range(chunks):
        slots = (pid * chunks + c) * CHUNK + tl.arange(0, CHUNK)
        expert = tl.load(ids_ptr + slots, mask=slots < S, other=-1)
        counts += (expert[:, None] == cols[None, :]).to(tl.int32)
    tl.store(hist_ptr + pid * E + cols, tl.sum(counts, axis=0), mask=cols < E)


@triton.jit
def _block_scan_kernel(
    hist_ptr, counts_ptr, base_ptr, B, E, BLOCK_B: tl.constexpr, BLOCK_EC: tl.constexpr, BLOCK_E: tl.constexpr
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_EC + tl.arange(0, BLOCK_EC)  # this program's experts
    col_ok = cols < E
    # offset_e = sum of the counts of the experts before e
    all_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + all_e, mask=all_e < E, other=0)
    carry = tl.sum(tl.where(all_e[:, None] < cols[None, :], counts[:, None], 0), axis=0)
    for b0 in range(0, B, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        ok = (blocks < B)[:, None] & col_ok[None, :]
        off = blocks[:, None].to(tl.int64) * E + cols[None, :]
        h = tl.load(hist_ptr + off, mask=ok, other=0)
        inclusive = tl.cumsum(h, axis=0)
        tl.store(base_ptr + off, inclusive - h + carry[None, :], mask=ok)
        carry += tl.sum(h, axis=0)


@triton.jit
def _slot_rows_kernel(ids_ptr, base_ptr, rows_ptr, S, E, chunks, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)  # slots of this block already seen, per expert
    for c in range(chunks):
        slots = (pid * chunks + c) * CHUNK + tl.arange(0, CHUNK)
        slot_ok = slots < S
        expert = tl.load(ids_ptr + slots, mask=slot_ok, other=-1)
        onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
        seen = tl.cumsum(onehot, axis=0) + carry[None, :]  # slots <= this one in the block, on each expert
        rank = tl.sum(onehot * seen, axis=1) - 1
        base = tl.load(base_ptr + pid * E + expert, mask=slot_ok, other=0)
        tl.store(rows_ptr + slots, base + rank, mask=slot_ok)
        carry += tl.sum(onehot, axis=0)


@triton.jit
def _scatter_rows_kernel(
    x_ptr, rows_ptr, out_ptr, T, D, K, stride_x, stride_out, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < T
    ok = tok_ok[:, None] & (dcols < D)[None, :]
    x = tl.load(x_ptr + toks[:, None].to(tl.int64) * stride_x + dcols[None, :], mask=ok)
    for j in range(K):
        row = tl.load(rows_ptr + toks.to(tl.int64) * K + j, mask=tok_ok, other=0).to(tl.int64)
        tl.store(out_ptr + row[:, None] * stride_out + dcols[None, :], x, mask=ok)


@triton.jit
def _gather_rows_kernel(
    y_ptr,
    weights_ptr,
    rows_ptr,
    out_ptr,
    T,
    D,
    K,
    stride_y,
    stride_out,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < T
    ok = tok_ok[:, None] & (dcols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(K):
        slot = toks.to(tl.int64) * K + j
        row = tl.load(rows_ptr + slot, mask=tok_ok, other=0).to(tl.int64)
        y = tl.load(y_ptr + row[:, None] * stride_y + dcols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + slot, mask=tok_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * y
        else:
            acc += y
    out_ptrs = out_ptr + toks[:, None].to(tl.int64) * stride_out + dcols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unpermute_bwd_kernel(
    grad_out_ptr,
    y_ptr,
    weights_ptr,
    rows_ptr,
    grad_y_ptr,
    grad_w_ptr,
    T,
    D,
    K,
    stride_g,
    stride_y,
    stride_gy,
    NEED_GRAD_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    for j in range(K):
        slot = toks.to(tl.int64) * K + j
        row = tl.load(rows_ptr + slot, mask=tok_ok, other=0).to(tl.int64)
        w = tl.load(weights_ptr + slot, mask=tok_ok, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            ok = tok_ok[:, None] & (dcols < D)[None, :]
            g = tl.load(grad_out_ptr + toks[:, None].to(tl.int64) * stride_g + dcols[None, :], mask=ok, other=0.0)
            g = g.to(tl.float32)
            gy = (w[:, None] * g).to(grad_y_ptr.dtype.element_ty)
            tl.store(grad_y_ptr + row[:, None] * stride_gy + dcols[None, :], gy, mask=ok)
            if NEED_GRAD_W:
                y = tl.load(y_ptr + row[:, None] * stride_y + dcols[None, :], mask=ok, other=0.0).to(tl.float32)
                dot += tl.sum(g * y, axis=1)
        if NEED_GRAD_W:
            tl.store(grad_w_ptr + slot, dot.to(grad_w_ptr.dtype.element_ty), mask=tok_ok)


def _slot_tiles(S: int, E: int, device: torch.device, chunk: int | None, chunks: int | None) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_E, chunks per block): one-hot chunks of about 8192 int32, and enough chunks per block that the
    ``[B, E]`` histogram stays small (about 4 blocks per SM on a GPU, at most 64 blocks in the interpreter)."""
    block_e = triton.next_power_of_2(E)
    chunk = chunk or max(16, 8192 // block_e)
    target_blocks = 4 * sm_count(device) if device.type == "cuda" else 64
    return chunk, block_e, chunks or max(1, triton.cdiv(triton.cdiv(S, chunk), target_blocks))


def _row_tiles(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) for the row-copy kernels: 16-byte-plus vectors along D, 4096 elements a tile."""
    block_d = min(triton.next_power_of_2(D), 512)
    return max(1, 4096 // block_d), block_d


def slot_rows(
    ids: torch.Tensor, counts: torch.Tensor, *, chunk: int | None = None, chunks_per_block: int | None = None
) -> torch.Tensor:
    """Triton launcher of ``reference.slot_rows``: ``rows_TK [T, K]`` int32. ``chunk`` (slots per one-hot tile,
    a power of two) and ``chunks_per_block`` override the tiling (tests, tuning)."""
    T, K = ids.shape
    E = counts.shape[0]
    S = T * K
    ids_S = ids.to(torch.int32).contiguous().view(-1)
    rows = torch.empty(T, K, dtype=torch.int32, device=ids.device)
    if S == 0:
        return rows
    chunk, block_e, chunks = _slot_tiles(S, E, ids.device, chunk, chunks_per_block)
    B = triton.cdiv(S, chunk * chunks)
    hist = torch.empty(B, E, dtype=torch.int32, device=ids.device)
    # 8 warps: the [CHUNK, BLOCK_E] one-hot tiles are 8192 int32 (136 registers a thread on 4 warps, ptxas sm_90a)
    _slot_histogram_kernel[(B,)](ids_S, hist, S, E, chunks, CHUNK=chunk, BLOCK_E=block_e, num_warps=8)
    base = torch.empty_like(hist)
    block_ec = min(block_e, 32)
    _block_scan_kernel[(triton.cdiv(E, block_ec),)](
        hist, counts.to(torch.int32).contiguous(), base, B, E, BLOCK_B=64, BLOCK_EC=block_ec, BLOCK_E=block_e
    )
    _slot_rows_kernel[(B,)](ids_S, base, rows, S, E, chunks, CHUNK=chunk, BLOCK_E=block_e, num_warps=8)
    return rows


def permute(x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``reference.permute``: ``(x_sorted [T*K, D], rows_TK [T, K] int32)``."""
    T, K = ids.shape
    rows = slot_rows(ids, counts)
    x = x.contiguous()
    D = x.shape[1]
    out = torch.empty(T * K, D, dtype=x.dtype, device=x.device)
    if T == 0 or D == 0:
        return out, rows
    block_t, block_d = _row_tiles(D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _scatter_rows_kernel[grid](x, rows, out, T, D, K, x.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_D=block_d)
    return out, rows


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Triton launcher of ``reference.unpermute``: ``out [T, D]`` in ``y_sorted.dtype``."""
    T, K = rows.shape
    y_sorted = y_sorted.contiguous()
    D = y_sorted.shape[1]
    out = torch.empty(T, D, dtype=y_sorted.dtype, device=y_sorted.device)
    if T == 0 or D == 0:
        return out
    rows = rows.to(torch.int32).contiguous()
    block_t, block_d = _row_tiles(D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _gather_rows_kernel[grid](
        y_sorted,
        rows if weights is None else weights.contiguous(),  # unread when HAS_WEIGHTS=False
        rows,
        out,
        T,
        D,
        K,
        y_sorted.stride(0),
        out.stride(0),
        HAS_WEIGHTS=weights is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def permute_backward(grad_x_sorted: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Triton launcher of ``reference.permute_backward``: ``grad_x [T, D]``."""
    return unpermute(grad_x_sorted, None, rows)


def unpermute_backward(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, need_grad_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton launcher of ``reference.unpermute_backward``: ``(grad_y_sorted [T*K, D], grad_weights [T, K] | None)``."""
    T, K = rows.shape
    y_sorted = y_sorted.contiguous()
    grad_out = grad_out.contiguous()
    D = y_sorted.shape[1]
    grad_y = torch.empty_like(y_sorted)
    grad_w = torch.empty(T, K, dtype=weights.dtype, device=weights.device) if need_grad_weights else None
    if T == 0:
        return grad_y, grad_w
    if D == 0:
        return grad_y, None if grad_w is None else grad_w.zero_()
    block_t, block_d = _row_tiles(D)
    block_t = min(block_t, 32)  # the grid is over tokens only: keep enough programs
    _unpermute_bwd_kernel[(triton.cdiv(T, block_t),)](
        grad_out,
        y_sorted,
        weights.contiguous(),
        rows.to(torch.int32).contiguous(),
        grad_y,
        grad_y if grad_w is None else grad_w,  # unread when NEED_GRAD_W=False
        T,
        D,
        K,
        grad_out.stride(0),
        y_sorted.stride(0),
        grad_y.stride(0),
        NEED_GRAD_W=need_grad_weights,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return grad_y, grad_w
