"""Fused router and permute/unpermute: Triton kernels (run on the CPU by Triton's interpreter) vs the PyTorch reference.

Coverage:
1. Router forward and every gradient (through weights, prob_sums and lse, each alone and together), Triton vs
   reference, over awkward shapes, both score functions, with and without renormalisation, both top-k strategies.
2. The reference tied to the library: weights/ids/counts equal ``moe.nn.routing.route``; the Switch aux loss and the
   z-loss built from prob_sums/lse equal ``moe.nn.losses``, gradients included; the hand-derived backward equals
   autograd through the dense formulas.
3. Edge semantics: ties to the lower id, -0.0 vs +0.0, -inf entries, rows with fewer than k finite logits,
   all -inf rows, all tokens on one expert; bf16/fp16/fp32 logits with per-dtype tolerances.
4. Dispatch metadata invariants (rows form a permutation, contiguous per expert, stable by slot) apart from the data
   movement; permute/unpermute forward and gradients; permute then unpermute with one-hot weights is the identity.
5. API: validation errors, impl resolution, custom-op registration (opcheck) and torch.compile tracing around the ops.
6. On a GPU (``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels.py``): the compiled kernels vs the reference at
   sizes with many programs, with the launchers' default tiles.
7. Without a GPU: every kernel compiles to PTX for sm_90 (marked slow; the interpreter accepts code the compiler
   rejects).

Everything is tiny: the interpreter runs each Triton program in numpy. ``conftest.py`` sets TRITON_INTERPRET=1 before
any kernel module is imported (Triton reads it when a kernel is defined, i.e. at ``moe.kernels.triton_*`` import).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from moe import kernels
from moe.kernels import ops
from moe.kernels import reference as ref
from moe.nn.losses import load_balancing_loss, router_z_loss
from moe.nn.routing import route

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# numpy (the interpreter) warns on exp(+inf) inside tl.sigmoid(-inf), whose result 1 / (1 + inf) = 0 is intended
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py)"
)

# Shapes (T, E, k), each with the reason it is here.
ROUTER_SHAPES = [
    pytest.param(5, 8, 2, id="T<block"),  # 5 rows in a 128-row tile: the row mask is mostly padding
    pytest.param(37, 13, 3, id="primeE"),  # prime E: 3 padded columns in the 16-wide tile, T not a power of 2
    pytest.param(16, 8, 1, id="k=1"),  # a single top-k round; bitonic top-k degenerates to a max
    pytest.param(9, 6, 6, id="k=E"),  # every expert chosen: weights are the whole sorted distribution
    pytest.param(7, 1, 1, id="E=1"),  # one expert: weight 1 (softmax), lse = the logit itself
    pytest.param(20, 64, 8, id="E64k8"),  # a realistic width, k=8
]

# Tolerances for values stored in a given dtype: (atol, rtol). Router math is fp32 in both implementations, so fp32
# outputs agree to fp32 rounding; the logits gradient is rounded to the logits dtype, about 2 ulp of that dtype.
FP32_OUT = dict(atol=1e-6, rtol=1e-5)
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2),
    torch.float16: dict(atol=1e-5, rtol=2e-3),
}


def _logits(T: int, E: int, dtype=torch.float32, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * scale).to(dtype)


def _upstream(outs, which: str, seed: int = 1):
    """Random incoming gradients for (weights, prob_sums, lse); 'which' selects one of them or 'all'."""
    weights, _, _, prob_sums, lse = outs
    g = torch.Generator().manual_seed(seed)
    grads = {
        "weights": torch.randn(weights.shape, generator=g),
        "prob_sums": torch.randn(prob_sums.shape, generator=g),
        "lse": torch.randn(lse.shape, generator=g),
    }
    loss = 0.0
    for name, out in (("weights", weights), ("prob_sums", prob_sums), ("lse", torch.where(lse.isfinite(), lse, 0))):
        if which in (name, "all"):
            loss = loss + (out * grads[name]).sum()
    return loss


def _router_run(logits, k, score, renormalize, impl, which="all", bias=None, **launch):
    """Forward outputs and d(loss)/d(logits). ``launch`` (tiling overrides) calls the Triton launcher directly."""
    x = logits.clone().requires_grad_()
    if launch:
        from moe.kernels import triton_router

        outs = triton_router.fused_router(x.detach(), k, score, renormalize, bias, **launch)
        grad = triton_router.fused_router_backward(
            x.detach(), outs[0], outs[1], outs[4], *_split_grads(outs, which), score, renormalize
        )
        return outs, grad
    outs = kernels.fused_router(x, k, score, renormalize, impl=impl, bias=bias)
    _upstream(outs, which).backward()
    return outs, x.grad


def _split_grads(outs, which):
    w = outs[0].detach().requires_grad_()
    ps = outs[3].detach().requires_grad_()
    lse = outs[4].detach().requires_grad_()
    _upstream((w, None, None, ps, lse), which).backward()
    return w.grad, ps.grad, lse.grad


def _assert_router_equal(a, b, tol=FP32_OUT):
    (wa, ia, ca, pa, la), (wb, ib, cb, pb, lb) = a, b
    torch.testing.assert_close(ia, ib, rtol=0, atol=0)
    torch.testing.assert_close(ca, cb, rtol=0, atol=0)
    torch.testing.assert_close(wa, wb, **tol)
    torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)  # sums over T rows: summation order differs
    torch.testing.assert_close(la, lb, **tol)  # -inf == -inf counts as equal


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton vs reference
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("T,E,k", ROUTER_SHAPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_triton_matches_reference(T, E, k, score, renormalize):
    logits = _logits(T, E)
    outs_t, grad_t = _router_run(logits, k, score, renormalize, "triton")
    outs_r, grad_r = _router_run(logits, k, score, renormalize, "torch")
    _assert_router_equal(outs_t, outs_r)
    assert outs_t[0].dtype == torch.float32 and outs_t[1].dtype == torch.int32 and outs_t[2].dtype == torch.int32
    torch.testing.assert_close(grad_t, grad_r, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("which", ["weights", "prob_sums", "lse"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_each_gradient_alone(which, score, renormalize):
    # each incoming gradient on its own, so that no term hides behind a larger one
    logits = _logits(19, 13, seed=3)
    _, grad_t = _router_run(logits, 3, score, renormalize, "triton", which=which)
    _, grad_r = _router_run(logits, 3, score, renormalize, "torch", which=which)
    assert grad_r.abs().max() > 1e-3  # the term is not trivially zero
    torch.testing.assert_close(grad_t, grad_r, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("topk", ["rounds", "bitonic"])
@pytest.mark.parametrize(
    "T,E,k,block_t,rows_per_program",
    [
        (37, 13, 3, 4, 8),  # 5 programs, each looping over 2 tiles, the last one partly past T: atomics summed
        (11, 6, 6, 2, 2),  # k=E (BLOCK_K=8 > K), one tile per program
        (10, 64, 5, 4, 4),  # k not a power of two: the bitonic top-k takes 8 and keeps 5
    ],
)
def test_router_tilings_and_topk_strategies(T, E, k, block_t, rows_per_program, topk):
    logits = _logits(T, E, seed=5)
    logits[1, :] = 0.25  # a fully tied row
    for score, renormalize in [("softmax", True), ("sigmoid", False)]:
        launch = dict(block_t=block_t, rows_per_program=rows_per_program, topk=topk)
        outs_t, grad_t = _router_run(logits, k, score, renormalize, "triton", **launch)
        outs_r, grad_r = _router_run(logits, k, score, renormalize, "torch")
        _assert_router_equal(outs_t, outs_r)
        torch.testing.assert_close(grad_t, grad_r, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,k", [(37, 13, 3), (12, 64, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_dtypes(dtype, T, E, k, score):
    # 16-bit logits take the int32-key path of the kernel; the gradient comes back in the logits dtype
    logits = _logits(T, E, dtype=dtype, seed=7)
    outs_t, grad_t = _router_run(logits, k, score, True, "triton")
    outs_r, grad_r = _router_run(logits, k, score, True, "torch")
    _assert_router_equal(outs_t, outs_r)
    assert grad_t.dtype == dtype
    torch.testing.assert_close(grad_t, grad_r, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize(
    "T,E,k,block_t,topk",
    [
        (5, 8, 2, None, None),  # T < block
        (37, 13, 3, 4, "bitonic"),  # prime E, several programs, the bitonic top-k on biased keys
        (9, 6, 6, None, None),  # k = E: the bias only reorders
        (16, 8, 1, 4, "rounds"),  # k = 1
    ],
)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_bias_triton_matches_reference(T, E, k, block_t, topk, score, dtype):
    # the selection bias: keys from fp32 p + bias (16-bit logits leave the int32-key path), weights from the logits
    logits = _logits(T, E, dtype=dtype, seed=19)
    logits[0, 1] = -math.inf  # masked: out of reach whatever its bias
    bias = torch.linspace(-0.3, 0.3, E)[torch.randperm(E, generator=torch.Generator().manual_seed(2))]
    bias[1] = 100.0
    outs_r, grad_r = _router_run(logits, k, score, True, "torch", bias=bias)
    launch = {} if block_t is None else dict(block_t=block_t, rows_per_program=2 * block_t, topk=topk)
    if launch:
        outs_t, grad_t = _router_run(logits, k, score, True, "triton", bias=bias, **launch)
    else:
        outs_t, grad_t = _router_run(logits, k, score, True, "triton", bias=bias)
    _assert_router_equal(outs_t, outs_r)
    torch.testing.assert_close(grad_t, grad_r, **TOL[dtype])
    row0 = outs_r[1][0].tolist()  # expert 1 is masked there: chosen last, only when every expert is (k = E)
    assert (1 not in row0) if k < E else row0[-1] == 1
    assert (outs_r[1][1:, 0] == 1).all()  # bias 100 wins wherever the expert is not masked
    plain = kernels.fused_router(logits, k, score, True, impl="torch")
    if k < E:
        assert not torch.equal(plain[1], outs_r[1])  # the bias changed the choice
    torch.testing.assert_close(plain[3], outs_r[3])  # prob_sums and lse do not see the bias
    torch.testing.assert_close(plain[4], outs_r[4])


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bias_selects_only_hand_worked(impl):
    inf = math.inf
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, -inf], [0.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 9.0])
    x = logits.clone().requires_grad_()
    weights, ids, counts, _, _ = kernels.fused_router(x, 2, "sigmoid", False, impl=impl, bias=bias)
    # row 0: 3 (0.5 + 9), 2 (0.73 + 5); row 1: expert 3 is masked -> 2, 0; row 2: sigmoid 0.5 + bias -> 3, 2
    assert ids.tolist() == [[3, 2], [2, 0], [3, 2]]
    torch.testing.assert_close(weights, torch.sigmoid(logits.gather(1, ids.long())))  # unbiased scores
    assert counts.tolist() == [1, 0, 3, 2]
    tied = kernels.fused_router(torch.zeros(2, 5), 3, impl=impl, bias=torch.zeros(5))[1]
    assert tied.tolist() == [[0, 1, 2]] * 2  # ties to the lower id, as without a bias
    weights.sum().backward()
    # d sigmoid(x)/dx at the chosen entries only; the bias is not a tensor input of the graph
    expected = torch.zeros_like(logits).scatter(1, ids.long(), (weights * (1 - weights)).detach())
    torch.testing.assert_close(x.grad, expected)


def test_reference_bias_matches_library_routing():
    logits = _logits(29, 11, seed=23)
    bias = torch.randn(11, generator=torch.Generator().manual_seed(4)) * 0.2
    for score in ("softmax", "sigmoid"):
        r = route(logits, 3, score=score, renormalize=True, bias=bias)
        weights, ids, counts, _, _ = kernels.fused_router(logits, 3, score, True, impl="torch", bias=bias)
        assert torch.equal(ids.long(), r.ids) and torch.equal(counts.long(), r.counts)
        torch.testing.assert_close(weights, r.weights, **FP32_OUT)


# ---------------------------------------------------------------------------------------------------------------
# 2. The reference tied to moe.nn.routing / moe.nn.losses, and its backward to autograd
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k", [(33, 13, 3), (16, 8, 8), (7, 5, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_matches_library_routing_and_losses(T, E, k, renormalize, score):
    # sigmoid: prob_sums are the sums of the per-token normalised scores, the distribution route's aux loss uses
    logits = _logits(T, E, seed=11)
    x_lib = logits.clone().requires_grad_()
    r = route(x_lib, k, score=score, renormalize=renormalize)
    x_ref = logits.clone().requires_grad_()
    weights, ids, counts, prob_sums, lse = kernels.fused_router(x_ref, k, score, renormalize, impl="torch")
    torch.testing.assert_close(weights, r.weights, **FP32_OUT)
    assert torch.equal(ids.long(), r.ids) and torch.equal(counts.long(), r.counts)

    aux = E * torch.dot(counts.float() / (T * k), prob_sums / T)
    z = lse.square().mean()
    torch.testing.assert_close(aux, load_balancing_loss(r.probs, r.ids, E), **FP32_OUT)
    torch.testing.assert_close(z, router_z_loss(logits), **FP32_OUT)

    g = torch.randn(T, k)
    ((r.weights * g).sum() + 0.7 * r.aux_loss + 0.3 * r.z_loss).backward()
    ((weights * g).sum() + 0.7 * aux + 0.3 * z).backward()
    torch.testing.assert_close(x_ref.grad, x_lib.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_backward_equals_autograd(score, renormalize):
    # the hand-derived backward vs autograd through the dense [T, E] formulas (with the same, fixed ids)
    logits = _logits(17, 9, seed=13)
    logits[2, 4] = -math.inf  # a masked entry inside a row
    weights, ids, _, prob_sums, lse = ref.fused_router(logits, 4, score, renormalize)
    x = logits.clone().requires_grad_()
    p = torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)
    w = p.gather(1, ids.long())
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    q = p if score == "softmax" else p / p.sum(-1, keepdim=True)  # the distribution the aux loss uses
    outs = (w, ids, None, q.sum(0), torch.logsumexp(x, -1))
    _upstream(outs, "all").backward()
    gw, gp, gl = _split_grads((weights, ids, None, prob_sums, lse), "all")
    grad = ref.fused_router_backward(logits, weights, ids, lse, gw, gp, gl, score, renormalize)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 3. Edge semantics
# ---------------------------------------------------------------------------------------------------------------

IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lower_id(impl, dtype):
    logits = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: ids 0, 1, 2
            [0.0, 2.0, -1.0, 2.0, 2.0],  # three-way tie at the top: 1, 3, 4
            [-0.0, 0.0, -0.0, -5.0, 0.0],  # -0.0 ties with +0.0: 0, 1, 2
            [3.0, -1.0, 3.0, 5.0, -1.0],  # 3, then the tie 0 before 2
        ],
        dtype=dtype,
    )
    weights, ids, counts, _, _ = kernels.fused_router(logits, 3, impl=impl)
    assert ids.tolist() == [[0, 1, 2], [1, 3, 4], [0, 1, 2], [3, 0, 2]]
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 3))
    assert counts.tolist() == [3, 3, 3, 2, 1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_minus_inf_entries(impl, score):
    inf = math.inf
    logits = torch.tensor(
        [
            [0.5, -inf, 2.0, -inf, 1.0, 0.0],  # finite entries win over -inf, even at low probability
            [-300.0, -inf, -inf, 7.0, -inf, -inf],  # 2 finite < k=3: the third choice is the lowest-id -inf (1)
            [-inf, -inf, -inf, -inf, -inf, -inf],  # nothing finite: ids 0, 1, 2 at weight 0, lse = -inf
        ]
    )
    x = logits.clone().requires_grad_()
    weights, ids, counts, prob_sums, lse = kernels.fused_router(x, 3, score, impl=impl)
    assert ids.tolist() == [[2, 4, 0], [3, 0, 1], [0, 1, 2]]
    assert weights[1, 2] == 0 and (weights[2] == 0).all()
    assert lse[2] == -inf and torch.isfinite(lse[:2]).all()
    assert torch.isfinite(weights).all() and torch.isfinite(prob_sums).all()
    assert counts.sum() == 9
    (weights.sum() + prob_sums.sum() + torch.where(lse.isfinite(), lse, 0).square().sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[2] == 0).all() and (x.grad[logits == -inf] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_on_one_expert(impl, k):
    # one hot expert: every token's first choice is expert 3; counts and the sorted layout must follow
    T, E, D = 23, 7, 5
    logits = _logits(T, E, seed=17)
    logits[:, 3] += 100.0
    weights, ids, counts, _, _ = kernels.fused_router(logits, k, impl=impl)
    assert (ids[:, 0] == 3).all() and counts[3] == T
    x = torch.randn(T, D)
    x_sorted, rows = kernels.permute(x, ids, counts, impl=impl)
    offset = counts[:3].sum().item()
    # expert 3's block holds the tokens in order: rows[t, 0] = offset + t
    assert rows[:, 0].tolist() == list(range(offset, offset + T))
    torch.testing.assert_close(x_sorted[offset : offset + T], x, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 4. Permute / unpermute
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_slot_rows_hand_worked(impl):
    # slots s = t*K + j: s0->e1, s1->e0, s2->e0, s3->e2, s4->e1, s5->e0; counts [3, 2, 1], offsets [0, 3, 5]
    # expert 0 gets slots 1, 2, 5 -> rows 0, 1, 2; expert 1 slots 0, 4 -> rows 3, 4; expert 2 slot 3 -> row 5
    ids = torch.tensor([[1, 0], [0, 2], [1, 0]])
    counts = torch.tensor([3, 2, 1])
    assert kernels.slot_rows(ids, counts, impl=impl).tolist() == [[3, 0], [1, 5], [4, 2]]


def _check_layout(ids: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> None:
    S = ids.numel()
    rows_S, ids_S = rows.reshape(-1).long(), ids.reshape(-1).long()
    assert torch.equal(rows_S.sort().values, torch.arange(S))  # a permutation of 0..S-1
    offsets = torch.cumsum(counts, 0) - counts
    assert int(offsets[-1] + counts[-1]) == S  # offset[E] == T*K
    start, end = offsets[ids_S], offsets[ids_S] + counts[ids_S]
    assert ((rows_S >= start) & (rows_S < end)).all()  # each slot inside its expert's block
    for e in range(counts.numel()):  # stable: within an expert, rows grow with the slot index
        assert (rows_S[ids_S == e].diff() > 0).all()


@needs_triton
@pytest.mark.parametrize(
    "T,K,E,chunk,chunks_per_block",
    [
        (3, 2, 5, None, None),  # fewer slots than one chunk, experts without tokens
        (200, 6, 13, 16, 1),  # 75 blocks of one chunk: the block scan loops over 2 chunks of 64 blocks; prime E
        (50, 4, 13, 16, 3),  # 5 blocks of 3 chunks: the rank carries across chunks within a block
        (9, 1, 1, 4, 2),  # E=1, k=1: one expert owns every row
    ],
)
def test_slot_rows_triton_invariants(T, K, E, chunk, chunks_per_block):
    from moe.kernels import triton_permute

    g = torch.Generator().manual_seed(19)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()  # distinct per token
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).int()
    rows = triton_permute.slot_rows(ids, counts, chunk=chunk, chunks_per_block=chunks_per_block)
    _check_layout(ids, counts.long(), rows)
    assert torch.equal(rows, ref.slot_rows(ids, counts))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_then_one_hot_unpermute_is_identity(impl, dtype):
    T, E, k, D = 29, 11, 3, 10
    _, ids, counts, _, _ = kernels.fused_router(_logits(T, E, seed=23), k, impl=impl)
    x = torch.randn(T, D).to(dtype)
    x_sorted, rows = kernels.permute(x, ids, counts, impl=impl)
    _check_layout(ids, counts.long(), rows)
    assert torch.equal(x_sorted[rows.reshape(-1).long()], x.repeat_interleave(k, 0))
    pick = torch.randint(0, k, (T,))
    one_hot = torch.nn.functional.one_hot(pick, k).float()
    assert torch.equal(kernels.unpermute(x_sorted, one_hot, rows, impl=impl), x)  # bitwise


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,k,D", [(29, 11, 3, 10), (6, 4, 4, 130), (5, 1, 1, 3)])  # odd D; k=E, D>1 tile; E=1
def test_permute_unpermute_triton_matches_reference(dtype, T, E, k, D):
    _, ids, counts, _, _ = kernels.fused_router(_logits(T, E, seed=29), k, impl="torch")
    g = torch.Generator().manual_seed(31)
    x0 = torch.randn(T, D, generator=g).to(dtype)
    w0 = torch.rand(T, k, generator=g)
    upstream = torch.randn(T, D, generator=g).to(dtype)
    results = []
    for impl in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        x_sorted, rows = kernels.permute(x, ids, counts, impl=impl)
        y = x_sorted * torch.linspace(0.5, 2.0, T * k, dtype=dtype)[:, None]  # stands in for the experts
        out = kernels.unpermute(y, w, rows, impl=impl)
        out.backward(upstream)
        results.append((x_sorted, rows, out, x.grad, w.grad))
    (xs_t, rows_t, out_t, gx_t, gw_t), (xs_r, rows_r, out_r, gx_r, gw_r) = results
    assert torch.equal(rows_t, rows_r) and torch.equal(xs_t, xs_r)
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    torch.testing.assert_close(gx_t, gx_r, **TOL[dtype])
    torch.testing.assert_close(gw_t, gw_r, atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=1e-4)
    assert out_t.dtype == dtype and gx_t.dtype == dtype and gw_t.dtype == torch.float32


@needs_triton
def test_unpermute_is_deterministic_and_weights_grad_optional():
    T, k, D = 13, 3, 7
    rows = torch.randperm(T * k).int().view(T, k)
    y = torch.randn(T * k, D, requires_grad=True)
    w = torch.rand(T, k)  # no grad: the backward skips the weights' dot products
    outs = [kernels.unpermute(y, w, rows, impl="triton") for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    outs[0].sum().backward()
    torch.testing.assert_close(y.grad, w.reshape(-1)[torch.argsort(rows.reshape(-1).long())][:, None].expand(-1, D))


# ---------------------------------------------------------------------------------------------------------------
# 5. API
# ---------------------------------------------------------------------------------------------------------------


def test_validation_errors():
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match="only .*softmax.*sigmoid.*moe.nn.routing"):
        kernels.fused_router(logits, 2, score="sparsemax")
    with pytest.raises(ValueError, match="impl='cuda'"):
        kernels.fused_router(logits, 2, impl="cuda")
    with pytest.raises(ValueError, match="k=7"):
        kernels.fused_router(logits, 7)
    with pytest.raises(ValueError, match=r"logits: expected .*\[T, E\]"):
        kernels.fused_router(logits[None], 2)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids: expected"):
        kernels.permute(torch.randn(5, 3), ids, torch.tensor([8]))
    with pytest.raises(ValueError, match="counts: expected"):
        kernels.permute(torch.randn(4, 3), ids, torch.tensor([[8]]))
    with pytest.raises(ValueError, match=r"y: expected shape \[T\*K, D\]"):
        kernels.unpermute(torch.randn(7, 3), torch.rand(4, 2), ids)
    with pytest.raises(ValueError, match="weights: expected"):
        kernels.unpermute(torch.randn(8, 3), torch.rand(4, 3), ids)


def test_impl_resolution(monkeypatch):
    x = torch.randn(3, 4)
    assert kernels.resolve_impl("auto", x, 4) == "torch"  # CPU tensors: the reference
    assert kernels.resolve_impl("torch", x, 4) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time
    if HAS_TRITON:
        with pytest.raises(ValueError, match="expected CUDA tensors"):
            kernels.fused_router(x, 2, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        assert kernels.resolve_impl("triton", x, 4) == "triton"
        with pytest.raises(ValueError, match="at most 512"):
            kernels.resolve_impl("triton", x, 513)


def test_custom_ops_pass_opcheck():
    # schema, fake (meta) functions and autograd registration of every op, on the reference implementation
    logits = torch.randn(6, 5, requires_grad=True)
    weights, ids, counts, _, lse = ops.fused_router(logits.detach(), 2, "softmax", True, None, "torch")
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(12, 4, requires_grad=True)
    rows = ops.slot_rows(ids, counts, "torch")
    cases = [
        (ops.fused_router, (logits, 2, "sigmoid", False, None, "torch")),
        (ops.fused_router, (logits, 2, "softmax", True, torch.randn(5), "torch")),
        (ops.fused_router_backward, (logits.detach(), weights, ids, lse, weights, None, lse, "softmax", True, "torch")),
        (ops.slot_rows, (ids, counts, "torch")),
        (ops.permute, (x, ids, counts, "torch")),
        (ops.gather_rows, (y, weights.clone().requires_grad_(), rows, "torch")),
        (ops.unpermute_backward, (x.detach(), y.detach(), weights, rows, True, "torch")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_eager_twins_match_the_custom_ops():
    """Eager mode runs ``ops.router`` / ``permute_rows`` / ``combine_rows`` (autograd.Functions); they must give the
    custom ops' outputs and gradients, bit for bit (same backends, same gradient functions)."""
    T, E, k, D = 13, 7, 3, 5
    logits = torch.randn(T, E, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)

    def layer(router, permute, combine, logits, x, unweighted):
        weights, ids, counts, prob_sums, lse = router(logits, k, "sigmoid", True, None, "torch")
        x_sorted, rows = permute(x, ids, counts, "torch")
        out = combine(torch.tanh(x_sorted), None if unweighted else weights, rows, "torch")
        loss = out.square().sum() + (prob_sums * torch.arange(E)).sum() + lse.square().mean()
        return (weights, ids, counts, prob_sums, lse, x_sorted, rows, out), torch.autograd.grad(loss, (logits, x))

    for unweighted in (False, True):
        ops_out, ops_grads = layer(ops.fused_router, ops.permute, ops.gather_rows, logits, x, unweighted)
        eager_out, eager_grads = layer(ops.router, ops.permute_rows, ops.combine_rows, logits, x, unweighted)
        for a, b in zip((*ops_out, *ops_grads), (*eager_out, *eager_grads)):
            assert torch.equal(a, b)


