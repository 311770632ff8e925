"""Router invariants and hand-worked loss values."""

import math

import pytest
import torch

from moe.nn.losses import balance_loss, load_balancing_loss, router_z_loss, z_loss_from_lse
from moe.nn.routing import route, softmax_topk


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (7, 5, 1), (33, 13, 3), (16, 8, 8), (64, 8, 2)])  # E=1, prime E, k=E
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_invariants(T, E, k, renormalize):
    logits = torch.randn(T, E) * 3
    r = route(logits, k, renormalize=renormalize)
    assert r.weights.shape == (T, k) and r.ids.shape == (T, k)
    assert r.weights.dtype == torch.float32
    # ids are distinct per token and pick the k largest logits
    assert (r.ids.sort(dim=1).values.diff(dim=1) > 0).all()
    kth = logits.topk(k, dim=1).values[:, -1:]
    assert (logits.gather(1, r.ids) >= kth).all()
    # counts are the histogram of the ids and sum to T*k
    assert torch.equal(r.counts, torch.bincount(r.ids.flatten(), minlength=E))
    assert r.counts.sum() == T * k
    sums = r.weights.sum(1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(T))
    else:
        # full-softmax probabilities of the kept experts: sum <= 1, equal to probs at ids
        torch.testing.assert_close(r.weights, r.probs.gather(1, r.ids))
        assert (sums <= 1 + 1e-6).all()


def test_renormalized_topk_equals_softmax_over_kept_logits():
    logits = torch.randn(50, 9)
    _, w, ids = softmax_topk(logits, 3, renormalize=True)
    torch.testing.assert_close(w, torch.softmax(logits.gather(1, ids), dim=1))


def test_ties_pick_lowest_id_and_minus_inf_never_chosen():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, -math.inf, 2.0, -math.inf]])
    r = route(logits, 2)
    assert r.ids[0].tolist() == [0, 1]
    assert r.weights[0].tolist() == [0.5, 0.5]
    assert set(r.ids[1].tolist()) == {0, 2}
    assert torch.isfinite(r.weights).all()


def test_invalid_k_is_a_clear_error():
    with pytest.raises(ValueError, match="k=5"):
        route(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.randn(2, 3, 4), 1)


def test_switch_loss_is_one_at_uniform_and_hf_is_k():
    T, E, k = 8, 4, 2
    probs = torch.full((T, E), 1 / E)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)  # perfectly balanced dispatch
    assert load_balancing_loss(probs, ids, E, "switch").item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, ids, E, "hf").item() == pytest.approx(k)


def test_switch_loss_hand_worked_collapse():
    # all 4 tokens (k=1) on expert 0 with p = [0.7, 0.1, 0.1, 0.1]: E * f0 * P0 = 4 * 1 * 0.7 = 2.8
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(4, 1)
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert load_balancing_loss(probs, ids, 4).item() == pytest.approx(2.8)


def test_losses_from_column_sums_hand_worked():
    # what the fused router hands over: prob_sums [E], counts [E], lse [T]; the collapse above from sums alone
    prob_sums, counts = torch.tensor([2.8, 0.4, 0.4, 0.4]), torch.tensor([4, 0, 0, 0])
    assert balance_loss(prob_sums, counts, 4, 1).item() == pytest.approx(2.8)
    assert balance_loss(prob_sums, counts, 4, 1, "hf").item() == pytest.approx(2.8)  # k=1: the same
    # k=2 on 2 tokens, expert 0 takes 3 of the 4 slots: switch 4 * (3/4 * 0.7 + 1/4 * 0.1) = 2.2, hf = 2 * switch
    prob_sums2, counts2 = torch.tensor([1.4, 0.2, 0.2, 0.2]), torch.tensor([3, 1, 0, 0])
    assert balance_loss(prob_sums2, counts2, 2, 2).item() == pytest.approx(2.2)
    assert balance_loss(prob_sums2, counts2, 2, 2, "hf").item() == pytest.approx(4.4)
    # data-parallel counts (another rank balanced the load: [3, 1, 2, 2] over 8 slots) replace the local ones
    glob = torch.tensor([3, 1, 2, 2])
    assert balance_loss(prob_sums2, counts2, 2, 2, "switch", glob).item() == pytest.approx(4 * (3 * 0.7 + 0.1 + 0.2
                                                                                               + 0.2) / 8)  # fmt: skip
    with pytest.raises(ValueError, match="'switch' and 'hf'"):
        balance_loss(prob_sums, counts, 4, 1, "sequence")
    lse = torch.tensor([math.log(2), 0.0, -1.0])
    assert z_loss_from_lse(lse).item() == pytest.approx((math.log(2) ** 2 + 1) / 3)
    assert z_loss_from_lse(lse[:0]).item() == 0.0


def test_switch_loss_gradient_flows_through_probs_only():
    logits = torch.randn(6, 3, requires_grad=True)
    r = route(logits, 1)
    r.aux_loss.backward()
    # d/dlogits of E * sum_e f_e * mean_t p_te, with f fixed
    f = r.counts.float() / 6
    expected = torch.autograd.functional.jacobian(
        lambda x: 3 * (torch.softmax(x, 1).mean(0) * f).sum(), logits.detach()
    )
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_hand_worked_and_zero_for_log_probs():
    # logsumexp([0, 0]) = log 2 for both tokens -> mean of (log 2)^2
    assert router_z_loss(torch.zeros(2, 2)).item() == pytest.approx(math.log(2) ** 2)
    logp = torch.log_softmax(torch.randn(5, 7), dim=1)
    assert router_z_loss(logp).item() == pytest.approx(0.0, abs=1e-10)
    x = torch.randn(4, 3, requires_grad=True)
    router_z_loss(x).backward()
    lse = torch.logsumexp(x.detach(), 1, keepdim=True)
    torch.testing.assert_close(x.grad, 2 / 4 * lse * torch.softmax(x.detach(), 1))


def test_all_tokens_on_one_expert():
    logits = torch.tensor([[10.0, 0, 0]]).repeat(20, 1)
    r = route(logits, 1)
    assert r.counts.tolist() == [20, 0, 0]
    assert torch.equal(r.weights, torch.ones(20, 1))
