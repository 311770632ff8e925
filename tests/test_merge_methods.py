"""Merge methods: hand-computed examples, reference implementations written from the papers' code, properties."""

import math

import pytest
import torch

from merging import METHODS, merge_tensors
from merging.registry import Stream
from merging.select import StreamSelect, order_stats
from merging.sparsify import bernoulli_keep, elect_sign, magprune_keep_prob, rank_order, trim_topk
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


def ties_reference(tau: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    """TIES as the official ties-merging code does it on flattened task vectors [n, d], written from its steps:
    topk_values_mask (keep |x| >= the (d - ceil(d k))+1-th smallest: ceil so density means 'at least'),
    resolve_sign 'mass' with zeros -> majority, disjoint mean."""
    n, d = tau.shape
    kth = d - math.ceil(d * k) + 1
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
    ]
    for method, params, field in cases:
        with pytest.raises(ValueError, match=field):
            merge_tensors(method, z, [z, z], **params)
    with pytest.raises(ValueError, match=r"finetuned\[1\]"):
        merge_tensors("ties", z, [z, torch.zeros(4)])
    assert {"linear", "task_arithmetic", "ties", "dare", "della", "pcb", "star"} <= set(METHODS)
    # every registered method is callable as a pure function and documents its parameters
    for m in METHODS.values():
        assert m.reference_url.startswith("https://") and all(p.doc for p in m.params.values())
        torch.testing.assert_close(m(z, [z + 1], name="x"), m(z, [z + 1], name="x"))


def test_stream_rows_do_not_depend_on_chunking_and_bits_are_uniform():
    whole = Stream(3, "w", 1).int32(4, 5)  # odd width: each row still takes whole 64-bit words
    s = Stream(3, "w", 1)
    assert torch.equal(whole, torch.cat([s.int32(1, 5), s.int32(3, 5)]))
    assert not torch.equal(whole, Stream(3, "w", 2).int32(4, 5))  # another model index, another stream
    r = Stream(0, "u", 0).int32(1000, 100)
    assert abs((r < 0).float().mean().item() - 0.5) < 0.005  # the sign bit is a fair coin
    assert abs((r < -(1 << 31) + (1 << 30)).float().mean().item() - 0.25) < 0.005