def test_torch_compile_traces_around_the_ops():
    T, E, k, D = 16, 6, 2, 8
    logits = torch.randn(T, E, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)

    def layer(logits, x):
        weights, ids, counts, prob_sums, lse = kernels.fused_router(logits, k)
        x_sorted, rows = kernels.permute(x, ids, counts)
        out = kernels.unpermute(torch.tanh(x_sorted), weights, rows)
        aux = E * torch.dot(counts.float() / (T * k), prob_sums / T)
        return out.square().sum() + aux + lse.square().mean()

    eager = torch.autograd.grad(layer(logits, x), (logits, x))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    traced = torch.autograd.grad(compiled(logits, x), (logits, x))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# 6. The compiled path on a GPU: run with ``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels.py``
# ---------------------------------------------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()) or INTERPRET, reason="needs CUDA and TRITON_INTERPRET=0"
)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("topk", ["rounds", "bitonic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,E,k",
    [(70001, 64, 8), (4099, 256, 8), (1000, 13, 3), (2051, 512, 4), (513, 8, 8)],  # many programs, odd T, k=E
)
def test_gpu_router_matches_reference(T, E, k, dtype, topk):
    logits = _logits(T, E, dtype=dtype, seed=37).cuda()
    logits[0, :] = 0.5  # tied row
    logits[1, : E // 2] = -math.inf
    for score, renormalize in [("softmax", True), ("sigmoid", False)]:
        launch = dict(topk=topk)  # the launcher's default tiles and rows_per_program (SM count)
        outs_t, grad_t = _router_run(logits, k, score, renormalize, "triton", **launch)
        outs_r, grad_r = _router_run(logits, k, score, renormalize, "torch")
        _assert_router_equal(outs_t, outs_r, tol=dict(atol=1e-5, rtol=1e-5))
        torch.testing.assert_close(grad_t, grad_r, **TOL[dtype])


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,D", [(4099, 64, 8, 256), (777, 128, 6, 2048), (64, 1, 1, 40)])
def test_gpu_permute_unpermute_matches_reference(T, E, k, D, dtype):
    _, ids, counts, _, _ = kernels.fused_router(_logits(T, E, seed=41).cuda(), k, impl="torch")
    x0 = torch.randn(T, D, device="cuda").to(dtype)
    w0 = torch.rand(T, k, device="cuda")
    upstream = torch.randn(T, D, device="cuda").to(dtype)
    results = []
    for impl in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        x_sorted, rows = kernels.permute(x, ids, counts, impl=impl)
        out = kernels.unpermute(torch.tanh(x_sorted), w, rows, impl=impl)
        out.backward(upstream)
        results.append((x_sorted, rows, out, x.grad, w.grad))
    (xs_t, rows_t, out_t, gx_t, gw_t), (xs_r, rows_r, out_r, gx_r, gw_r) = results
    _check_layout(ids.cpu(), counts.long().cpu(), rows_t.cpu())
    assert torch.equal(rows_t, rows_r) and torch.equal(xs_t, xs_r)
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    torch.testing.assert_close(gx_t, gx_r, **TOL[dtype])
    torch.testing.assert_close(gw_t, gw_r, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# 7. The compiled (non-interpreted) path: every kernel must compile for Hopper, which needs no GPU
# ---------------------------------------------------------------------------------------------------------------


def _compile_for_sm90() -> None:
    """Compile each kernel to PTX for sm_90 (run in a subprocess without TRITON_INTERPRET): the interpreter accepts
    code the compiler rejects (types, constexpr use, layouts), and CI has no GPU to find out."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe.kernels import triton_permute as tp
    from moe.kernels import triton_router as tr

    def build(fn, types: dict, constexprs: dict, num_warps: int = 4) -> None:
        names = list(fn.arg_names)
        signature = {n: types.get(n, "constexpr") for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    i32, f32 = "i32", "*fp32"
    for dt, bitonic, E, K in [("bf16", False, 64, 8), ("fp32", True, 256, 8), ("fp16", False, 13, 3)]:
        bt, be, bk, nw = tr._tiles(E, K, None)
        types = dict(logits_ptr=f"*{dt}", weights_ptr=f32, ids_ptr="*i32", counts_ptr="*i32", prob_sums_ptr=f32)
        types.update(lse_ptr=f32, bias_ptr=f32, T=i32, E=i32, stride_t=i32, rows_per_program=i32)
        for has_bias in (False, True):
            flags = dict(K=K, SIGMOID=dt == "fp16", RENORMALIZE=True, HAS_BIAS=has_bias)
            flags.update(KEY16=dt != "fp32" and not has_bias, BITONIC=bitonic)
            build(tr._router_fwd_kernel, types, dict(**flags, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk), nw)
    for sigmoid in (False, True):
        types = dict(logits_ptr="*bf16", weights_ptr=f32, ids_ptr="*i32", lse_ptr=f32, grad_weights_ptr=f32)
        types.update(grad_prob_sums_ptr=f32, grad_lse_ptr=f32, grad_logits_ptr="*bf16", T=i32, E=i32, K=i32)
        types.update(stride_t=i32, stride_gt=i32)
        flags = dict(SIGMOID=sigmoid, RENORMALIZE=True, HAS_GW=True, HAS_GP=True, HAS_GL=True)
        build(tr._router_bwd_kernel, types, dict(**flags, BLOCK_T=16, BLOCK_E=64, BLOCK_K=8))
    slots = dict(ids_ptr="*i32", S=i32, E=i32, chunks=i32)
    build(tp._slot_histogram_kernel, dict(**slots, hist_ptr="*i32"), dict(CHUNK=128, BLOCK_E=64), 8)
    build(tp._slot_rows_kernel, dict(**slots, base_ptr="*i32", rows_ptr="*i32"), dict(CHUNK=128, BLOCK_E=64), 8)
    scan = dict(hist_ptr="*i32", counts_ptr="*i32", base_ptr="*i32", B=i32, E=i32)
    build(tp._block_scan_kernel, scan, dict(BLOCK_B=64, BLOCK_EC=32, BLOCK_E=64))
    rows = dict(rows_ptr="*i32", T=i32, D=i32, K=i32)
    build(
        tp._scatter_rows_kernel,
        dict(**rows, x_ptr="*bf16", out_ptr="*bf16", stride_x=i32, stride_out=i32),
        dict(BLOCK_T=8, BLOCK_D=512),
    )
    gather = dict(**rows, y_ptr="*bf16", weights_ptr=f32, out_ptr="*bf16", stride_y=i32, stride_out=i32)
    build(tp._gather_rows_kernel, gather, dict(HAS_WEIGHTS=True, BLOCK_T=8, BLOCK_D=512))
    bwd = dict(**rows, grad_out_ptr="*bf16", y_ptr="*bf16", weights_ptr=f32, grad_y_ptr="*bf16", grad_w_ptr=f32)
    bwd.update(stride_g=i32, stride_y=i32, stride_gy=i32)
    build(tp._unpermute_bwd_kernel, bwd, dict(NEED_GRAD_W=True, BLOCK_T=8, BLOCK_D=512))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_hopper():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import tests.test_kernels as t; t._compile_for_sm90()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("E,k", [(8, 2), (7, 1), (64, 8), (5, 4)])
def test_reference_top_ids_equal_the_stable_sort_with_and_without_ties(E, k):
    from moe.kernels.reference import _top_ids

    g = torch.Generator().manual_seed(E * 10 + k)
    key = torch.randn(300, E, generator=g)
    sort_ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(_top_ids(key, k), sort_ids)  # no ties: the topk path
    key[::3] = key[::3].round()  # ties everywhere in a third of the rows, incl. at the k-th place
    key[1, :] = -math.inf
    key[2, :2] = torch.tensor([-0.0, 0.0])
    key[2, 2:] = -1.0
    sort_ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(_top_ids(key, k), sort_ids)  # ties: the sort, lower id first
    assert _top_ids(key, k)[1].tolist() == list(range(k)) and _top_ids(key, k)[2, 0].item() == 0
