"""Fused router in Triton: one read of the logits gives top-k weights/ids, expert counts, score sums and logsumexp.

Same signatures and semantics as ``reference.fused_router`` / ``reference.fused_router_backward`` (ties, ``-inf``,
renormalisation and the gradient formulas are documented there). Imported lazily by ``moe/kernels/ops.py``, only
when ``impl="triton"`` runs, so the package imports without triton. Triton decides at kernel-definition time
(this module's import) whether it interprets (``TRITON_INTERPRET=1``, CPU tensors) or compiles for the GPU.

Shapes: T = tokens, E = experts (at most ``moe.kernels.MAX_EXPERTS``), K = experts per token.

Forward, per program (a contiguous run of ``rows_per_program`` rows, ``BLOCK_T`` rows at a time, the whole row of
E logits in registers):

1. ``x`` = the ``[BLOCK_T, BLOCK_E]`` tile in fp32; ``m = max x``, ``d = sum exp(x - m)``, ``lse = m + log d``
   (the online normaliser of Milakov & Gimelshein collapses to this because a row fits one tile).
2. Scores ``p`` (softmax ``exp(x - m) / d`` or sigmoid) and the distribution ``q`` (``p``, or sigmoid scores over
   their row sum) are computed; ``q`` is accumulated elementwise into a register tile.
3. Top-k on packed keys instead of argmax: each logit becomes one integer, ``order_bits(x) << S | (BLOCK_E-1-col)``
   (int32 keys for 16-bit logits, int64 for others; see ``_sort_keys``). Keys are unique per row, a larger key is
   a larger logit or, on equal logits, the lower id, so one ``max`` per round finds both the value and the id,
   and the ids and logits decode from the keys. Two strategies (``_use_bitonic``): K rounds of "take the max,
   knock it out", or Triton's bitonic ``tl.topk``. With a selection bias the keys come from the fp32 values
   ``p + bias`` (``-inf`` logits kept at ``-inf``) and the weights from the logits gathered at the chosen ids.
4. The selected ``[BLOCK_T, BLOCK_E]`` entries (knocked out, or ``key >= k-th key``) are accumulated into a
   second register tile; both tiles are reduced over rows once per program into the block-local histograms.
5. At the end, one int32 atomic per expert for the counts and one fp32 atomic per expert for the score sums, per
   program. (Integer atomics are exact; the fp32 ``prob_sums`` depend on the atomics' order at rounding level.)

Backward, per ``BLOCK_T`` rows: recompute ``p`` from the logits and the saved ``lse``, apply the dense term, then add
the K per-slot terms onto their columns with K compare-selects.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _sort_keys(x_raw, ok, cols, BLOCK_E: tl.constexpr, KEY16: tl.constexpr):
    """Unique per-row sort keys: larger logit -> larger key, equal logits -> lower column -> larger key.

    ``key = order_bits(x) << S | (BLOCK_E - 1 - col)`` where ``order_bits`` reinterprets the float's bits as a
    signed int with the float's order (negative floats get their magnitude bits flipped; -0.0 becomes +0.0).
    16-bit logits (bf16/fp16) use their raw 16 bits and an int32 key (S = 16); others go through fp32 and an
    int64 key (S = 32). Entries outside ``ok`` get the lowest high part, below every real key (-inf included).
    """
    low = BLOCK_E - 1 - cols
    if KEY16:
        bits = x_raw.to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where(bits == -32768, 0, bits)
        bits = tl.where(bits < 0, bits ^ 0x7FFF, bits)
        bits = tl.where(ok, bits, -32768)
        key = (bits << 16) | low[None, :]
    else:
        bits = x_raw.to(tl.float32).to(tl.int32, bitcast=True)
        bits = tl.where(bits == _INT32_MIN, 0, bits)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        bits = tl.where(ok, bits, _INT32_MIN)
        key = (bits.to(tl.int64) << 32) | low[None, :].to(tl.int64)
    return key


@triton.jit
def _decode_keys(key, logits_ptr, BLOCK_E: tl.constexpr, KEY16: tl.constexpr):
    """Inverse of ``_sort_keys``: (expert id int32, fp32 logit); ``logits_ptr`` gives the 16-bit float type."""
    if KEY16:
        ids = BLOCK_E - 1 - (key & 0xFFFF)
        high = key >> 16
        raw = tl.where(high < 0, high ^ 0x7FFF, high).to(tl.int16)
        x = raw.to(logits_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    else:
        ids = BLOCK_E - 1 - key.to(tl.int32)  # the low 32 bits
        high = (key >> 32).to(tl.int32)
        x = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)
    return ids, x


@triton.jit
def _take_largest(work, top, kcols, j, PAD: tl.constexpr):
    """One round of top-k on unique keys: move each row's largest remaining key to column j of ``top``."""
    best = tl.max(work, axis=1)
    top = tl.where(kcols[None, :] == j, best[:, None], top)
    work = tl.where(work == best[:, None], PAD, work)
    return work, top


