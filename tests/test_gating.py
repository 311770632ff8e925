"""Gating score functions: family invariants (spec section 0), hand-worked values, custom backwards, edge cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.nn.gating import (
    SCORE_FUNCTIONS,
    adaptive_temperature,
    dense_to_sparse,
    entmax15,
    score,
    select_with_bias,
    self_adjust_softmax,
    softpick,
    sparsemax,
    ssmax,
    update_expert_bias,
)

INF = math.inf

# Every registry entry with the keyword variants worth covering, and its family from spec section 0:
# "simplex" = >= 0 and sums to 1; "sub_simplex" = >= 0 and sums to at most 1; "unit" = each score in [0, 1];
# "signed" = no sign or sum guarantee.
CASES = [
    ("softmax", {}, "simplex"),
    ("softmax", {"temperature": 0.3}, "simplex"),
    ("sigmoid", {}, "unit"),
    ("sparsemax", {}, "simplex"),
    ("entmax15", {}, "simplex"),
    ("softpick", {}, "sub_simplex"),
    ("ssmax", {}, "simplex"),
    ("ssmax", {"s": torch.tensor(0.9), "n": 1000}, "simplex"),
    ("self_adjust_softmax", {}, "signed"),
    ("self_adjust_softmax", {"normalized": True}, "sub_simplex"),
    ("adaptive_temperature", {}, "simplex"),
    ("dense_to_sparse", {}, "simplex"),
    ("dense_to_sparse", {"activation": "gelu", "temperature": 0.05}, "simplex"),
]
CASE_IDS = [f"{name}-{'-'.join(map(str, kw.values())) or 'default'}" for name, kw, _ in CASES]
SHIFT_INVARIANT = ["softmax", "sparsemax", "entmax15", "ssmax", "adaptive_temperature"]
NOT_SHIFT_INVARIANT = [("softpick", {}), ("self_adjust_softmax", {}), ("self_adjust_softmax", {"normalized": True})]


def _check_family(family: str, p: torch.Tensor, logits: torch.Tensor, tol: float = 1e-5) -> None:
    sums = p.sum(-1)
    if family == "signed":
        return
    assert (p >= 0).all()
    if family == "simplex":
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol, rtol=0)
    elif family == "sub_simplex":
        assert (sums <= 1 + tol).all()
    elif family == "unit":
        assert (p <= 1).all()


def test_cases_cover_the_whole_registry():
    assert {name for name, _, _ in CASES} == set(SCORE_FUNCTIONS)


# ==================================================================== property test over random shapes


@st.composite
def logits_TE(draw):
    """[T, E] logits with optional exact ties (rounding) and -inf entries (never a whole row)."""
    T = draw(st.integers(1, 40))
    E = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 64]))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 100.0]))  # 0.1 + rounding -> rows of exact zeros
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(T, E, generator=g) * scale
    if draw(st.booleans()):
        x = x.round()
    if draw(st.booleans()) and E > 1:
        drop = torch.rand(T, E, generator=g) < 0.5
        drop.scatter_(1, torch.randint(E, (T, 1), generator=g), False)  # keep one entry per row
        x = x.masked_fill(drop, -INF)
    return x


@pytest.mark.parametrize("name,kw,family", CASES, ids=CASE_IDS)
@settings(max_examples=25, deadline=None, database=None)
@given(x=logits_TE())
def test_registry_property(name, kw, family, x):
    x = x.clone().requires_grad_(True)
    p = score(x, name, **kw)
    assert p.shape == x.shape and p.dtype == torch.float32
    assert torch.isfinite(p).all()
    _check_family(family, p, x)
    masked = x.detach() == -INF
    assert (p[masked] == 0).all()
    (p * torch.randn_like(p)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[masked] == 0).all()


# ==================================================================== shared invariants


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_shift_invariance(name):
    x = torch.randn(16, 7) * 2
    x[0, 3] = x[5, 0] = -INF
    torch.testing.assert_close(score(x + 3.7, name), score(x, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kw", NOT_SHIFT_INVARIANT)
def test_not_shift_invariant(name, kw):
    # the shift makes the row all-positive: normalized SA is unchanged by shifts that keep both signs in the row
    x = torch.tensor([[0.5, -0.3, 1.2, -2.0]])
    assert (score(x + 3.0, name, **kw) - score(x, name, **kw)).abs().max() > 1e-3  # float noise is ~1e-7


@pytest.mark.parametrize("name,kw,family", CASES, ids=CASE_IDS)
def test_bf16_input_gives_fp32_close_to_fp32(name, kw, family):
    x = torch.randn(32, 8)
    x_bf16 = x.bfloat16()
    p = score(x_bf16, name, **kw)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, score(x_bf16.float(), name, **kw), atol=0, rtol=0)  # upcast first, then math
    torch.testing.assert_close(p, score(x, name, **kw), atol=3e-2, rtol=1e-2)


# Rows for float64 gradcheck: generic values, one masked entry, and (for the functions that are smooth there)
# ties inside the support and a row of ties. Every entry is > 1e-3 away from a sparsemax/entmax support boundary.
GENERIC_ROWS = [[0.5, 0.2, -0.1, -1.3], [0.3, -INF, 1.1, -0.4]]
TIED_ROWS = [[1.0, 1.0, 0.2, -INF], [2.0, 2.0, 2.0, 2.0], [-0.7, -INF, -INF, -0.7]]


@pytest.mark.parametrize(
    "name,kw,rows",
    [
        ("sparsemax", {}, GENERIC_ROWS + TIED_ROWS),
        ("entmax15", {}, GENERIC_ROWS + TIED_ROWS),
        ("softmax", {"temperature": 0.7}, GENERIC_ROWS + TIED_ROWS),
        ("ssmax", {}, GENERIC_ROWS + TIED_ROWS),
        ("sigmoid", {}, GENERIC_ROWS + TIED_ROWS),
        ("softpick", {}, GENERIC_ROWS + TIED_ROWS),
        ("self_adjust_softmax", {}, GENERIC_ROWS + TIED_ROWS),
        ("self_adjust_softmax", {"normalized": True}, GENERIC_ROWS),  # min/max are kinks under ties
        ("dense_to_sparse", {"activation": "gelu", "temperature": 0.5}, GENERIC_ROWS + TIED_ROWS),
    ],
)
def test_gradcheck_float64(name, kw, rows):
    x = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: score(z, name, **kw), (x,))
    score(x, name, **kw).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[x.detach() == -INF] == 0).all()


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "softmax", "softpick", "ssmax"])
def test_single_expert(name):
    x = torch.tensor([[0.3], [-5.0], [40.0]], dtype=torch.float64, requires_grad=True)
    p = score(x, name)
    if name != "softpick":  # softpick of a single positive logit is 1 and of a nonpositive one is 0
        torch.testing.assert_close(p, torch.ones_like(p))
    assert torch.autograd.gradcheck(lambda z: score(z, name), (x,))


def test_softmax_temperature_and_sigmoid_match_torch():
    x = torch.randn(8, 5)
    x[0, 1] = -INF
    torch.testing.assert_close(score(x, "softmax", temperature=2.0), torch.softmax(x / 2.0, -1))
    torch.testing.assert_close(score(x, "sigmoid"), torch.sigmoid(x))


def test_invalid_arguments_are_clear_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"score='nope': expected one of \["):
        score(x, "nope")
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature="):
            score(x, "softmax", temperature=bad)
        with pytest.raises(ValueError, match="temperature="):
            dense_to_sparse(x, temperature=bad)
    with pytest.raises(ValueError, match="activation='relu'"):
        dense_to_sparse(x, activation="relu")
    with pytest.raises(ValueError, match="eps=0"):
        softpick(x, eps=0.0)
    with pytest.raises(ValueError, match="s: expected a float or a 0-dim tensor"):
        ssmax(x, s=torch.ones(2))
    with pytest.raises(ValueError, match="s=-0.5"):
        ssmax(x, s=-0.5)
    with pytest.raises(ValueError, match="n=0"):
        ssmax(x, n=0)
    with pytest.raises(ValueError, match="logits"):
        sparsemax(torch.empty(3, 0))


# ==================================================================== sparsemax / entmax-1.5


def _bisect_threshold(z: torch.Tensor, power: int) -> torch.Tensor:
    """Reference by bisection (independent of the sort algorithm): find tau with sum [x - tau]_+^power = 1."""
    x = z / 2 if power == 2 else z
    lo, hi = x.amax(-1, keepdim=True) - 1, x.amax(-1, keepdim=True)
    for _ in range(100):
        mid = (lo + hi) / 2
        too_low = (x - mid).clamp(min=0).pow(power).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(too_low, mid, lo), torch.where(too_low, hi, mid)
    return (x - (lo + hi) / 2).clamp(min=0).pow(power)


def test_sparsemax_hand_worked():
    # z = [0.5, 0.2, -0.1], sorted already. Cumsums 0.5, 0.7, 0.6; test 1 + k z_(k) > cumsum_k:
    # k=1: 1.5 > 0.5, k=2: 1.4 > 0.7, k=3: 0.7 > 0.6 -> support 3, tau = (0.6 - 1)/3 = -2/15,
    # p = z - tau = [0.5 + 2/15, 0.2 + 2/15, -0.1 + 2/15] = [19/30, 1/3, 1/30].
    torch.testing.assert_close(sparsemax(torch.tensor([0.5, 0.2, -0.1])), torch.tensor([19 / 30, 1 / 3, 1 / 30]))
    # z = [1.0, 0.5, -1.0]: k=3 fails (1 - 3 = -2 < 0.5), support 2, tau = (1.5 - 1)/2 = 0.25 -> [0.75, 0.25, 0].
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.5, -1.0])), torch.tensor([0.75, 0.25, 0.0]))
    # 2-d closed form: p_1 = clip((z_1 - z_2 + 1) / 2, 0, 1).
    z1 = torch.linspace(-2, 2, 41)
    p = sparsemax(torch.stack([z1, torch.zeros_like(z1)], dim=-1))
    torch.testing.assert_close(p[:, 0], ((z1 + 1) / 2).clamp(0, 1))


@pytest.mark.parametrize("gap", [0.0, 0.5, 0.999, 1.0, 1.001, 3.0])
def test_sparsemax_one_hot_iff_top_gap_at_least_one(gap):
    p = sparsemax(torch.tensor([gap, 0.0, -0.3, -2.0]))
    assert ((p > 0).sum().item() == 1) == (gap >= 1.0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    if 0.3 <= gap < 1:  # support {0, 1}: tau = (gap - 1) / 2, p = [(1 + gap) / 2, (1 - gap) / 2, 0, 0]
        torch.testing.assert_close(p, torch.tensor([(1 + gap) / 2, (1 - gap) / 2, 0, 0]))


def test_entmax15_hand_worked():
    # z = [1, 0]: x = z/2 = [0.5, 0], d = 0.5. With a = x_1 - tau, (a)^2 + (a - d)^2 = 1 gives
    # a = (d + sqrt(2 - d^2)) / 2 = (0.5 + sqrt(1.75)) / 2, so p = [a^2, (a - 0.5)^2] = [0.83072, 0.16928].
    a = (0.5 + math.sqrt(1.75)) / 2
    torch.testing.assert_close(entmax15(torch.tensor([1.0, 0.0])), torch.tensor([a**2, (a - 0.5) ** 2]))
    # all equal -> uniform; -inf masked
    torch.testing.assert_close(entmax15(torch.tensor([3.0, 3.0, -INF, 3.0])), torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))


@pytest.mark.parametrize("gap", [0.5, 1.5, 1.99, 2.0, 2.5])
def test_entmax15_one_hot_iff_top_gap_at_least_two(gap):
    p = entmax15(torch.tensor([gap, 0.0, -0.3, -2.0]))
    assert ((p > 0).sum().item() == 1) == (gap >= 2.0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("fn,power", [(sparsemax, 1), (entmax15, 2)])
def test_sort_forward_matches_bisection(fn, power):
    z = (
        torch.randn(200, 13, dtype=torch.float64)
        * torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64).repeat(67)[:200, None]
    )
    z[torch.rand(200, 13) < 0.3] = -INF
    z[:, 0] = z[:, 0].nan_to_num(neginf=0.0)  # never a whole masked row
    torch.testing.assert_close(fn(z), _bisect_threshold(z, power), atol=1e-10, rtol=0)


def test_sparsemax_differs_from_softmax_except_on_constant_rows():
    z = torch.randn(50, 6)
    assert ((sparsemax(z) - torch.softmax(z, -1)).abs().amax(-1) > 1e-3).all()
    torch.testing.assert_close(sparsemax(torch.zeros(2, 6)), torch.softmax(torch.zeros(2, 6), -1))


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_custom_backward_matches_closed_form_jacobian(fn):
    z = torch.tensor([0.9, 0.4, 0.1, -1.5, -INF], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(fn, z)
    p = fn(z)
    if fn is sparsemax:  # J = diag(s) - s s^T / |S|
        s = (p > 0).double()
        expected = torch.diag(s) - torch.outer(s, s) / s.sum()
    else:  # J = diag(sqrt p) - sqrt p sqrt p^T / sum sqrt p
        g = p.sqrt()
        expected = torch.diag(g) - torch.outer(g, g) / g.sum()
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(jac.sum(-1), torch.zeros(5, dtype=torch.float64))  # J 1 = 0


# ==================================================================== softpick


def _softpick_naive(x: torch.Tensor) -> torch.Tensor:
    a = torch.exp(x) - 1
    return torch.relu(a) / a.abs().sum(-1, keepdim=True)


def test_softpick_hand_worked():
    # e^z - 1 for z = [ln 3, 0, -ln 2] is [2, 0, -1/2]: numerators [2, 0, 0], denominator 2 + 0 + 1/2 = 2.5
    torch.testing.assert_close(softpick(torch.tensor([math.log(3), 0.0, -math.log(2)])), torch.tensor([0.8, 0, 0]))


def test_softpick_stable_equals_naive_and_row_sum_identity():
    x = torch.randn(64, 9, dtype=torch.float64) * 2
    p = softpick(x)
    torch.testing.assert_close(p, _softpick_naive(x))
    a = torch.exp(x) - 1
    positive, negative = a.clamp(min=0).sum(-1), (-a).clamp(min=0).sum(-1)
    torch.testing.assert_close(p.sum(-1), positive / (positive + negative))  # P / (P + N) in [0, 1]


def test_softpick_extremes():
    # huge logits: e^800 - 1 ~ e^800 -> [1, e^-1] / (1 + e^-1) = softmax([800, 799]); no overflow
    torch.testing.assert_close(softpick(torch.tensor([800.0, 799.0])), torch.softmax(torch.tensor([1.0, 0.0]), -1))
    # all logits <= 0 (very negative, all -inf, exact zeros) -> attend to nothing, with finite zero gradients
    x = torch.tensor([[-1000.0, -2000.0], [-INF, -INF], [0.0, 0.0], [-0.5, 0.0]], requires_grad=True)
    p = softpick(x)
    assert (p == 0).all()
    p.sum().backward()
    assert (x.grad == 0).all()
    # all logits >= 0, not all 0 -> sums to 1
    torch.testing.assert_close(softpick(torch.tensor([0.0, 0.3, 2.0])).sum(), torch.tensor(1.0))


def test_softpick_masked_entries_do_not_change_the_others():
    x = torch.tensor([0.7, -0.4, -INF, 1.3])
    p = softpick(x)
    assert p[2] == 0
    torch.testing.assert_close(p[[0, 1, 3]], softpick(x[[0, 1, 3]]))


# ==================================================================== SSMax


def test_ssmax_with_unit_inverse_temperature_is_softmax():
    x = torch.randn(10, 7)
    x[3, 2] = -INF
    torch.testing.assert_close(ssmax(x, s=1 / math.log(7)), torch.softmax(x, -1))
    torch.testing.assert_close(ssmax(x, s=0.5, n=math.e**2), torch.softmax(x, -1))  # explicit n


def test_ssmax_gradient_reaches_s():
    # d softmax(beta z) / d beta = p * (z - <p, z>) with beta = s log n, so dL/ds = log n * sum w p (z - <p, z>)
    x, w = torch.randn(5, 13), torch.randn(5, 13)
    s = torch.tensor(0.43, requires_grad=True)
    p = ssmax(x, s=s)
    (p * w).sum().backward()
    p = p.detach()
    expected = math.log(13) * (w * p * (x - (p * x).sum(-1, keepdim=True))).sum()
    torch.testing.assert_close(s.grad, expected)


def test_ssmax_n_one_is_uniform_and_keeps_focus_as_n_grows():
    torch.testing.assert_close(ssmax(torch.tensor([3.0, -2.0, -INF, 0.0]), n=1), torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))
    # paper Fig. 1: one logit +3, the rest -2, s = 0.43. Softmax's top probability decays with n; SSMax's does not.
    tops = []
    for n in (16, 256, 4096):
        x = torch.full((n,), -2.0)
        x[0] = 3.0
        tops.append((ssmax(x, s=0.43)[0].item(), torch.softmax(x, -1)[0].item()))
    assert all(ss > 0.95 for ss, _ in tops) and tops[-1][1] < 0.05
    assert tops[0][0] <= tops[1][0] <= tops[2][0]


# ==================================================================== Self-Adjust Softmax


def test_self_adjust_softmax_hand_worked():
    # z = [1, -1]: softmax = [s, 1 - s] with s = 1/(1 + e^-2) = 0.8808. SA = [s, -(1 - s)] (negative entry).
    # normalized: lo = -1, hi = 1 -> (z + 1)/2 = [1, 0] -> [s, 0].
    s = 1 / (1 + math.exp(-2))
    z = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(self_adjust_softmax(z), torch.tensor([s, -(1 - s)]))
    torch.testing.assert_close(self_adjust_softmax(z, normalized=True), torch.tensor([s, 0.0]))
    assert (self_adjust_softmax(torch.zeros(3), normalized=True) == 0).all()


def test_self_adjust_softmax_normalized_bounds():
    z = torch.randn(100, 8) * 3
    p, probs = self_adjust_softmax(z, normalized=True), torch.softmax(z, -1)
    assert (p >= 0).all() and (p <= probs + 1e-7).all() and (p.sum(-1) <= 1 + 1e-6).all()
    top, bottom = z.argmax(-1, keepdim=True), z.argmin(-1, keepdim=True)
    has_positive, has_negative = z.amax(-1) > 0, z.amin(-1) < 0
    torch.testing.assert_close(p.gather(-1, top)[has_positive], probs.gather(-1, top)[has_positive])
    assert (p.gather(-1, bottom)[has_negative] == 0).all()


def test_self_adjust_softmax_gradient_formula():
    # d SA_i / d z_j = delta_ij p_i + z_i p_i (delta_ij - p_j): the first term survives as p_i -> 1
    z = torch.tensor([2.0, -0.5, 0.3, 1.1], dtype=torch.float64)
    p = torch.softmax(z, -1)
    expected = torch.diag(p) + (z * p)[:, None] * (torch.eye(4, dtype=torch.float64) - p[None, :])
    torch.testing.assert_close(torch.autograd.functional.jacobian(self_adjust_softmax, z), expected)


# ==================================================================== adaptive temperature


def _reference_beta(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1).numpy()
    entropy = -(p * np.log(p + 1e-9)).sum(-1, keepdims=True)
    poly = np.polyval([-0.037, 0.481, -2.3, 4.917, -1.791], entropy)
    return torch.from_numpy(np.where(entropy > 0.5, np.maximum(poly, 1.0), 1.0))


def test_adaptive_temperature_matches_reference_and_only_sharpens():
    x = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(0.05, 4, 200, dtype=torch.float64)[:, None]
    beta = _reference_beta(x)
    assert (beta > 1).any() and (beta == 1).any()  # both regimes are exercised
    p = adaptive_temperature(x)
    torch.testing.assert_close(p, torch.softmax(x * beta, -1), atol=1e-6, rtol=1e-5)
    entropy = torch.special.entr(p).sum(-1)
    assert (entropy <= torch.special.entr(torch.softmax(x, -1)).sum(-1) + 1e-12).all()
    assert torch.equal(p.argmax(-1), x.argmax(-1))


def test_adaptive_temperature_hand_worked_beta_at_one_nat():
    # beta(1) = -0.037 + 0.481 - 2.3 + 4.917 - 1.791 = 1.27. Find c with entropy(softmax([c, 0, 0, 0])) = 1 nat.
    lo, hi = 0.0, 10.0
    for _ in range(200):
        c = (lo + hi) / 2
        h = torch.special.entr(torch.softmax(torch.tensor([c, 0, 0, 0], dtype=torch.float64), -1)).sum()
        lo, hi = (c, hi) if h > 1 else (lo, c)
    z = torch.tensor([c, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(adaptive_temperature(z), torch.softmax(1.27 * z, -1))


def test_adaptive_temperature_leaves_low_and_very_high_entropy_rows_unchanged():
    peaked = torch.tensor([[8.0, 0.0, 0.0, 0.0]])  # entropy ~ 0.01 nats <= 0.5
    near_uniform = torch.randn(1, 1024) * 0.01  # entropy ~ ln 1024 = 6.93 > 5.945: the polynomial is below 1
    for x in (peaked, near_uniform):
        torch.testing.assert_close(adaptive_temperature(x), torch.softmax(x, -1))


def test_adaptive_temperature_gradient_treats_beta_as_constant():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64)
    (adaptive_temperature(x) * w).sum().backward()
    beta = _reference_beta(x.detach())
    x_ref = x.detach().clone().requires_grad_(True)
    (torch.softmax(x_ref * beta, -1) * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)


# ==================================================================== dense-to-sparse


def test_dense_to_sparse_hand_worked_and_mask():
    # tanh([0, atanh(0.5)]) = [0, 0.5]; / 0.5 -> [0, 1]; softmax -> [1, e] / (1 + e)
    p = dense_to_sparse(torch.tensor([0.0, math.atanh(0.5)]), temperature=0.5)
    torch.testing.assert_close(p, torch.tensor([1.0, math.e]) / (1 + math.e))
    # a masked logit must stay at 0 (tanh(-inf) = -1 would otherwise give it mass)
    p = dense_to_sparse(torch.tensor([0.2, -INF, -0.3]), activation="sigmoid")
    assert p[1] == 0
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))


def test_dense_to_sparse_temperature_anneals_dense_to_sparse():
    x = torch.tensor([[1.5, 0.2, -0.7, 0.9]])
    torch.testing.assert_close(dense_to_sparse(x, temperature=1e-3), torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(dense_to_sparse(x, temperature=1e4), torch.full((1, 4), 0.25), atol=1e-4, rtol=0)


# ==================================================================== DeepSeek-V3 auxiliary-loss-free bias


def test_update_expert_bias_sign_rule_hand_worked():
    # counts [6, 2, 4, 0] -> mean 3; sign(3 - c) = [-1, +1, -1, +1]; rate 0.1
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0])
    new = update_expert_bias(bias, torch.tensor([6, 2, 4, 0]), rate=0.1)
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.6, -0.1, 0.1]))
    assert torch.equal(bias, torch.tensor([0.0, 0.5, 0.0, 0.0]))  # pure: the input is not mutated
    balanced = update_expert_bias(bias, torch.tensor([3, 3, 3, 3]), rate=0.1)
    assert torch.equal(balanced, bias)
    with pytest.raises(ValueError, match="rate=-0.1"):
        update_expert_bias(bias, torch.ones(4), rate=-0.1)
    with pytest.raises(ValueError, match="counts_E"):
        update_expert_bias(bias, torch.ones(3), rate=0.1)


def test_select_with_bias_picks_by_biased_scores_and_gathers_unbiased():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.5, 0.5]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    ids = select_with_bias(scores, bias, k=2)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[2, 0], [2, 0]]  # biased [0.9, 0.8, 1.1]; ties go to the lower id
    torch.testing.assert_close(scores.gather(-1, ids), torch.tensor([[0.1, 0.9], [0.5, 0.5]]))
    assert select_with_bias(scores, torch.zeros(3), k=1).tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="k=4"):
        select_with_bias(scores, bias, k=4)
    with pytest.raises(ValueError, match="bias_E"):
        select_with_bias(scores, torch.zeros(4), k=1)


def test_bias_updates_balance_a_skewed_router():
    logits = torch.randn(512, 4) + torch.tensor([1.5, 0.5, 0.0, 0.0])  # expert 0 preferred
    scores = score(logits, "sigmoid")
    bias = torch.zeros(4)

    def load_spread(b):
        counts = torch.bincount(select_with_bias(scores, b, k=1).flatten(), minlength=4)
        return counts, (counts.max() - counts.min()).item()

    _, initial_spread = load_spread(bias)
    for _ in range(300):
        counts, _ = load_spread(bias)
        bias = update_expert_bias(bias, counts, rate=0.002)
    _, final_spread = load_spread(bias)
    assert final_spread < initial_spread / 4
    assert bias[0] < 0 and bias[2] > 0
