"""Merge methods: hand-computed examples, reference implementations written from the papers' code, properties."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import METHODS, merge, merge_tensors
from merging.iso import cts_sizes
from merging.registry import Stream
from merging.select import StreamSelect, order_stats
from merging.sparsify import bernoulli_keep, elect_sign, keep_rank, magprune_keep_prob, rank_order, trim_topk
from merging.star import truncate

# ------------------------------------------------------------------------------------------- linear / TA


def test_task_arithmetic_default_lam_is_the_ties_reference_value():
    base, fts = torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    torch.testing.assert_close(merge_tensors("task_arithmetic", base, fts), 0.4 * torch.tensor([4.0, 0.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        merge_tensors("linear", base, fts, weights=[1.0, -1.0])


# ---------------------------------------------------------------------------------------------------- TIES

T1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
T2 = torch.tensor([-2.0, -3.0, 0.1, 1.0, 5.0])
T3 = torch.tensor([1.0, 2.0, -0.2, -6.0, 0.3])


def test_ties_frequency_sign_weighted_sign_and_count_divisor_by_hand():
    base = torch.zeros(5)
    # density 1: nothing trimmed. Frequency election: votes [+1, -1, +1, +1, +1] (e.g. e4: -,+,+) -> signs
    # e0: mean(3, 1) = 2; e1: mean(-1, -3) = -2; e2: mean(0.5, 0.1) = 0.3; e3: mean(2, 1) = 1.5; e4: mean(5, .3)
    out = merge_tensors("ties", base, [T1, T2, T3], density=1.0, sign="frequency")
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.3, 1.5, 2.65]))
    # Total (mass) election flips e3 to - (2 + 1 - 6 = -3): e3 = -6
    out = merge_tensors("ties", base, [T1, T2, T3], density=1.0)
    torch.testing.assert_close(out[3], torch.tensor(-6.0))
    # Weights 1, 1, 0.1: unweighted election keeps e3 at -; weighted election (mergekit) sums 2 + 1 - 0.6 > 0 -> +,
    # and the weighted mean of the agreeing entries is (2 + 1) / (1 + 1) = 1.5.
    w = [1.0, 1.0, 0.1]
    torch.testing.assert_close(merge_tensors("ties", base, [T1, T2, T3], density=1.0, weights=w)[3], torch.tensor(-6.0))
    weighted = merge_tensors("ties", base, [T1, T2, T3], density=1.0, weights=w, weighted_sign=True)
    torch.testing.assert_close(weighted[3], torch.tensor(1.5))
    # e0 under weights (1, 1, 0.1), sign +: weighted mean (3 + 0.1) / 1.1; count divisor (PEFT): (3 + 0.1) / 2
    torch.testing.assert_close(weighted[0], torch.tensor(3.1 / 1.1))
    count = merge_tensors("ties", base, [T1, T2, T3], density=1.0, weights=w, weighted_sign=True, divisor="count")
    torch.testing.assert_close(count[0], torch.tensor(3.1 / 2))


def test_ties_row_scope_trims_each_row():
    base = torch.zeros(2, 4)
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    # tensor scope keeps the 4 largest of 8 = the whole first row; row scope keeps the top 2 of each row
    torch.testing.assert_close(merge_tensors("ties", base, [t], density=0.5, scope="tensor"),
                               torch.tensor([[4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0]]))  # fmt: skip
    torch.testing.assert_close(merge_tensors("ties", base, [t], density=0.5, scope="row"),
                               torch.tensor([[4.0, 3.0, 0, 0], [0, 0, 0.3, 0.4]]))  # fmt: skip


def ties_reference(tau: torch.Tensor, k: float, lam: float, kth: int | None = None) -> torch.Tensor:
    """TIES as the official ties-merging code does it on flattened task vectors [n, d], written from its steps:
    topk_values_mask (keep |x| >= the kth smallest; the code's kth = d - int(d k), this library's and PEFT's count
    d - int(d k) + 1 unless given), resolve_sign 'mass' with zeros -> majority, disjoint mean."""
    n, d = tau.shape
    kth = d - int(d * k) + 1 if kth is None else kth
    thr = tau.abs().kthvalue(kth, dim=1, keepdim=True).values
    trimmed = tau * (tau.abs() >= thr)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum()) if signs.sum() != 0 else 1.0
    mask = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    return lam * (trimmed * mask).sum(0) / mask.sum(0).clamp(min=1)


def test_ties_matches_the_reference_recipe_and_agrees_with_the_elected_sign():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 30, generator=g)
    taus = [torch.randn(50, 30, generator=g) * (torch.rand(50, 30, generator=g) < 0.4) for _ in range(4)]
    merged = merge_tensors("ties", base, [base + t for t in taus], density=0.3, lam=1.3)
    ref = ties_reference(torch.stack(taus).reshape(4, -1), 0.3, 1.3).reshape(50, 30)
    torch.testing.assert_close(merged - base, ref)
    delta = merged - base
    elected = elect_sign(trim_topk(torch.stack(taus), 0.3))
    nz = delta != 0
    assert nz.sum() > 500
    assert torch.equal(torch.sign(delta[nz]), elected[nz])


def test_trim_counts_follow_each_reference_by_hand():
    # n = 10, density 0.25: PEFT / mergekit keep int(2.5) = 2 (rank 9 of 10 is the smallest kept); the TIES code
    # thresholds at rank 10 - int(2.5) = 8 (3 kept); MergeLM's DARE+TIES at rank int(10 * 0.75) = 7 (4 kept)
    assert keep_rank(10, 0.25) == 9 and keep_rank(10, 0.25, "mergelm") == 7
    # n = 4, density 0.2: int(0.8) = 0, mergekit 0.1.5 keeps at least one (rank 4); MergeLM: int(3.2) = 3 -> 2 kept
    assert keep_rank(4, 0.2) == 4 and keep_rank(4, 0.2, "mergelm") == 3
    assert keep_rank(7, 1.0) == 1 and keep_rank(7, 1.0, "mergelm") == 1  # density 1 keeps everything
    tau = torch.tensor([[0.5, -3.0, 0.1, 2.0, -1.0, 0.7, 0.2, -0.3, 4.0, 0.05]])
    # floor: the 2 largest (4, -3); mergelm: the 4 largest (4, -3, 2, -1)
    torch.testing.assert_close(trim_topk(tau, 0.25), torch.tensor([[0, -3.0, 0, 0, 0, 0, 0, 0, 4.0, 0]]))
    four = torch.tensor([[0, -3.0, 0, 2.0, -1.0, 0, 0, 0, 4.0, 0]])
    torch.testing.assert_close(trim_topk(tau, 0.25, "mergelm"), four)
    # TIES at tensor scope and DARE+TIES (drop 0) on the same single task vector
    torch.testing.assert_close(merge_tensors("ties", torch.zeros(10), [tau[0]], density=0.25, scope="tensor"),
                               trim_topk(tau, 0.25)[0])  # fmt: skip
    dare = merge_tensors("dare", torch.zeros(10), [tau[0]], drop=0.0, combine="ties", density=0.25, scope="row")
    torch.testing.assert_close(dare, trim_topk(tau, 0.25, "mergelm")[0])


def test_ties_zero_sum_takes_the_majority_sign():
    # e0: +1 and -1 cancel; the other elected signs are -, -, so the majority is - and e0 takes -1
    base = torch.zeros(3)
    out = merge_tensors("ties", base, [torch.tensor([1.0, -2.0, -1.0]), torch.tensor([-1.0, -1.0, -3.0])], density=1)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.5, -2.0]))


# ---------------------------------------------------------------------------------------------------- DARE


def test_dare_by_hand_from_the_named_generators():
    base = torch.zeros(6)
    taus = [torch.arange(1.0, 7.0), -torch.arange(1.0, 7.0) * 2]
    out = merge_tensors("dare", base, taus, drop=0.5, name="layer.w", seed=1, lam=1.0)
    # model i keeps entry j where r_ij < -2^31 + (1 - p) 2^32, r uniform int32 from its stream (seed, tensor name, i)
    keep = [(Stream(1, "layer.w", i).int32(1, 6)[0] < 0).float() for i in range(2)]
    assert 0 < keep[0].sum() < 6
    expected = sum(t * k / 0.5 for t, k in zip(taus, keep))
    torch.testing.assert_close(out, expected)
    # drop=0 is task arithmetic with lam
    torch.testing.assert_close(merge_tensors("dare", base, taus, drop=0.0, lam=0.5), 0.5 * (taus[0] + taus[1]))


@pytest.mark.parametrize("keep_prob", [0.5, 0.5 + 1e-3, 0.5 - 3e-9, 0.2, 1e-6, 1 - 1e-6])
def test_bernoulli_mask_is_zero_one_and_matches_the_integer_draws(keep_prob):
    # near 0.5 the threshold -2^31 + p 2^32 has a fraction in fp32; the mask must still be exactly 0 / 1
    gens = [Stream(3, "w", i) for i in range(2)]
    mask = bernoulli_keep((37, 9), keep_prob, gens)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    threshold = math.floor(keep_prob * 2**32 - 2**31)
    for i in range(2):
        draws = Stream(3, "w", i).int32(37, 9).double()
        torch.testing.assert_close(mask[i], (draws < threshold).float(), atol=0, rtol=0)
        # the same decisions as the per-entry (tensor) keep probability path
        per_entry = bernoulli_keep((37, 9), torch.full((2, 37, 9), keep_prob), [Stream(3, "w", j) for j in range(2)])
        assert (per_entry[i] != mask[i]).sum() <= 1


def test_dare_kept_fraction_and_unbiased_in_expectation():
    tau = torch.randn(200, 100)
    out = merge_tensors("dare", torch.zeros_like(tau), [tau], drop=0.7, name="w")
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept] / 0.3)  # survivors rescaled by 1/(1-p)
    # the mean over 200 seeds approaches tau: per-entry std of the estimate is |tau| sqrt(p/(1-p)/200) ~ 0.11 |tau|
    small = tau[:4, :50]
    mean = torch.stack([merge_tensors("dare", torch.zeros_like(small), [small], drop=0.7, seed=s) for s in range(200)])
    err = (mean.mean(0) - small).abs() / small.abs().clamp_min(1e-3)
    assert err.mean() < 0.12 and (mean.mean(0) - small).mean().abs() < 0.02


def test_dare_l1_rescale_matches_the_l1_norm_and_ties_combine_elects():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(30, 20, generator=g)
    out = merge_tensors("dare", torch.zeros_like(tau), [tau], drop=0.6, rescale="l1", name="w")
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    assert (out == 0).float().mean() > 0.5
    taus = [torch.randn(30, 20, generator=g) for _ in range(3)]
    merged = merge_tensors("dare", torch.zeros(30, 20), taus, drop=0.3, combine="ties", name="w")
    dropped = torch.stack(
        [
            merge_tensors(
                "dare", torch.zeros(30, 20), taus, drop=0.3, name="w", weights=[float(i == j) for j in range(3)]
            )
            for i in range(3)
        ]
    )  # fmt: skip  (each model's dropped, rescaled task vector, from the same per-model generators)
    torch.testing.assert_close(merged, ties_reference(dropped.reshape(3, -1), 1.0, 1.0).reshape(30, 20))


# ---------------------------------------------------------------------------------------------------- DELLA


def test_della_keep_probabilities_by_hand_and_rise_with_rank():
    tau = torch.tensor([[[0.1, -0.3, 0.2]]])
    # ranks by |tau| ascending: 0.1 -> 0, 0.2 -> 1, 0.3 -> 2; normalized 0, 1/2, 1 -> p = 0.4 + 0.2 r
    torch.testing.assert_close(magprune_keep_prob(tau.abs(), 0.5, 0.1), torch.tensor([[[0.4, 0.6, 0.5]]]))
    # scope "tensor": ranked over the flattened tensor (ties by position), in place
    mag = torch.tensor([[0.2, 0.0, 0.2, 0.1, 0.0]])  # ranks 3, 0, 4, 2, 1 of 5 -> r = rank / 4
    expected = 0.4 + 0.2 * torch.tensor([[3.0, 0.0, 4.0, 2.0, 1.0]]) / 4
    assert magprune_keep_prob(mag, 0.5, 0.1, out=mag) is mag
    torch.testing.assert_close(mag, expected)
    # empirically: over many seeds the keep frequency is monotone in the magnitude rank
    row = torch.arange(1.0, 11.0)
    kept = torch.stack([
        merge_tensors("della", torch.zeros(1, 10), [row[None]], density=0.5, epsilon=0.4, seed=s, lam=1.0) != 0
        for s in range(400)
    ]).float().mean(0)[0]  # fmt: skip
    expected = 0.1 + 0.8 * torch.arange(10) / 9
    assert (kept - expected).abs().max() < 0.1
    assert kept[-3:].mean() > kept[:3].mean() + 0.5


@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (4, 1024), (1, 70001), (2, 3, 5)])
def test_rank_order_is_the_stable_argsort(shape):
    # zeros (untouched entries), repeated magnitudes, subnormals and the largest finite value: ranked by value,
    # then by position
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g).abs()
    x[torch.rand(shape, generator=g) < 0.5] = 0
    x[..., ::3] = x[..., :1].clone()
    x.view(-1)[:2] = torch.tensor([1e-45, torch.finfo(torch.float32).max])
    assert torch.equal(rank_order(x), x.argsort(dim=-1, stable=True))


def test_della_rescale_is_unbiased_and_elect_fuse_by_hand():
    # density + epsilon = 1 with epsilon = 0: everything kept, so DELLA = weighted sign election + disjoint mean
    base = torch.zeros(2)
    out = merge_tensors("della", base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], density=1.0,
                        epsilon=0.0, lam=2.0)  # fmt: skip
    torch.testing.assert_close(out, 2.0 * torch.tensor([2.0, -2.0]))
    tau = torch.randn(1, 40)
    runs = torch.stack([merge_tensors("della", torch.zeros(1, 40), [tau], seed=s, lam=1.0) for s in range(300)])
    assert (runs.mean(0) - tau).abs().mean() < 0.1 * tau.abs().mean()
    with pytest.raises(ValueError, match="epsilon"):
        merge_tensors("della", base, [base], density=0.9, epsilon=0.2)


# ------------------------------------------------------------------------------------------------------ PCB


def pcb_reference(tau: torch.Tensor, ratio: float, q: float, lam: float) -> torch.Tensor:
    """PCB as in the official pcb-merging.py (flattened [n, d], sort-based clamp, normalize, tanh balancing)."""

    def clamp(x, min_ratio=0.0, max_ratio=0.0):
        d = x.size(1)
        s, _ = torch.sort(x, dim=1)
        lo = s[:, int(d * min_ratio)].unsqueeze(1)
        hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    n = tau.shape[0]
    a = clamp(tau.abs(), q, q)
    clamped = torch.sign(tau) * a
    beta = torch.exp(n * normalize(a) ** 2) * torch.tanh(tau * tau.sum(0))
    scale = normalize(clamp(beta, 1 - ratio, 0))
    return lam * (clamped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


def test_pcb_matches_the_reference_code_and_respects_its_drop_ratio():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 40, 25, generator=g)
    out = merge_tensors("pcb", torch.zeros(40, 25), list(taus), ratio=0.2, clamp_q=0.02, lam=1.2)
    torch.testing.assert_close(out.reshape(-1), pcb_reference(taus.reshape(3, -1), 0.2, 0.02, 1.2), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # only the top-r fraction of each model's balanced scores gets a nonzero weight: a model alone (n = 1)
    # contributes exactly its kept entries
    out1 = merge_tensors("pcb", torch.zeros(40, 25), [taus[0]], ratio=0.2, clamp_q=0.0)
    assert abs((out1 != 0).float().mean().item() - 0.2) <= 1 / 1000 + 1e-9


def test_pcb_per_task_lambdas_scale_only_the_numerator():
    taus = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])]
    one = merge_tensors("pcb", torch.zeros(4), taus, ratio=1.0, clamp_q=0.0)
    both = merge_tensors("pcb", torch.zeros(4), taus, ratio=1.0, clamp_q=0.0, weights=[2.0, 2.0])
    torch.testing.assert_close(both, 2 * one)


# ----------------------------------------------------------------------------------------------------- STAR


def test_star_by_hand():
    base = torch.ones(2, 2)
    # s = (3, 1), eta 40%: 3 >= 0.4 * 4 -> rank 1; rescaled to the nuclear norm 4
    out = merge_tensors("star", base, [base + torch.diag(torch.tensor([3.0, 1.0]))], eta=40)
    torch.testing.assert_close(out, base + torch.diag(torch.tensor([4.0, 0.0])))
    # two tasks: average of the truncated matrices; eta 90% keeps both singular values of the first
    fts = [base + torch.diag(torch.tensor([3.0, 1.0])), base + torch.diag(torch.tensor([0.0, 2.0]))]
    torch.testing.assert_close(merge_tensors("star", base, fts, eta=90), base + torch.diag(torch.tensor([1.5, 1.5])))
    # 1-D tensors stay at the base (official code), or take the mean task vector
    v = torch.zeros(3)
    assert torch.equal(merge_tensors("star", v, [v + 1, v + 3]), v)
    torch.testing.assert_close(merge_tensors("star", v, [v + 1, v + 3], one_d="mean"), v + 2)


def test_star_preserves_the_nuclear_norm_and_lowers_the_rank():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 30, 20, generator=g)  # a batch of matrices, like an [E, d, f] expert tensor
    out, k = truncate(m, 40.0)
    torch.testing.assert_close(torch.linalg.matrix_norm(out, "nuc"), torch.linalg.matrix_norm(m, "nuc"))
    assert torch.equal(torch.linalg.matrix_rank(out), k) and (k < 20).all() and (k >= 1).all()
    # randomized SVD: reproducible from its generator, and it also keeps the nuclear norm of its approximation
    a = merge_tensors("star", torch.zeros(30, 20), [m[0]], svd="randomized", rank=5, name="w")
    b = merge_tensors("star", torch.zeros(30, 20), [m[0]], svd="randomized", rank=5, name="w")
    assert torch.equal(a, b) and torch.linalg.matrix_rank(a) <= 5


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 16), (3, 20, 7), (2, 5, 9), (1, 6), (6, 1)])
def test_star_gram_equals_the_svd_truncation(shape):
    # tall, wide, square, stacks of tall / wide matrices, single rows and columns
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    fts = [base + torch.randn(shape, generator=g) * (1 + i) for i in range(3)]
    exact = merge_tensors("star", base, fts, eta=40)
    gram = merge_tensors("star", base, fts, eta=40, svd="gram")
    torch.testing.assert_close(gram, exact, rtol=1e-4, atol=1e-4)
    delta = gram - base  # the mean of 3 rescaled truncations: nuclear norm at most the mean of theirs
    assert torch.linalg.matrix_norm(delta.reshape(-1, *shape[-2:]), "nuc").sum() <= sum(
        torch.linalg.matrix_norm((f - base).reshape(-1, *shape[-2:]), "nuc").sum() for f in fts
    ) / 3 * (1 + 1e-5)


def test_star_gram_streams_tall_matrices_only():
    star = METHODS["star"]
    p = star.resolve({"svd": "gram"}, 2)
    assert star.chunkable(p, (32000, 1024)) and star.chunkable(p, (8, 1024, 512)) and star.chunkable(p, (7,))
    assert not star.chunkable(p, (1024, 2816))  # wide: M M^T needs the whole matrix
    assert not star.chunkable(star.resolve({}, 2), (32000, 1024))  # the exact SVD needs the whole matrix


# ---------------------------------------------------------------------------------------------------- SLERP


def test_slerp_by_hand():
    r2 = math.sqrt(0.5)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # orthogonal: Omega = pi/2, t = 1/2 -> sin(pi/4) a + sin(pi/4) b (a lerp would give [0.5, 0.5])
    torch.testing.assert_close(merge_tensors("slerp", a, [b]), torch.tensor([r2, r2]))
    # t = 1/3 -> sin(pi/3) a + sin(pi/6) b; t = 0 / 1 give the ends exactly
    torch.testing.assert_close(merge_tensors("slerp", a, [b], t=1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5]))
    assert torch.equal(merge_tensors("slerp", a, [b], t=0.0), a)
    assert torch.equal(merge_tensors("slerp", a, [b], t=1.0), b)
    # the angle comes from the normalized tensors, the coefficients apply to the raw ones: |a| = 2 -> [sqrt 2, r2]
    torch.testing.assert_close(merge_tensors("slerp", 2 * a, [b]), torch.tensor([2 * r2, r2]))
    # colinear (cos = 1) and antipodal (cos = -1): the lerp fallback, 0.75 a + 0.25 b and 0.5 a + 0.5 b
    torch.testing.assert_close(merge_tensors("slerp", torch.tensor([1.0, 2.0]), [torch.tensor([2.0, 4.0])], t=0.25),
                               torch.tensor([1.25, 2.5]))  # fmt: skip
    torch.testing.assert_close(merge_tensors("slerp", a, [-3 * a]), torch.tensor([-1.0, 0.0]))
    # two models (FusionBench): between them; the base only names the tensor
    torch.testing.assert_close(merge_tensors("slerp", torch.full((2,), 7.0), [a, b]), torch.tensor([r2, r2]))


def test_slerp_stays_on_the_sphere_and_the_angle_is_linear_in_t():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    a, b = a / a.norm(), b / b.norm()
    omega = torch.arccos((a * b).sum())
    for t in (0.1, 0.5, 0.8):
        out = merge_tensors("slerp", a, [b], t=t)
        torch.testing.assert_close(out.norm(), torch.tensor(1.0))  # a lerp of unit vectors would be shorter
        torch.testing.assert_close(torch.arccos((out * a).sum().clamp(-1, 1)), t * omega, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Model Stock


def test_model_stock_by_hand():
    base = torch.tensor([1.0, -1.0])
    # tau = [1, 0], [1, 1]: cos = 1 / sqrt 2, t = 2 cos / (1 + cos) = 2 (sqrt 2 - 1); mean tau = [1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    out = merge_tensors("model_stock", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(out, base + t * torch.tensor([1.0, 0.5]))
    # orthogonal task vectors: t = 0 (the base); identical ones: t = 1 (their average); opposite: singular -> base
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(merge_tensors("model_stock", base, [base + e1, base + e2]), base)
    torch.testing.assert_close(merge_tensors("model_stock", base, [base + e1, base + e1]), base + e1)
    torch.testing.assert_close(merge_tensors("model_stock", base, [base + e1, base - e1]), base)
    # N = 3 (e1, e1, e2): pair cosines 1, 0, 0 -> cos 1/3, t = 3 (1/3) / (1 + 2/3) = 0.6; mean tau [2/3, 1/3]
    out = merge_tensors("model_stock", base, [base + e1, base + e1, base + e2])
    torch.testing.assert_close(out, base + torch.tensor([0.4, 0.2]))


def test_model_stock_filter_wise_takes_one_ratio_per_row():
    base = torch.zeros(2, 2)
    tau1, tau2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # row 0: cos 1/sqrt 2 -> t = 2 (sqrt 2 - 1); row 1: orthogonal -> t = 0
    t = 2 * (math.sqrt(2) - 1)
    out = merge_tensors("model_stock", base, [tau1, tau2], filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[t, t * 0.5], [0.0, 0.0]]))
    # per tensor: cos = <tau1, tau2> / (|tau1| |tau2|) = 1 / (sqrt 2 sqrt 6)
    c = 1 / math.sqrt(12)
    torch.testing.assert_close(merge_tensors("model_stock", base, [tau1, tau2]), 2 * c / (1 + c) * (tau1 + tau2) / 2)


# ---------------------------------------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_by_hand():
    tau = torch.tensor([0.1, -5.0, 0.3, -0.2, 2.0, 0.05, 1.0, -0.4, 0.6, 3.0])
    # n = 10, density 0.5, gamma 0.1: keep int(5.0) = 5, drop the top int(1.0) = 1 (|-5|) and the bottom
    # 10 - 5 - 1 = 4 (0.05, 0.1, 0.2, 0.3); lam 0.5 scales the rest
    kept = torch.tensor([0, 0, 0, 0, 2.0, 0, 1.0, -0.4, 0.6, 3.0])
    out = merge_tensors("breadcrumbs", torch.ones(10), [1 + tau], density=0.5, gamma=0.1, lam=0.5)
    torch.testing.assert_close(out, 1 + 0.5 * kept)
    # density + gamma > 1: fewer top entries go (mergekit): keep int(9.5) = 9, bottom max(0, 10 - 9 - 1) = 0
    out = merge_tensors("breadcrumbs", torch.zeros(10), [tau], density=0.95, gamma=0.1, lam=1.0)
    torch.testing.assert_close(out, tau * (tau.abs() < 5))
    # density 1 keeps everything (gamma too is then moot); int(0.5) = 0 keeps nothing
    torch.testing.assert_close(merge_tensors("breadcrumbs", torch.zeros(10), [tau], density=1.0, lam=1.0), tau)
    assert not merge_tensors("breadcrumbs", torch.zeros(10), [tau], density=0.05, gamma=0.0).any()
    # row scope (the official code's topk over the last dim): C = 5, density 0.6, gamma 0.2 -> keep 3, top 1,
    # bottom 1 per row
    rows = tau.reshape(2, 5)
    out = merge_tensors("breadcrumbs", torch.zeros(2, 5), [rows], density=0.6, gamma=0.2, lam=1.0, scope="row")
    torch.testing.assert_close(out, torch.tensor([[0, 0, 0.3, -0.2, 2.0], [0, 1.0, -0.4, 0.6, 0]]))
    # task arithmetic on the masked vectors: linear in the weights
    two = merge_tensors("breadcrumbs", torch.zeros(10), [tau, -2 * tau], density=0.5, gamma=0.1, lam=1.0,
                        weights=[1.0, 0.5])  # fmt: skip
    torch.testing.assert_close(two, torch.zeros(10))  # kept + 0.5 * (-2 kept)


# ---------------------------------------------------------------------------------------------------- TSV-M


def test_tsv_m_by_hand():
    base = torch.ones(2, 2)
    # r = 2, T = 2 -> k = int(2 * 1/2) = 1 triplet per task: (e1, 3, e1) from diag(3, 1), (e2, 2, e2) from
    # diag(0, 2); U^ = V^ = I are already orthogonal: delta = diag(3, 2) (task arithmetic would give diag(3, 3))
    fts = [base + torch.diag(torch.tensor([3.0, 1.0])), base + torch.diag(torch.tensor([0.0, 2.0]))]
    torch.testing.assert_close(merge_tensors("tsv_m", base, fts), base + torch.diag(torch.tensor([3.0, 2.0])))
    # per-task weights scale tau_t before the SVDs (FusionBench's alpha list); lam scales the result
    out = merge_tensors("tsv_m", base, fts, weights=[2.0, 1.0], lam=0.5)
    torch.testing.assert_close(out, base + 0.5 * torch.diag(torch.tensor([6.0, 2.0])))
    # 1-D tensors: the mean task vector; r < T (a 1-row matrix, 2 tasks): k = 0, the base
    torch.testing.assert_close(merge_tensors("tsv_m", torch.zeros(3), [torch.ones(3), 3 * torch.ones(3)]),
                               torch.full((3,), 2.0))  # fmt: skip
    assert torch.equal(merge_tensors("tsv_m", torch.zeros(1, 4), [torch.ones(1, 4), torch.ones(1, 4)]),
                       torch.zeros(1, 4))  # fmt: skip


def test_tsv_m_keeps_each_tasks_top_singular_values():
    # the orthogonalized bases make the merged spectrum exactly the tasks' kept singular values
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 12, 9, generator=g)
    delta = merge_tensors("tsv_m", torch.zeros(12, 9), list(taus))  # r = 9, k = 3 per task
    kept = torch.cat([torch.linalg.svdvals(t)[:3] for t in taus]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(delta), kept, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- Iso-C / CTS


def test_iso_c_by_hand_and_flat_spectrum():
    base = torch.zeros(2, 2)
    # sum of tau = diag(3, 1): U V^T = I, mean singular value 2 -> 2 I (the sum, not the mean, of the tasks)
    fts = [torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))]
    torch.testing.assert_close(merge_tensors("iso_c", base, fts), 2 * torch.eye(2))
    torch.testing.assert_close(merge_tensors("iso_c", base, fts, lam=1.5), 3 * torch.eye(2))
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 10, 6, generator=g)
    delta = merge_tensors("iso_c", torch.zeros(10, 6), list(taus))
    s = torch.linalg.svdvals(taus.sum(0))
    torch.testing.assert_close(torch.linalg.svdvals(delta), s.mean().expand(6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merge_tensors("iso_c", torch.zeros(3), [torch.ones(3), 3 * torch.ones(3)]),
                               torch.full((3,), 2.0))  # 1-D: the mean  # fmt: skip


def test_iso_cts_by_hand():
    # r = 4, T = 2, f = 0.5: k = int(2.0) = 2 common directions, s = round(2 / 2) = 1 per task
    assert cts_sizes(4, 2, 0.5) == (2, 1)
    assert cts_sizes(10, 3, 0.8) == (7, 1)  # k = 8, round(2/3) = 1 -> the rest splits evenly: k = 10 - 3
    assert cts_sizes(9, 2, 0.5) == (5, 2)  # k = 4, round(2.5) = 2 (half to even) -> k = 5
    assert cts_sizes(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 directions per task would exceed r: cut to r // T
    # tau1 = diag(4, 0, 1, 0), tau2 = diag(0, 3, 0.5, 2): the sum diag(4, 3, 1.5, 2) gives the common e1, e2;
    # outside them tau1 keeps (e3, 1) and tau2 (e4, 2): kept singular values 4, 3, 1, 2 -> mean 2.5, delta = 2.5 I.
    # Iso-C flattens all of the sum's spectrum instead: mean(4, 3, 1.5, 2) = 2.625.
    fts = [torch.diag(torch.tensor([4.0, 0.0, 1.0, 0.0])), torch.diag(torch.tensor([0.0, 3.0, 0.5, 2.0]))]
    cts = merge_tensors("iso_cts", torch.zeros(4, 4), fts, common_fraction=0.5)
    torch.testing.assert_close(cts, 2.5 * torch.eye(4))
    torch.testing.assert_close(merge_tensors("iso_c", torch.zeros(4, 4), fts), 2.625 * torch.eye(4))
    # common_fraction 1: no task directions, so Iso-CTS is Iso-C
    g = torch.Generator().manual_seed(2)
    taus = list(torch.randn(3, 8, 11, generator=g))
    torch.testing.assert_close(merge_tensors("iso_cts", torch.zeros(8, 11), taus, common_fraction=1.0),
                               merge_tensors("iso_c", torch.zeros(8, 11), taus), rtol=1e-4, atol=1e-4)  # fmt: skip
    delta = merge_tensors("iso_cts", torch.zeros(8, 11), taus)  # a flat spectrum too
    sv = torch.linalg.svdvals(delta)
    torch.testing.assert_close(sv, sv.mean().expand(8), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, params", [
    ("slerp", {"t": 0.3}), ("model_stock", {}), ("model_stock", {"filter_wise": True}), ("breadcrumbs", {}),
    ("breadcrumbs", {"scope": "row", "density": 0.5, "gamma": 0.1}), ("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}),
])  # fmt: skip
def test_new_methods_stream_like_in_memory(tmp_path, method, params):
    # small chunks: the stages (norms, Gram matrices, rank bounds) are gathered over a tensor's chunks first
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(24, 16, generator=g), "v": torch.randn(16, generator=g), "e": torch.randn(3, 8, 6)}
    n = 1 if method == "slerp" else 3
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    save_file(base, tmp_path / "base.safetensors")
    for i, f in enumerate(fts):
        save_file(f, tmp_path / f"ft{i}.safetensors")
    out = merge(tmp_path / "base.safetensors", [tmp_path / f"ft{i}.safetensors" for i in range(n)], tmp_path / "out",
                method=method, progress=False, chunk_elems=40, hold_bytes=0, **params)  # fmt: skip
    got = load_file(out)
    for name, b in base.items():
        expected = merge_tensors(method, b, [f[name] for f in fts], name=name, **params)
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------- order statistics, RNG


@pytest.mark.parametrize("m", [1000, 70_000])
def test_order_stats_are_exact(m):
    x = torch.randn(3, m)
    x[0, : m // 3] = 0.0
    ranks = [1, m // 3, m // 3 + 1, m // 2, m]
    expected = torch.stack([x.kthvalue(k, dim=1).values for k in ranks], 1)
    assert torch.equal(order_stats(x, ranks), expected)


@pytest.mark.parametrize("sample", ["representative", "misleading"])
def test_streamed_select_is_exact_even_when_the_sample_misleads(sample):
    x = torch.randn(2, 50_000)
    x[1, :20_000] = 0.0
    ranks = [1, 10_000, 20_001, 45_000, 50_000]
    sel = StreamSelect(ranks, 50_000)
    passes = 0
    while passes < sel.passes:
        if sel.sampling:
            sel.update(x[:, ::7] if sample == "representative" else torch.full((2, 100), 3.0))
        else:
            for chunk in x.split(7_000, dim=1):
                sel.update(chunk)
        sel.end_pass()
        passes += 1
    assert passes == (2 if sample == "representative" else 4)  # a missed bracket falls back to radix select
    assert torch.equal(sel.result(), torch.stack([x.kthvalue(k, dim=1).values for k in ranks], 1))


@pytest.mark.parametrize("method", ["dare", "della", "star"])
def test_random_methods_are_deterministic_across_runs_threads_and_order(method):
    params = {"svd": "randomized", "rank": 4} if method == "star" else {}
    base = torch.randn(64, 48)
    fts = [base + torch.randn(64, 48) for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_tensors(method, base, fts, name="a", **params)
        torch.set_num_threads(max(2, threads))
        merge_tensors(method, base, fts, name="b", **params)  # another tensor first: no shared RNG state
        torch.manual_seed(123)  # the global RNG is not used
        two = merge_tensors(method, base, fts, name="a", **params)
        torch.set_num_threads(1)
        three = merge_tensors(method, base, fts, name="a", **params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    if method == "star":  # same random draws; LAPACK's SVD/QR sum in a thread-dependent order (last-bit differences)
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(one, two)
    assert not torch.equal(one, merge_tensors(method, base, fts, name="c", **params))  # the name seeds it


# ------------------------------------------------------------------------------------------- validation


def test_bad_parameters_name_the_field():
    z = torch.zeros(3)
    cases = [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"scope": "model"}, "scope"),
        ("ties", {"sign": "mass"}, "sign"),
        ("dare", {"drop": 1.0}, "drop"),
        ("dare", {"rescale": "l2"}, "rescale"),
        ("dare", {"combine": "mean"}, "combine"),
        ("pcb", {"ratio": 0.0}, "ratio"),
        ("pcb", {"clamp_q": 0.5}, "clamp_q"),
        ("star", {"eta": 0.0}, "eta"),
        ("star", {"svd": "lowrank"}, "svd"),
        ("linear", {"density": 0.5}, "density"),
        ("task_arithmetic", {"weights": [1.0]}, "weights"),
        ("breadcrumbs", {"gamma": 1.0}, "gamma"),
        ("breadcrumbs", {"density": 1.5}, "density"),
        ("breadcrumbs", {"scope": "global"}, "scope"),
        ("slerp", {"t": float("nan")}, "t="),
        ("model_stock", {"filter_wise": "yes"}, "filter_wise"),
        ("iso_cts", {"common_fraction": 1.2}, "common_fraction"),
        ("tsv_m", {"eta": 40.0}, "eta"),
    ]
    for method, params, field in cases:
        with pytest.raises(ValueError, match=field):
            merge_tensors(method, z, [z, z], **params)
    with pytest.raises(ValueError, match=r"finetuned\[1\]"):
        merge_tensors("ties", z, [z, torch.zeros(4)])
    with pytest.raises(ValueError, match="slerp"):
        merge_tensors("slerp", z, [z, z, z])
    with pytest.raises(ValueError, match="at least 2"):
        merge_tensors("model_stock", z, [z])
    assert {"linear", "task_arithmetic", "ties", "dare", "della", "pcb", "star", "slerp", "model_stock", "tsv_m",
            "iso_c", "iso_cts", "breadcrumbs"} <= set(METHODS)  # fmt: skip
    # every registered method documents its parameters and is a pure function of its inputs: it leaves them as
    # they were, gives the same result again (seeded draws included), and its result depends on the fine-tunes
    base = torch.linspace(-1, 1, 12).reshape(3, 4)
    g = torch.Generator().manual_seed(0)
    fts = [base + torch.randn(3, 4, generator=g), base + torch.randn(3, 4, generator=g)]
    for m in METHODS.values():
        assert m.reference_url.startswith("https://") and all(p.doc for p in m.params.values())
        inputs = [t.clone() for t in (base, *fts)]
        first = m(base, fts, name="x")
        assert all(torch.equal(a, b) for a, b in zip(inputs, (base, *fts))), m.name  # nothing changed in place
        assert torch.equal(first, m(base, fts, name="x")), m.name
        assert first.shape == base.shape and torch.isfinite(first).all(), m.name
        assert not torch.equal(first, m(base, [fts[1], fts[1] + 1], name="x")), m.name


def test_stream_rows_do_not_depend_on_chunking_and_bits_are_uniform():
    whole = Stream(3, "w", 1).int32(4, 5)  # odd width: each row still takes whole 64-bit words
    s = Stream(3, "w", 1)
    assert torch.equal(whole, torch.cat([s.int32(1, 5), s.int32(3, 5)]))
    assert not torch.equal(whole, Stream(3, "w", 2).int32(4, 5))  # another model index, another stream
    r = Stream(0, "u", 0).int32(1000, 100)
    assert abs((r < 0).float().mean().item() - 0.5) < 0.005  # the sign bit is a fair coin
    assert abs((r < -(1 << 31) + (1 << 30)).float().mean().item() - 0.25) < 0.005
