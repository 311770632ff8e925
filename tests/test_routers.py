"""Routers, routing options and router losses: invariants and hand-worked numbers (gating-spec.md)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.config import ExpertChoiceConfig, GumbelConfig, NoisyTopKConfig, RouterConfig
from moe.nn.losses import band_kl_loss, cv_squared, importance_loss, load_balancing_loss, symmetric_kl
from moe.nn.routers import ExpertChoiceRouter, GumbelRouter, NoisyTopKRouter, TopKRouter, build_router, gumbel_tau
from moe.nn.routing import group_limited_mask, route


def test_topk_then_softmax_equals_renormalised_softmax_then_topk():
    logits = torch.randn(40, 7)
    a = route(logits, 3, order="topk_then_score")
    b = route(logits, 3, order="score_then_topk", renormalize=True)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.weights, b.weights)


def test_sigmoid_without_renormalisation_keeps_raw_scores():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    r = route(logits, 2, score="sigmoid", renormalize=False)
    assert r.ids.tolist() == [[0, 2]]
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[2.0, 0.5]])))
    torch.testing.assert_close(r.probs.sum(1), torch.ones(1))  # the aux distribution is normalised


def test_bias_only_selects():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0])  # pushes expert 2 into the top-2 ...
    r = route(logits, 2, score="sigmoid", renormalize=False, bias=bias)
    assert r.ids.tolist() == [[2, 0]]
    # ... but its weight is its unbiased score
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[1.0, 3.0]])))


def test_group_limited_routing_hand_worked():
    # 8 experts in 4 groups of 2. Group scores (sum of the group's two): [0.3, 1.7, 1.0, 0.9] -> keep groups 1, 2
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.6, 0.4, 0.85, 0.05]])
    mask = group_limited_mask(scores, 4, 2)
    assert mask.tolist() == [[False, False, True, True, True, True, False, False]]
    r = route(torch.logit(scores), 3, score="sigmoid", n_group=4, topk_group=2, renormalize=False, scaling=2.0)
    assert r.ids.tolist() == [[2, 3, 4]]  # expert 6 (0.85) is in a dropped group
    torch.testing.assert_close(r.weights, 2.0 * torch.tensor([[0.9, 0.8, 0.6]]))
    with pytest.raises(ValueError, match="n_group"):
        route(torch.randn(2, 7), 2, n_group=2, topk_group=1)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 24),
    E=st.sampled_from([1, 2, 3, 5, 7, 13]),
    k_frac=st.floats(0, 1),
    score=st.sampled_from(["softmax", "sigmoid", "sparsemax", "entmax15", "ssmax", "adaptive_temperature"]),
    order=st.sampled_from(["score_then_topk", "topk_then_score"]),
    ties=st.booleans(),
    neg_inf=st.booleans(),
)
def test_route_properties(T, E, k_frac, score, order, ties, neg_inf):
    k = 1 + round(k_frac * (E - 1))  # covers k = 1 and k = E
    logits = torch.randn(T, E) * 3
    if ties:
        logits = logits.round()
    if neg_inf and E > k:
        logits[:, -1] = float("-inf")  # never a whole row, and at least k finite entries remain
    r = route(logits, k, score=score, order=order)
    assert r.weights.shape == (T, k) and r.weights.dtype == torch.float32
    assert torch.isfinite(r.weights).all() and (r.weights >= 0).all()
    assert (r.ids.sort(1).values.diff(1) > 0).all()  # k distinct experts per token
    assert r.counts.sum() == T * k and torch.equal(r.counts, torch.bincount(r.ids.flatten(), minlength=E))
    sums = r.weights.sum(1)
    nonzero = sums > 0
    torch.testing.assert_close(sums[nonzero], torch.ones_like(sums[nonzero]))
    torch.testing.assert_close(r.probs.sum(1), torch.ones(T))
    if neg_inf and E > k:
        assert (r.ids != E - 1).all()
    assert torch.isfinite(r.aux_loss) and r.aux_loss >= 0


def test_sequence_aux_loss_hand_worked():
    E, S = 2, 2
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]])
    ids = torch.tensor([[0], [1], [0], [0]])
    # sequence 1: f = [1/2, 1/2], P = [0.5, 0.5] -> 2 * 0.5 = 1
    # sequence 2: f = [1, 0],   P = [0.8, 0.2] -> 2 * 0.8 = 1.6 ;  mean = 1.3
    assert load_balancing_loss(probs, ids, E, mode="sequence", seq_len=S).item() == pytest.approx(1.3)
    # the batch-level loss sees f = [3/4, 1/4], P = [0.65, 0.35] -> 2 * (0.4875 + 0.0875) = 1.15
    assert load_balancing_loss(probs, ids, E, mode="switch").item() == pytest.approx(1.15)


def test_cv2_importance_and_band_losses_hand_worked():
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)  # var 1, mean^2 4
    assert importance_loss(torch.full((6, 4), 0.25)).item() == pytest.approx(0.0)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    d = 0.5 * (
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    )
    assert symmetric_kl(p, q).item() == pytest.approx(d, rel=1e-5)
    assert symmetric_kl(q, p).item() == pytest.approx(d, rel=1e-5)
    pa, pb = p.expand(3, 2), q.expand(5, 2)
    assert band_kl_loss(pa, pb, low=0.1, high=1.0).item() == pytest.approx(0.0)  # d = 0.51 is inside the band
    assert band_kl_loss(pa, pb, low=1.5, high=2.0).item() == pytest.approx(1.5 - d, rel=1e-5)
    assert band_kl_loss(pa, pb, low=0.0, high=0.2).item() == pytest.approx(d - 0.2, rel=1e-5)


def test_aux_free_bias_moves_towards_underloaded_experts():
    router = TopKRouter(4, 3, RouterConfig(score="sigmoid", k=1, bias_update_rate=0.1))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0
    x = torch.zeros(10, 4)
    x[:, 0] = 1.0  # every token prefers expert 0
    router.train()
    r = router(x)
    assert r.counts.tolist() == [10, 0, 0]
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    router.eval()
    router(x)
    router.update_bias()  # eval forward passes are not counted
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))


def test_noisy_topk_has_k_nonzero_gates_and_trains_its_noise():
    cfg = RouterConfig(kind="noisy_topk", k=2, importance_loss_coef=0.1, noisy_topk=NoisyTopKConfig(load_loss_coef=0.1))
    router = NoisyTopKRouter(6, 5, cfg)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.normal_()
    x = torch.randn(32, 6)
    router.train()
    r = router(x)
    assert r.weights.shape == (32, 2)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(32))
    loss = r.extra_losses["importance"] + r.extra_losses["load"]
    loss.backward()
    assert router.w_noise.grad.abs().sum() > 0  # the load loss reaches the noise scale (through Phi)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.ids, b.ids)  # no noise at eval


def test_gumbel_argmax_frequencies_match_softmax():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]])
    n = 20000
    gumbel = -torch.empty(n, 4).exponential_().log()
    freq = torch.bincount((logits + gumbel).argmax(1), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, 1)[0], atol=0.015, rtol=0)
    router = GumbelRouter(4, 4, RouterConfig(kind="gumbel", k=1, gumbel=GumbelConfig(tau=0.7)))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    router.train()
    x = logits.expand(n, 4)
    picks = torch.bincount(router(x).ids.flatten(), minlength=4).float() / n
    torch.testing.assert_close(picks, torch.softmax(logits, 1)[0], atol=0.015, rtol=0)  # argmax is tau-free


def test_gumbel_straight_through_forward_is_hard_and_gradient_is_soft():
    torch.manual_seed(3)
    cfg_soft = RouterConfig(kind="gumbel", k=2)
    cfg_hard = RouterConfig(kind="gumbel", k=2, gumbel=GumbelConfig(hard=True))
    soft, hard = GumbelRouter(5, 6, cfg_soft), GumbelRouter(5, 6, cfg_hard)
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(8, 5)
    torch.manual_seed(0)
    rs = soft.train()(x)
    torch.manual_seed(0)
    rh = hard.train()(x)
    assert torch.equal(rs.ids, rh.ids)
    torch.testing.assert_close(rh.weights, torch.full((8, 2), 0.5))
    g_soft = torch.autograd.grad((rs.weights * torch.arange(2.0)).sum(), soft.weight)[0]
    g_hard = torch.autograd.grad((rh.weights * torch.arange(2.0)).sum(), hard.weight)[0]
    torch.testing.assert_close(g_hard, g_soft)


def test_gumbel_eval_is_deterministic_and_tau_anneals():
    router = GumbelRouter(5, 6, RouterConfig(kind="gumbel", k=2,
                                           gumbel=GumbelConfig(tau=1.0, tau_min=0.5, tau_anneal_rate=1e-3))).eval()
    x = torch.randn(8, 5)
    a, b = router(x), router(x)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    router.anneal(200)
    assert router.tau.item() == pytest.approx(math.exp(-0.2))
    router.anneal(10**6)
    assert router.tau.item() == pytest.approx(0.5)
    assert gumbel_tau(0, 1.0, 1e-3, 0.5) == 1.0


def test_expert_choice_respects_capacity():
    cfg = RouterConfig(kind="expert_choice", expert_choice=ExpertChoiceConfig(capacity_factor=2.0))
    router = ExpertChoiceRouter(6, 4, cfg)
    r = router(torch.randn(10, 6))
    C = math.ceil(2.0 * 10 / 4)
    assert r.expert_tokens.shape == (4, C)
    for e in range(4):  # each expert takes exactly C distinct tokens, its highest-probability ones
        toks = r.expert_tokens[e]
        assert toks.unique().numel() == C
        assert r.probs[toks, e].min() >= r.probs[:, e].topk(C).values.min()
    assert (r.weights > 0).sum() == 4 * C  # total assignments = n * c


def test_unknown_router_and_score_are_named():
    with pytest.raises(ValueError, match="router.kind"):
        build_router(4, 4, RouterConfig(kind="nope"))
    with pytest.raises(ValueError, match="router.score"):
        build_router(4, 4, RouterConfig(score="nope"))
