"""Expert parallelism on 2 gloo processes: the sharded model computes what the unsharded one does.

Each rank holds half of the experts and its own batch. The unsharded reference is rebuilt in every process from
the same seed, so each rank can compute what it must match: its own logits, the gradient of its own loss for the
dense parameters, and for its experts the gradient of the sum of both ranks' losses.
"""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.nn.layers import MoELayer
from moe.nn.model import MoETransformer
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

D, F = 8, 12


def _layer_case(rank, world, E, k, tokens_per_rank, force_expert, cf, impl="auto"):
    from moe.parallel import expert_parallel, gather_state_dict

    torch.manual_seed(0)
    cfg, moe = RouterConfig(k=k, init_std=1.0), MoEConfig(capacity_factor=cf)
    ref = MoELayer(D, F, E, cfg, moe).double()  # the reference routes with the default impl (CPU: PyTorch)
    if force_expert is not None:  # every token to one expert: the other experts get nothing
        with torch.no_grad():
            ref.router.weight.zero_()
            ref.router.weight[force_expert, 0] = 100.0
    xs = [torch.randn(n, D, dtype=torch.float64) for n in tokens_per_rank]
    if force_expert is not None:
        for x in xs:
            x[:, 0] = x[:, 0].abs() + 1
    cs = [torch.randn(n, D, dtype=torch.float64) for n in tokens_per_rank]
    sharded = expert_parallel(MoELayer(D, F, E, replace(cfg, impl=impl), moe).double(), ep_size=world)
    full = ref.state_dict()
    L = E // world
    own = {k_: (v[rank * L : (rank + 1) * L] if ".w_" in k_ else v) for k_, v in full.items()}
    sharded.load_state_dict(own)
    assert sharded.experts.w_gate.shape[0] == L and sharded.num_experts == E

    x = xs[rank].clone().requires_grad_()
    y, r = sharded(x)
    (y * cs[rank]).sum().backward()
    x_ref = xs[rank].clone().requires_grad_()
    y_ref, r_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, torch.autograd.grad((y_ref * cs[rank]).sum(), x_ref)[0], atol=1e-6, rtol=0)
    assert torch.equal(r.load, sum(torch.bincount(ref(x_)[1].ids.reshape(-1), minlength=E) for x_ in xs))
    # dense (router) gradient: this rank's loss only
    ref.zero_grad()
    (ref(xs[rank])[0] * cs[rank]).sum().backward()
    torch.testing.assert_close(sharded.router.weight.grad, ref.router.weight.grad, atol=1e-6, rtol=0)
    # experts: the sum of both ranks' losses, this rank's rows
    ref.zero_grad()
    sum((ref(x_)[0] * c).sum() for x_, c in zip(xs, cs)).backward()
    for w in ("w_gate", "w_up", "w_down"):
        p = getattr(sharded.experts, w)
        got = p.grad if p.grad is not None else torch.zeros_like(p)  # experts that received no rows
        torch.testing.assert_close(got, getattr(ref.experts, w).grad[rank * L : (rank + 1) * L], atol=1e-6, rtol=0)
    gathered = gather_state_dict(sharded)
    assert all(torch.equal(gathered[k_], full[k_]) for k_ in full)


@pytest.mark.parametrize(
    "E, k, tokens_per_rank, force_expert, cf",
    [
        (4, 2, (13, 5), None, 0.0),  # uneven token counts, uneven loads
        (6, 1, (9, 9), None, 0.0),  # k=1
        (4, 4, (7, 3), None, 0.0),  # k=E: every expert gets every token
        (4, 1, (10, 6), 3, 0.0),  # all tokens on expert 3: rank 0's experts receive nothing
        (4, 2, (0, 11), None, 0.0),  # rank 0 routes zero tokens
        (8, 2, (12, 7), None, 1.0),  # capacity-limited layer: drops decided per rank, then the same exchange
    ],
)
def test_sharded_layer_matches_unsharded(E, k, tokens_per_rank, force_expert, cf):
    run_distributed(_layer_case, 2, E, k, tokens_per_rank, force_expert, cf)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
def test_sharded_layer_on_the_triton_router_matches_unsharded():
    # the Triton kernel's counts go straight into the count exchange; the reference layer routes in PyTorch
    run_distributed(_layer_case, 2, 4, 2, (13, 5), None, 0.0, "triton")


def _model_case(rank, world):
    from moe.parallel import expert_parallel

    cfg = ModelConfig(vocab_size=11, max_seq_len=6, d_model=16, n_layer=2, n_head=2, num_experts=4, d_ff=8)
    torch.manual_seed(0)
    ref = MoETransformer(cfg, RouterConfig(k=2))
    torch.manual_seed(0)
    model = expert_parallel(MoETransformer(cfg, RouterConfig(k=2)), ep_size=world)
    batches = [torch.randint(0, 11, (b, 6), generator=torch.Generator().manual_seed(s)) for b, s in ((3, 1), (2, 2))]
    logits, _ = model(batches[rank])
    torch.testing.assert_close(logits, ref(batches[rank])[0], atol=1e-6, rtol=0)
    logits.square().mean().backward()
    ref_logits = [ref(b)[0] for b in batches]
    sum(lg.square().mean() for lg in ref_logits).backward()
    L = 2
    for (n, p), (n_ref, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert n == n_ref
        if ".experts." in n:
            assert p.shape[0] == L
            torch.testing.assert_close(p.grad, p_ref.grad[rank * L : (rank + 1) * L], atol=1e-6, rtol=0)


def test_sharded_transformer_logits_and_expert_grads():
    run_distributed(_model_case, 2)


def _bias_case(rank, world):
    from moe.nn.gating import update_expert_bias
    from moe.parallel import expert_parallel

    torch.manual_seed(0)
    cfg = RouterConfig(k=2, bias_update_rate=0.1, score="sigmoid", init_std=1.0)
    layer = expert_parallel(MoELayer(D, F, 4, cfg), ep_size=1)  # plain data parallelism: counts still global
    xs = [torch.randn(n, D, generator=torch.Generator().manual_seed(s)) for n, s in ((9, 1), (5, 2))]
    layer.eval()  # no bias bookkeeping while the expected loads are counted
    total = sum(torch.bincount(layer.router(x).ids.reshape(-1), minlength=4) for x in xs)
    layer.train()
    _, r = layer(xs[rank])
    assert torch.equal(r.load, total) and not torch.equal(r.counts, total)
    assert torch.equal(layer.router.pending_counts, total.float())
    layer.router.update_bias()  # the sign rule on the global load: the same bias on every rank
    torch.testing.assert_close(layer.router.expert_bias, update_expert_bias(torch.zeros(4), total.float(), 0.1))


def test_aux_free_bias_and_load_use_counts_summed_over_ranks():
    run_distributed(_bias_case, 2)
