"""Non-finite router logits: NaN and empty rows are refused in training naming the layer; +inf follows the limit."""

import math

import pytest
import torch

from moe.config import ExpertChoiceConfig, ModelConfig, OptimConfig, RouterConfig
from moe.nn.gating import SCORE_FUNCTIONS, entmax15, sparsemax
from moe.nn.model import MoETransformer
from moe.nn.routing import route

INF = math.inf
UNNORMALISED = ("sigmoid", "softpick", "self_adjust_softmax")
NORMALISED = sorted(s for s in SCORE_FUNCTIONS if s not in UNNORMALISED)


@pytest.mark.parametrize("score", NORMALISED)
def test_single_plus_inf_is_one_hot_and_two_share_the_row(score):
    logits = torch.tensor([[0.1, INF, 0.3, 0.2], [INF, INF, 0.0, 1.0], [0.4, 0.1, 0.3, 0.2]])
    r = route(logits, 2, score=score)
    assert r.ids[0, 0] == 1 and r.weights[0].tolist() == [1.0, 0.0]  # the softmax limit
    assert sorted(r.ids[1].tolist()) == [0, 1] and r.weights[1].tolist() == [0.5, 0.5]
    assert torch.isfinite(r.weights).all() and torch.isfinite(r.probs).all() and torch.isfinite(r.aux_loss)
    torch.testing.assert_close(r.probs[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("score", ["softpick", "self_adjust_softmax"])
def test_unnormalised_scores_stay_finite_with_plus_inf(score):
    r = route(torch.tensor([[0.1, INF, 0.3, 0.2], [0.4, 0.1, 0.3, 0.2]]), 2, score=score)
    assert torch.isfinite(r.weights).all() and torch.isfinite(r.probs).all()


def test_sigmoid_takes_plus_inf_as_score_one():
    r = route(torch.tensor([[0.0, INF, -1.0]]), 2, score="sigmoid", renormalize=False)
    assert r.ids[0].tolist() == [1, 0] and r.weights[0].tolist() == [1.0, 0.5]


@pytest.mark.parametrize("row, what", [([0.1, math.nan, 0.2], "NaN logits"), ([-INF, -INF, -INF], "every logit -inf")])
def test_nan_and_empty_rows_are_refused_naming_the_layer(row, what):
    with pytest.raises(ValueError, match=f"blocks.0.moe.router: {what} in 1 of 2 tokens"):
        route(torch.tensor([row, [0.1, 0.2, 0.3]]), 2, check="blocks.0.moe.router")


def test_nan_bias_is_refused():
    with pytest.raises(ValueError, match=r"expert_bias: non-finite"):
        route(torch.randn(3, 4), 2, bias=torch.tensor([0.0, math.nan, 0.0, 0.0]))


def test_model_in_training_names_the_layer_with_nan_logits():
    cfg = ModelConfig(vocab_size=7, max_seq_len=4, d_model=8, n_layer=2, n_head=2, num_experts=4, d_ff=8)
    model = MoETransformer(cfg, RouterConfig(k=2))
    with torch.no_grad():
        model.blocks[1].moe.router.weight[2, 0] = math.nan
    with pytest.raises(ValueError, match=r"^blocks.1.moe.router: NaN logits"):
        model(torch.randint(0, 7, (2, 4)))
    model.eval()
    model(torch.randint(0, 7, (2, 4)))  # evaluation does not sync on every layer to check


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_sparse_scores_with_a_nan_row_return_nan_instead_of_failing(fn):
    p = fn(torch.tensor([[0.1, math.nan, 0.3], [0.3, 0.2, -INF]]))
    assert torch.isnan(p[0]).all() and torch.isfinite(p[1]).all() and p[1].sum().item() == pytest.approx(1)


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "gumbel", "expert_choice"])
def test_deferred_checks_count_on_the_device_and_raise_once_per_step_naming_every_layer(kind):
    from moe.nn.routing import raise_router_faults
    from moe.train.module import MoELitModule

    cfg = ModelConfig(vocab_size=7, max_seq_len=4, d_model=8, n_layer=3, n_head=2, num_experts=4, d_ff=8)
    router = RouterConfig(kind=kind, k=2, expert_choice=ExpertChoiceConfig(capacity_factor=1.0, allow_noncausal=True))
    lit = MoELitModule(cfg, router, OptimConfig(), max_steps=1)
    gate = lit.model.blocks[1].moe.router
    with torch.no_grad():  # NaN logits for every token of layer 1 (and so NaN inputs to layer 2)
        (gate.w_gate if kind == "noisy_topk" else gate.weight).view(-1)[0] = math.nan
    tokens = torch.randint(0, 7, (2, 5))
    _, routings = lit.model(tokens[:, :-1])  # no raise in the forward: nothing was read on the host
    faults = [r.aux.faults for r in routings]
    assert [f[0] for f in faults] == ["blocks.0.moe.router", "blocks.1.moe.router", "blocks.2.moe.router"]
    assert faults[0][1].tolist() == [0, 0, 0] and faults[1][1].tolist() == [8, 0, 0]
    with pytest.raises(ValueError, match=r"^blocks.1.moe.router: NaN logits in 8 tokens; blocks.2.moe.router: NaN "
                                         r"logits in \d+ tokens \(this training step\)"):  # fmt: skip
        raise_router_faults(faults)
    batch = {"tokens": tokens, "target_mask": torch.ones(2, 5, dtype=torch.bool), "task_id": torch.zeros(2).long()}
    with pytest.raises(ValueError, match=r"^blocks.1.moe.router: NaN logits in 8 tokens"):
        lit.training_step(batch, 0)


def test_deferred_bias_and_empty_rows_are_counted():
    from moe.nn.routing import input_faults, route_fused

    logits = torch.tensor([[0.0, 1.0, 2.0], [-INF, -INF, -INF], [math.nan, 0.0, 0.0]])
    assert input_faults(logits, torch.tensor([0.0, math.inf, math.nan])).tolist() == [1, 1, 2]
    r = route_fused(logits, 2, bias=torch.tensor([0.0, math.nan, 0.0]), check="layer", defer=True, impl="torch")
    assert r.aux.faults[0] == "layer" and r.aux.faults[1].tolist() == [1, 1, 1]
    r = route(logits, 2, check="layer", defer=True)
    assert r.aux.faults[1].tolist() == [1, 1, 0]
