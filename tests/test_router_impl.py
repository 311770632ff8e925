"""``router.impl``: TopKRouter on the fused kernel (``moe.nn.routing.route_fused``) vs ``moe.nn.routing.route``.

1. The fused path gives route's plan, losses, auxiliaries and router gradients, over scores, orders, k, E, aux
   modes, the selection bias, scaling and data-parallel counts; ``probs [T, E]`` is built only when read.
2. Which router takes which path; unknown or impossible ``router.impl`` values are refused naming the key.
3. Dispatch takes the router's counts as they are (no recount).
4. Training the tiny model: ``impl=triton`` (Triton's interpreter, TRITON_INTERPRET=1 from conftest.py) and
   ``impl=torch`` (the PyTorch reference) give the same losses, step by step.
5. The stats callback materialises ``probs`` on logging steps only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import replace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from moe.callbacks import RoutingStatsCallback
from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.dispatch import CapacityDispatcher, DroplessDispatcher
from moe.nn.layers import MoELayer
from moe.nn.losses import router_loss
from moe.nn.model import MoETransformer
from moe.nn.routers import TopKRouter, build_router
from moe.nn.routing import route, route_fused

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

D = 12


def _route_kwargs(cfg: RouterConfig, router: TopKRouter, seq_len: int | None) -> dict:
    """What TopKRouter passes to route(), to compute the reference by hand."""
    return dict(score=cfg.score, renormalize=cfg.renormalize, order=cfg.order, scaling=cfg.scaling,
                bias=router.expert_bias if cfg.bias_update_rate > 0 else None, aux_loss_mode=cfg.aux_loss_mode,
                seq_len=seq_len, reduce_counts=router.reduce_counts)  # fmt: skip


# 1. ---------------------------------------------------------------------------------------------------------------

CASES = [
    pytest.param(dict(), 8, id="softmax-renorm"),
    pytest.param(dict(renormalize=False), 8, id="softmax-raw"),  # Switch-style weights, sum <= 1
    pytest.param(dict(score="sigmoid"), 8, id="sigmoid-renorm"),
    pytest.param(dict(score="sigmoid", renormalize=False), 13, id="sigmoid-raw-primeE"),
    pytest.param(dict(order="topk_then_score", renormalize=False), 8, id="topk-then-softmax"),  # = renormalised
    pytest.param(dict(order="topk_then_score", score="sigmoid"), 8, id="topk-then-sigmoid"),
    pytest.param(dict(k=1, renormalize=False), 5, id="k=1"),
    pytest.param(dict(k=5), 5, id="k=E"),
    pytest.param(dict(aux_loss_mode="hf", scaling=2.5), 8, id="hf-scaling"),
    pytest.param(dict(aux_loss_mode="sequence"), 8, id="sequence-aux"),  # reads probs per sequence
    pytest.param(dict(score="sigmoid", bias_update_rate=0.01, aux_loss_mode="sequence"), 8, id="deepseek-bias"),
    pytest.param(dict(importance_loss_coef=0.3), 8, id="importance"),  # CV^2 from prob_sums
]


@pytest.mark.parametrize("overrides, E", CASES)
@pytest.mark.parametrize("reduce", [False, True])
def test_fused_router_equals_route(overrides, E, reduce):
    cfg = RouterConfig(**{"k": 2, "init_std": 0.5, "impl": "torch", **overrides})
    router = TopKRouter(D, E, cfg)
    assert router.fused
    if cfg.bias_update_rate > 0:
        router.expert_bias.copy_(torch.linspace(-0.2, 0.25, E))  # a bias that changes the choice
    if reduce:  # three identical data-parallel ranks: the global load is 3x the local one
        router.reduce_counts = lambda counts: counts * 3
    x = torch.randn(3 * 7, D)
    r = router(x, seq_len=7)
    assert "probs" not in r.aux.__dict__  # nothing has asked for [T, E] yet (except the sequence aux loss inside)
    logits = router.logits(x).detach().requires_grad_()
    ref = route(logits, cfg.k, check="router", **_route_kwargs(cfg, router, 7))
    assert torch.equal(r.ids, ref.ids) and torch.equal(r.counts, ref.counts)
    assert r.ids.dtype == ref.ids.dtype == torch.int64 and r.counts.dtype == torch.int64
    torch.testing.assert_close(r.weights, ref.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.z_loss, ref.z_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.prob_sums, ref.probs.sum(0), atol=1e-5, rtol=1e-5)
    assert (r.global_counts is None) == (not reduce)
    if reduce:
        assert torch.equal(r.load, 3 * r.counts) and torch.equal(r.load, ref.load)
    # the router's gradient through weights, aux, z and the extra losses, as route's
    g = torch.randn(r.weights.shape)
    extra = sum(r.extra_losses.values()) if r.extra_losses else 0.0
    ((r.weights * g).sum() + 0.7 * r.aux_loss + 0.3 * r.z_loss + extra).backward()
    grad_fused = router.weight.grad.clone()
    if cfg.importance_loss_coef > 0:
        assert r.extra_losses["importance"] > 0
        extra_ref = cfg.importance_loss_coef * ((s := ref.probs.sum(0)).var(unbiased=False) / s.mean().square())
    else:
        extra_ref = 0.0
    router.zero_grad()
    ((ref.weights * g).sum() + 0.7 * ref.aux_loss + 0.3 * ref.z_loss + extra_ref).backward()
    torch.autograd.backward(router.logits(x), logits.grad)
    torch.testing.assert_close(grad_fused, router.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(r.probs, ref.probs, atol=1e-6, rtol=1e-5)  # built now, on first read
    assert "probs" in r.aux.__dict__


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fused_route_non_finite_logits_as_route(impl):
    # +inf: the softmax limit (one-hot; two +inf share the row); NaN and all -inf rows refused when checking
    inf = float("inf")
    logits = torch.tensor([[0.0, inf, 1.0, 2.0], [inf, 0.0, inf, 1.0], [-inf, 0.5, -inf, 0.0]])
    r = route_fused(logits, 2, impl=impl, check="blocks.3.moe.router")
    ref = route(logits, 2, check="blocks.3.moe.router")
    assert r.ids.tolist() == ref.ids.tolist() == [[1, 0], [0, 2], [1, 3]]
    torch.testing.assert_close(r.weights, ref.weights)
    assert r.weights[:2].tolist() == [[1.0, 0.0], [0.5, 0.5]]
    torch.testing.assert_close(r.aux_loss, ref.aux_loss) and torch.testing.assert_close(r.probs, ref.probs)
    for bad, what in ((torch.tensor([[float("nan"), 0.0]]), "NaN logits"), (torch.full((1, 2), -inf), "-inf")):
        with pytest.raises(ValueError, match=f"blocks.3.moe.router: .*{what}"):
            route_fused(bad, 1, impl=impl, check="blocks.3.moe.router")


# 2. ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fused",
    [
        (dict(), True),
        (dict(score="sigmoid", bias_update_rate=0.001), True),
        (dict(score="sparsemax"), False),
        (dict(score="softmax", score_kwargs={"temperature": 0.5}), False),
        (dict(n_group=2, topk_group=1), False),
        (dict(bias_update_rate=0.001, order="topk_then_score"), False),
        (dict(kind="gumbel"), False),
        (dict(kind="expert_choice"), False),
    ],
)
def test_which_routers_take_the_fused_path(overrides, fused):
    router = build_router(D, 4, RouterConfig(**overrides))
    assert getattr(router, "fused", False) is fused


def test_impl_values_are_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"router.impl='cuda': expected one of \('auto', 'triton', 'torch'\)"):
        build_router(D, 4, RouterConfig(impl="cuda"))
    with pytest.raises(ValueError, match="router.impl=triton: the fused router does not cover score='sparsemax'"):
        build_router(D, 4, RouterConfig(impl="triton", score="sparsemax"))
    with pytest.raises(ValueError, match="router.impl=triton: .*router.kind=gumbel"):
        build_router(D, 4, RouterConfig(impl="triton", kind="gumbel"))
    assert not build_router(D, 4, RouterConfig(impl="torch", score="sparsemax")).fused  # torch: route() then


# 3. ---------------------------------------------------------------------------------------------------------------


def test_dispatchers_take_the_routers_counts_as_they_are():
    layer = MoELayer(D, 8, 4, RouterConfig(k=2, impl="torch"))
    x = torch.randn(10, D)
    plan = layer.router(x).plan
    _, counts_E, _ = DroplessDispatcher().dispatch(x, plan)
    assert counts_E is plan.counts_E  # the object itself: what the expert-parallel count exchange sends
    # capacity: clamps the router's counts; with a counts_E that is not the histogram the result shows it was used
    fake = plan.counts_E + 100
    _, kept_E, _ = CapacityDispatcher(4, 1.0, "position").dispatch(x, replace(plan, counts_E=fake))
    assert (kept_E == 5).all()  # capacity ceil(1.0 * 10 * 2 / 4) = 5, reached by every (fake) count


# 4. ---------------------------------------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=20, max_seq_len=12, d_model=32, n_layer=1, n_head=2, num_experts=4, d_ff=32,
                   moe=MoEConfig())  # conf/model/tiny.yaml  # fmt: skip


def _train(router_cfg: RouterConfig, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    model = MoETransformer(TINY, router_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(1))  # one batch, overfitted
    losses = []
    for _ in range(steps):
        logits, routings = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))
        loss = loss + router_loss(routings, router_cfg.aux_loss_coef, router_cfg.z_loss_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.update_bias()
        losses.append(loss.item())
    return losses


@needs_triton
@pytest.mark.parametrize(
    "router_cfg",
    [
        pytest.param(RouterConfig(k=2, aux_loss_coef=0.1), id="softmax_topk"),  # conf/router/softmax_topk.yaml
        pytest.param(
            RouterConfig(k=2, score="sigmoid", bias_update_rate=0.01, aux_loss_coef=0.1, aux_loss_mode="sequence"),
            id="sigmoid_bias",
        ),  # fmt: skip
    ],
)
def test_training_losses_agree_triton_vs_torch(router_cfg):
    sys.modules.pop("moe.kernels.triton_router", None)  # imported again only if impl=triton runs the kernel
    torch_losses = _train(replace(router_cfg, impl="torch"))
    assert "moe.kernels.triton_router" not in sys.modules
    triton_losses = _train(replace(router_cfg, impl="triton"))
    assert "moe.kernels.triton_router" in sys.modules
    assert triton_losses[-1] < triton_losses[0]  # it trains
    # fp32 router math in both; the kernels differ only in summation order (atomics): 8 Adam steps stay within
    # 1e-5 relative (a wrong weight, gradient or count moves them by 1e-3 or more)
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(torch_losses), atol=0, rtol=1e-5)


# 5. ---------------------------------------------------------------------------------------------------------------


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader([{"x": torch.randn(4, 8, D, generator=g)} for _ in range(16)],
                                           batch_size=None)  # fmt: skip

    def val_dataloader(self):
        return torch.utils.data.DataLoader([{"x": torch.randn(4, 8, D)}], batch_size=None)


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.moe = MoELayer(D, 16, 4, RouterConfig(k=2, impl="torch"))

    def training_step(self, batch, _):
        y, r = self.moe(batch["x"])
        return y.square().mean() + 0.01 * r.aux_loss

    def validation_step(self, batch, _):
        self.moe(batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Spy(L.Callback):
    """Records, after the stats callback's hook, whether a training forward materialised probs."""

    def setup(self, trainer, pl_module, stage):
        self.seen = []
        pl_module.moe.register_forward_hook(
            lambda m, i, out: self.seen.append((trainer.global_step + 1, "probs" in out[1].aux.__dict__))
            if pl_module.training else None
        )  # fmt: skip


def test_stats_callback_reads_probs_on_logging_steps_only(tmp_path):
    spy = _Spy()
    trainer = L.Trainer(max_steps=7, logger=False, callbacks=[RoutingStatsCallback(every_n_steps=3), spy],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(_Module(), datamodule=_Data())
    assert spy.seen == [(s, s % 3 == 0 or s == 7) for s in range(1, 8)]
    assert "routing/train/layer0/entropy" in trainer.callback_metrics
