"""The expert implementations (``moe.nn.experts``) agree with each other, and the CPU permute path
(``moe.kernels.cpu_permute``) with the reference, in outputs and every gradient, on awkward routings."""

import math

import pytest
import torch

from moe.kernels import cpu_permute, reference
from moe.nn.experts import GROUPED_MM, padded_rows, pick_impl, swiglu, swiglu_experts

IMPLS = ["loop", "bmm"] + (["grouped_mm"] if GROUPED_MM is not None else [])

# (name, E, counts per expert) -- each case names what it is there for
CASES = [
    ("an expert with zero rows", 5, [3, 0, 4, 1, 2]),
    ("all rows on one expert", 4, [0, 9, 0, 0]),
    ("prime E, uneven counts", 7, [1, 2, 3, 0, 5, 1, 1]),
    ("balanced: bmm needs no padding", 3, [4, 4, 4]),
    ("a single row", 2, [0, 1]),
    ("no rows at all (an expert-parallel rank that received none)", 3, [0, 0, 0]),
]


def weights(E: int, d: int, f: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((E, d, f), (E, d, f), (E, f, d))
    return [(torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[1])).requires_grad_() for s in shapes]


def run(impl: str, x: torch.Tensor, counts: torch.Tensor, ws: list[torch.Tensor], grad: torch.Tensor):
    y = swiglu_experts(x, counts, *ws, impl=impl)
    return (y, *torch.autograd.grad(y, [x, *ws], grad, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("name,E,counts", CASES, ids=[c[0] for c in CASES])
def test_expert_impls_agree(name, E, counts):
    d, f = 8, 12  # grouped_mm needs 16-byte row strides
    g = torch.Generator().manual_seed(1)
    counts_E = torch.tensor(counts)
    S = int(counts_E.sum())
    x = torch.randn(S, d, generator=g, dtype=torch.float64).requires_grad_()
    grad = torch.randn(S, d, generator=g, dtype=torch.float64)
    ws = weights(E, d, f)
    # the oracle: each row through its own expert's SwiGLU, no batching at all
    expert_S = torch.repeat_interleave(torch.arange(E), counts_E)
    ref = [(torch.nn.functional.silu(x[r] @ ws[0][e]) * (x[r] @ ws[1][e])) @ ws[2][e] for r, e in enumerate(expert_S)]
    ref_y = torch.stack(ref) if ref else x * 0.0
    ref_grads = torch.autograd.grad(ref_y, [x, *ws], grad, allow_unused=True, materialize_grads=True)
    for impl in IMPLS + ["auto"]:
        if impl == "grouped_mm" and S == 0:  # its backward refuses zero rows; "auto" never picks it for them
            continue
        if impl == "grouped_mm":  # grouped_mm has no fp64 kernel: compare in fp32
            x32, ws32, g32 = (
                x.float().detach().requires_grad_(),
                [w.float().detach().requires_grad_() for w in ws],
                grad.float(),
            )
            got, tol = run(impl, x32, counts_E, ws32, g32), 1e-5
        else:
            got, tol = run(impl, x, counts_E, ws, grad), 1e-12
        for what, a, b in zip(["y", "dx", "dw_gate", "dw_up", "dw_down"], got, (ref_y, *ref_grads)):
            torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m, i=impl, w=what: f"{i} {w}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_swiglu_function_matches_autograd(dtype):
    """``swiglu``'s hand-written backward against autograd through ``silu(gate) * up``: strided views of one
    ``[S, 2f]`` projection (a fused gate/up layout), an expanded incoming gradient, and the no-grad path."""
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(7, 10, generator=g, dtype=torch.float64) * 4).to(dtype)  # |x| up to ~12: silu' < 0 and ~1
    leaves = [gate_up.clone().requires_grad_() for _ in range(2)]
    grad = torch.randn(1, 5, generator=g, dtype=torch.float64).to(dtype).expand(7, 5)
    outs = []
    for fn, leaf in zip((swiglu, lambda a, b: torch.nn.functional.silu(a) * b), leaves):
        gate, up = leaf.chunk(2, dim=1)
        h = fn(gate, up)
        (d_leaf,) = torch.autograd.grad(h, leaf, grad)
        outs.append((h, d_leaf))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(*gate_up.chunk(2, dim=1)), outs[1][0].detach(), atol=tol, rtol=tol)
    gate, up = leaves[0].chunk(2, dim=1)
    (d_gate,) = torch.autograd.grad(swiglu(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        d_gate.sum().backward()


def test_padded_rows_layout():
    # counts [2, 0, 3]: C = 3; expert 0 rows 0,1 -> 0,1; expert 2 rows 2,3,4 -> 6,7,8
    C, pad_S = padded_rows(torch.tensor([2, 0, 3]))
    assert C == 3 and pad_S.tolist() == [0, 1, 6, 7, 8]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_pick_impl_rule(two_threads):
    x = torch.empty(64, 8)
    assert pick_impl(x, torch.full((8,), 8), 16) == "bmm"  # 8 rows per expert, no padding
    assert pick_impl(x, torch.tensor([57, 1, 1, 1, 1, 1, 1, 1]), 16) != "bmm"  # skewed: padding 7x the rows
    big = torch.empty(64 * 1024, 8)
    assert pick_impl(big, torch.full((64,), 1024), 16) != "bmm"  # large experts: grouped GEMM (or the loop)
    assert pick_impl(big, torch.full((64,), 1024), 10) == "loop"  # 40-byte rows: grouped_mm refuses them
    assert pick_impl(x.double(), torch.full((8,), 8), 16) == "loop"  # no fp64 grouped_mm / padded path needed
    torch.set_num_threads(1)
    assert pick_impl(x, torch.full((8,), 8), 16) != "bmm"  # one thread: grouped_mm won at every size


@pytest.mark.parametrize("T,K,E", [(7, 1, 3), (5, 4, 4), (6, 3, 5), (1, 2, 2), (9, 1, 1), (0, 2, 3)])
def test_cpu_permute_matches_reference(T, K, E):
    """k=1, k=E, prime E, a single token, one expert, no tokens (an expert-parallel rank that received none): rows,
    outputs and gradients equal the reference's."""
    g = torch.Generator().manual_seed(T * 100 + K * 10 + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)] or [torch.empty(0, K)]).view(T, K)
    ids = ids.to(torch.int32)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
    assert torch.equal(cpu_permute.slot_rows(ids, counts), reference.slot_rows(ids, counts))
    x = torch.randn(T, 5, generator=g, dtype=torch.float64)
    xs, rows = cpu_permute.permute(x, ids, counts)
    xs_ref, rows_ref = reference.permute(x, ids, counts)
    assert torch.equal(xs, xs_ref) and torch.equal(rows, rows_ref)
    y = torch.randn(T * K, 5, generator=g, dtype=torch.float64)
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    go = torch.randn(T, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cpu_permute.unpermute(y, w, rows), reference.unpermute(y, w, rows))
    torch.testing.assert_close(cpu_permute.unpermute(y, None, rows), reference.unpermute(y, None, rows))
    for need_w in (True, False):
        got = cpu_permute.unpermute_backward(go, y, w, rows, need_w)
        want = reference.unpermute_backward(go, y, w, rows, need_w)
        torch.testing.assert_close(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
        if need_w:
            torch.testing.assert_close(got[1], want[1])