@triton.jit
def _router_fwd_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    counts_ptr,
    prob_sums_ptr,
    lse_ptr,
    bias_ptr,
    T,
    E,
    stride_t,
    rows_per_program,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KEY16: tl.constexpr,
    BITONIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if KEY16:  # the smallest key: below every real key, -inf's included
        PAD: tl.constexpr = -2147483648
    else:
        PAD: tl.constexpr = -9223372036854775807 - 1
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    kcols = tl.arange(0, BLOCK_K)
    k_ok = kcols < K
    # per-(row slot, expert) partial histograms, reduced over rows once at the end, not once per tile
    hist_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    psum_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    first_row = pid * rows_per_program
    for sub in range(0, rows_per_program, BLOCK_T):
        rows = first_row + sub + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        ok = row_ok[:, None] & col_ok[None, :]
        x_raw = tl.load(
            logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=ok, other=float("-inf")
        )
        x = x_raw.to(tl.float32)

        # normaliser; an all -inf row keeps m_safe = 0 so that exp gives 0, not NaN
        m = tl.max(x, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m_safe[:, None])
        d = tl.sum(e, axis=1)
        d_safe = tl.where(d > 0, d, 1.0)  # d = 0 only on all -inf rows (and padding rows)
        inv_d = tl.where(d > 0, 1.0 / d_safe, 0.0)
        tl.store(lse_ptr + rows, tl.where(d > 0, m_safe + tl.log(d_safe), float("-inf")), mask=row_ok)
        if SIGMOID:
            p = tl.where(ok, tl.sigmoid(x), 0.0)
            s_sum = tl.sum(p, axis=1)  # the distribution is s / sum(s); 0 on a row of zeros
            inv_s = tl.where(s_sum > 0, 1.0 / tl.where(s_sum > 0, s_sum, 1.0), 0.0)
            psum_TE += p * inv_s[:, None]
        else:
            p = e * inv_d[:, None]
            psum_TE += tl.where(ok, p, 0.0)

        # top-k on unique keys, descending; `selected` marks the K chosen entries of the tile
        if HAS_BIAS:
            key = _sort_keys(tl.where(x == float("-inf"), float("-inf"), p + bias[None, :]), ok, cols, BLOCK_E, False)
        else:
            key = _sort_keys(x_raw, ok, cols, BLOCK_E, KEY16)
        if BITONIC:
            top = tl.topk(key, BLOCK_K)  # bitonic top-k, sorted descending
            kth = tl.min(tl.where(k_ok[None, :], top, -PAD - 1), axis=1)
            selected = (key >= kth[:, None]) & ok
        else:
            top = tl.full([BLOCK_T, BLOCK_K], PAD, key.dtype)
            work = key
            if K <= 16:
                for j in tl.static_range(K):
                    work, top = _take_largest(work, top, kcols, j, PAD)
            else:
                for j in range(K):
                    work, top = _take_largest(work, top, kcols, j, PAD)
            selected = (work == PAD) & ok
        hist_TE += selected.to(tl.int32)

        sel_ids, x_sel = _decode_keys(top, logits_ptr, BLOCK_E, KEY16)
        out_ok = row_ok[:, None] & k_ok[None, :]
        if HAS_BIAS:  # the keys hold p + bias: take the chosen experts' logits from memory (the row is in cache)
            sel_off = rows[:, None].to(tl.int64) * stride_t + sel_ids
            x_sel = tl.load(logits_ptr + sel_off, mask=out_ok, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            w = tl.sigmoid(x_sel)
        else:
            w = tl.exp(x_sel - m_safe[:, None]) * inv_d[:, None]
        w = tl.where(k_ok[None, :], w, 0.0)
        if RENORMALIZE:
            total = tl.sum(w, axis=1)
            w = w * tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)[:, None]
        out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
        tl.store(weights_ptr + out_off, w, mask=out_ok)
        tl.store(ids_ptr + out_off, sel_ids, mask=out_ok)

    # plain accumulations: no ordering needed, so relaxed atomics
    tl.atomic_add(counts_ptr + cols, tl.sum(hist_TE, axis=0), mask=col_ok, sem="relaxed")
    tl.atomic_add(prob_sums_ptr + cols, tl.sum(psum_TE, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _router_bwd_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    lse_ptr,
    grad_weights_ptr,
    grad_prob_sums_ptr,
    grad_lse_ptr,
    grad_logits_ptr,
    T,
    E,
    K,
    stride_t,
    stride_gt,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_GL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    row_off = rows.to(tl.int64) * stride_t
    x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    q = tl.exp(x - lse_safe[:, None])  # softmax probabilities; 0 on padding and on all -inf rows

    grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    coef = tl.zeros([BLOCK_T], dtype=tl.float32)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    if HAS_GW:
        kcols = tl.arange(0, BLOCK_K)
        tk_ok = row_ok[:, None] & (kcols < K)[None, :]
        tk_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
        gw_tile = tl.load(grad_weights_ptr + tk_off, mask=tk_ok, other=0.0).to(tl.float32)
        w_tile = tl.load(weights_ptr + tk_off, mask=tk_ok, other=0.0)
        dot = tl.sum(gw_tile * w_tile, axis=1)
    if SIGMOID:
        s = tl.where(ok, tl.sigmoid(x), 0.0)
        if HAS_GP:  # through q = s / sum(s): s (1 - s) / S * (gP - <gP, q>)
            gp = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            s_sum = tl.sum(s, axis=1)
            inv_s = tl.where(s_sum > 0, 1.0 / tl.where(s_sum > 0, s_sum, 1.0), 0.0)
            gpq = tl.sum(s * gp[None, :], axis=1) * inv_s
            grad += s * (1.0 - s) * inv_s[:, None] * (gp[None, :] - gpq[:, None])
        if HAS_GL:
            coef += tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            grad += q * coef[:, None]
    else:
        if HAS_GP:
            gp = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad += q * gp[None, :]
            coef -= tl.sum(q * gp[None, :], axis=1)
        if HAS_GL:
            coef += tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_GW and not RENORMALIZE:
            coef -= dot
        grad += q * coef[:, None]

    if HAS_GW:
        # add each choice's term onto its expert's column (the K ids of a row are distinct)
        for j in range(K):
            tj_off = rows.to(tl.int64) * K + j
            gw_j = tl.load(grad_weights_ptr + tj_off, mask=row_ok, other=0.0).to(tl.float32)
            w_j = tl.load(weights_ptr + tj_off, mask=row_ok, other=0.0)
            id_j = tl.load(ids_ptr + tj_off, mask=row_ok, other=-1)
            if SIGMOID:
                if RENORMALIZE:
                    x_j = tl.load(logits_ptr + row_off + id_j, mask=row_ok, other=0.0).to(tl.float32)
                    term = (gw_j - dot) * w_j * (1.0 - tl.sigmoid(x_j))
                else:
                    term = gw_j * w_j * (1.0 - w_j)
            else:
                if RENORMALIZE:
                    term = w_j * (gw_j - dot)
                else:
                    term = w_j * gw_j
            grad += tl.where(cols[None, :] == id_j[:, None], term[:, None], 0.0)

    out_ptrs = grad_logits_ptr + rows[:, None].to(tl.int64) * stride_gt + cols[None, :]
    tl.store(out_ptrs, grad.to(grad_logits_ptr.dtype.element_ty), mask=ok)


def _use_bitonic(block_e: int, topk: str) -> bool:
    """Top-k strategy: K rounds of (max, knock out) on the keys, or Triton's bitonic ``tl.topk``.

    "auto" takes bitonic from 128 experts on: a guess from operation counts (K rounds cost about K passes over
    the row, the bitonic top-k about log2(K) * (log2(K) + 1) / 2 passes plus a shrinking tail), to be settled by
    ``benchmarks/bench_router.py --sweep`` on the GPU.
    """
    if topk not in ("auto", "rounds", "bitonic"):
        raise ValueError(f"topk={topk!r}: expected 'auto', 'rounds' or 'bitonic'")
    return topk == "bitonic" or (topk == "auto" and block_e >= 128)


def _tiles(E: int, k: int, block_t: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps): whole rows, about 8 logits per thread (1024-logit tiles on 4 warps,
    2048 on 8 warps from E=512). ``ptxas -v`` for sm_90a at these tiles (no GPU needed): bf16 logits 72-115
    registers and fp32 logits 96-168, no spills, for E in {8, 64, 256}; 2048-logit tiles on 4 warps spill with
    fp32 logits at E=64. Timings on a GPU may move this (``benchmarks/bench_router.py --sweep``)."""
    block_e = triton.next_power_of_2(E)
    block_k = triton.next_power_of_2(k)
    tile, num_warps = (2048, 8) if block_e >= 512 else (1024, 4)
    if block_t is None:
        block_t = max(1, min(128, tile // block_e))
    return block_t, block_e, block_k, num_warps


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (cached)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _rows_per_program(T: int, block_t: int, device: torch.device, rows_per_program: int | None) -> int:
    """Rows per program, a multiple of ``block_t``: about 8 programs per SM on a GPU, so the histogram atomics
    stay at ``8 * num_SMs * E`` per call; one tile per program in the interpreter (it is faster there)."""
    if rows_per_program is not None:
        if rows_per_program <= 0 or rows_per_program % block_t:
            raise ValueError(f"rows_per_program={rows_per_program}: expected a positive multiple of {block_t}")
        return rows_per_program
    if device.type != "cuda":
        return block_t
    programs = 8 * sm_count(device)
    tiles = triton.cdiv(T, block_t)
    return block_t * max(1, triton.cdiv(tiles, programs))


def fused_router(
    logits: torch.Tensor,
    k: int,
    score: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    rows_per_program: int | None = None,
    topk: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of ``reference.fused_router``: ``logits [T, E]``, ``bias [E]`` fp32 or None -> (weights_TK
    fp32, ids_TK int32, counts_E int32, prob_sums_E fp32, lse_T fp32). ``block_t``, ``rows_per_program`` and
    ``topk`` ("auto", "rounds", "bitonic") override the tiling and the top-k strategy (tests, tuning)."""
    logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    prob_sums = torch.zeros(E, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return weights, ids, counts, prob_sums, lse
    block_t, block_e, block_k, num_warps = _tiles(E, k, block_t)
    rpp = _rows_per_program(T, block_t, dev, rows_per_program)
    _router_fwd_kernel[(triton.cdiv(T, rpp),)](
        logits,
        weights,
        ids,
        counts,
        prob_sums,
        lse,
        lse if bias is None else bias.contiguous(),  # lse stands in for an absent bias; never read then
        T,
        E,
        logits.stride(0),
        rpp,
        K=k,
        SIGMOID=score == "sigmoid",
        RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None,
        KEY16=logits.element_size() == 2 and bias is None,
        BITONIC=_use_bitonic(block_e, topk),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return weights, ids, counts, prob_sums, lse


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
    *,
    block_t: int | None = None,
) -> torch.Tensor:
    """Triton launcher of ``reference.fused_router_backward``: ``grad_logits [T, E]`` in ``logits.dtype``."""
    logits = logits.contiguous()
    T, E = logits.shape
    k = ids.shape[1]
    grad_logits = torch.empty_like(logits)
    if T == 0:
        return grad_logits
    block_t, block_e, block_k, num_warps = _tiles(E, k, block_t)
    dummy = lse  # stands in for an absent gradient; the kernel never reads it
    _router_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits,
        weights.contiguous(),
        ids.contiguous(),
        lse.contiguous(),
        dummy if grad_weights is None else grad_weights.contiguous(),
        dummy if grad_prob_sums is None else grad_prob_sums.contiguous(),
        dummy if grad_lse is None else grad_lse.contiguous(),
        grad_logits,
        T,
        E,
        k,
        logits.stride(0),
        grad_logits.stride(0),
        SIGMOID=score == "sigmoid",
        RENORMALIZE=renormalize,
        HAS_GW=grad_weights is not None,
        HAS_GP=grad_prob_sums is not None,
        HAS_GL=grad_lse is not None,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return grad_logits
