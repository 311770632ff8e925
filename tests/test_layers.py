"""MoE layer types: capacity and drops, shared/residual experts, expert choice, Soft MoE, SMEAR."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import ExpertChoiceConfig, MoEConfig, RouterConfig
from moe.dispatch import slot_order
from moe.nn.layers import MoELayer, SwiGLU
from moe.nn.smear import SMEARLayer
from moe.nn.soft_moe import SoftMoELayer


def expert_out(layer, e, x):
    w = layer.experts if hasattr(layer, "experts") else layer
    return (F.silu(x @ w.w_gate[e]) * (x @ w.w_up[e])) @ w.w_down[e]


def test_capacity_all_tokens_on_one_expert_drops_the_overflow():
    layer = MoELayer(8, 8, 4, RouterConfig(k=1), MoEConfig(capacity_factor=1.0, drop_policy="position")).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 50.0
    x = torch.randn(12, 8, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 1
    y, r = layer(x)
    C = math.ceil(1.0 * 12 * 1 / 4)  # 3 slots per expert
    assert r.dropped_fraction.item() == pytest.approx(1 - C / 12)
    # "position": the first C tokens are processed, the rest get 0 from the layer
    torch.testing.assert_close(y[:C], expert_out(layer, 2, x[:C]) * r.weights[:C])
    assert (y[C:] == 0).all()


def test_probability_policy_keeps_highest_weights():
    ids = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    order, counts = slot_order(ids, w, 2, capacity=2, policy="probability")
    assert order.tolist() == [1, 2, 3] and counts.tolist() == [2, 1]
    order, _ = slot_order(ids, w, 2, capacity=2, policy="position")
    assert order.tolist() == [0, 1, 3]
    order, counts = slot_order(ids, w, 2, capacity=None, policy="probability")
    assert order.tolist() == [0, 1, 2, 3] and counts.tolist() == [3, 1]


def test_dropless_layer_reports_no_drops_and_capacity_layer_processes_at_most_capacity():
    x = torch.randn(40, 8)
    y, r = MoELayer(8, 8, 5, RouterConfig(k=2))(x)
    assert r.dropped_fraction is None
    _, r = MoELayer(8, 8, 5, RouterConfig(k=2), MoEConfig(capacity_factor=0.5))(x)
    C = math.ceil(0.5 * 40 * 2 / 5)
    kept = (1 - r.dropped_fraction.item()) * 80
    assert kept == pytest.approx(r.counts.clamp(max=C).sum().item())


def test_shared_and_residual_branches():
    x = torch.randn(6, 8)
    base = MoELayer(8, 8, 4, RouterConfig(k=2))
    shared = MoELayer(8, 8, 4, RouterConfig(k=2), MoEConfig(n_shared=1))
    shared.load_state_dict(base.state_dict(), strict=False)
    torch.testing.assert_close(shared(x)[0] - base(x)[0], shared.shared(x))
    residual = MoELayer(8, 8, 4, RouterConfig(k=2), MoEConfig(residual=True))
    residual.load_state_dict(base.state_dict(), strict=False)
    coef = torch.softmax(residual.residual_coef(x), -1)
    torch.testing.assert_close(residual(x)[0], coef[:, :1] * residual.residual(x) + coef[:, 1:] * base(x)[0])
    assert isinstance(residual.residual, SwiGLU)


def test_expert_choice_layer_output_and_causality_guard():
    cfg = RouterConfig(kind="expert_choice", expert_choice=ExpertChoiceConfig(capacity_factor=1.0,
                                                                       allow_noncausal=True))
    layer = MoELayer(6, 8, 3, cfg).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    y, r = layer(x)
    expected = torch.zeros_like(x)
    for e in range(3):
        for t in r.expert_tokens[e].tolist():
            expected[t] += r.weights[t, e] * expert_out(layer, e, x[t : t + 1])[0]
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="later tokens"):
        MoELayer(6, 8, 3, RouterConfig(kind="expert_choice"), causal=True)


def test_soft_moe_dispatch_and_combine_sums_and_equivariance():
    layer = SoftMoELayer(8, 16, 3, slots_per_expert=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    D, C = layer.dispatch_combine(x)
    torch.testing.assert_close(D.sum(1), torch.ones(2, 6, dtype=torch.float64))  # each slot: convex mix of tokens
    torch.testing.assert_close(C.sum(2), torch.ones(2, 5, dtype=torch.float64))  # each token: convex mix of slots
    y, r = layer(x)
    perm = torch.randperm(5)
    y_perm, _ = layer(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm])  # permuting tokens permutes outputs
    torch.testing.assert_close(r.probs.sum(1), torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="future tokens"):
        SoftMoELayer(8, 16, 3, causal=True)


def test_soft_moe_one_expert_one_slot_gives_every_token_the_same_output():
    layer = SoftMoELayer(4, 8, 1, 1).double()
    y, _ = layer(torch.randn(1, 6, 4, dtype=torch.float64))
    torch.testing.assert_close(y[0], y[0, :1].expand(6, 4))


@pytest.mark.parametrize("route_on", ["token", "sequence"])
def test_smear_one_hot_router_gives_that_expert(route_on):
    layer = SMEARLayer(6, 8, 4, RouterConfig(), route_on=route_on, causal=False).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 1e4  # softmax is one-hot on expert 1 where x[..., 0] > 0
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 0.5
    y, r = layer(x)
    torch.testing.assert_close(y, expert_out(layer, 1, x))
    assert (r.counts == torch.tensor([0, 10, 0, 0])).all()


def test_smear_identical_experts_ignore_the_router_and_sequence_mode_is_refused_when_causal():
    layer = SMEARLayer(6, 8, 3, RouterConfig(init_std=1.0)).double()
    with torch.no_grad():
        for w in (layer.w_gate, layer.w_up, layer.w_down):
            w.copy_(w[:1].expand_as(w))
    x = torch.randn(7, 6, dtype=torch.float64)
    # the router's probabilities are fp32 (the layer is fp64): they sum to 1 within fp32 rounding, ~1e-7 relative
    torch.testing.assert_close(layer(x)[0], expert_out(layer, 0, x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="future tokens"):
        SMEARLayer(6, 8, 3, RouterConfig(), route_on="sequence", causal=True)


@pytest.mark.parametrize("threads", [1, 2])  # the expert kernel is picked by thread count (1: grouped_mm eagerly)
def test_dropless_layer_under_torch_compile_matches_eager(threads):
    """``torch.compile`` of the layer (router -> custom ops -> SwiGLU autograd function -> combine) gives eager's loss
    gradients for the input and every weight (aot_eager: the traced forward and backward graphs, no codegen)."""
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 5, RouterConfig(k=2), causal=False)
    x = torch.randn(40, 32, requires_grad=True)

    def loss(x):
        y, r = layer(x)
        return y.square().sum() + r.aux.aux_loss + r.aux.z_loss

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eager = torch.autograd.grad(loss(x), [x, *layer.parameters()])
        torch._dynamo.reset()
        traced = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(x), [x, *layer.parameters()])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
