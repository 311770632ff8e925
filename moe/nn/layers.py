"""MoE feed-forward layers over batched SwiGLU experts ``[E, d, f]``.

- ``MoELayer``: routed experts (token choice or expert choice), dropless by default or capacity-limited, plus
  optional shared experts and a PR-MoE residual branch.
- ``SoftMoELayer`` (moe/nn/soft_moe.py) and ``SMEARLayer`` (moe/nn/smear.py): fully differentiable mixtures.

Every layer maps ``x [..., d] -> (y [..., d], RoutingResult)``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig, RouterConfig
from moe.dispatch import Dispatcher, build_dispatcher
from moe.nn.experts import IMPLS as EXPERT_IMPLS
from moe.nn.experts import swiglu_experts
from moe.nn.routers import build_router
from moe.nn.routing import RoutingResult

DROP_POLICIES = ("probability", "position")


class SwiGLUExperts(nn.Module):
    """E independent SwiGLU MLPs, ``down(silu(x @ gate) * (x @ up))``, weights stored batched.

    w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: str = "auto"):
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"experts impl={impl!r}: expected one of {EXPERT_IMPLS}")
        self.num_experts, self.impl = num_experts, impl
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_down = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / math.sqrt(d_ff))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD: ``[S, d]`` rows sorted by expert, ``counts_E[e]`` rows for expert e. Returns ``[S, d]``.

        ``moe.nn.experts.swiglu_experts``: grouped_mm, padded bmm or a per-expert loop; "auto" picks by the measured
        rule of ``moe.nn.experts.pick_impl`` (rows per expert, dtype, device).
        """
        return swiglu_experts(x_SD, counts_E, self.w_gate, self.w_up, self.w_down, self.impl)


class SwiGLU(nn.Module):
    """One dense SwiGLU MLP ``[..., d] -> [..., d]`` (shared experts, PR-MoE residual branch)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoELayer(nn.Module):
    """Routed SwiGLU experts; dropless sort-by-expert dispatch, or capacity-limited with a drop policy.

    ``router -> dispatcher -> experts``: the dispatcher (``moe.dispatch``) groups the kept ``(token, choice)``
    rows by expert, the experts run on their contiguous blocks (grouped GEMM), and the dispatcher combines each
    token's k outputs with its routing weights (dropped slots give 0, so those tokens pass only through the
    residual stream). Token-choice combines are gathers, not scatter-adds, so they are deterministic.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, router: RouterConfig, moe: MoEConfig | None = None,
                 causal: bool = True):  # fmt: skip
        super().__init__()
        moe = moe or MoEConfig()
        if moe.drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.drop_policy={moe.drop_policy!r}: expected one of {DROP_POLICIES}")
        if moe.capacity_factor < 0:
            raise ValueError(f"model.moe.capacity_factor={moe.capacity_factor}: expected >= 0 (0 = dropless)")
        if router.kind == "expert_choice" and causal and not router.expert_choice.allow_noncausal:
            raise ValueError(
                "router.kind=expert_choice in a causal decoder: each expert picks its tokens from the whole batch, "
                "so a token's routing depends on later tokens (a leak at training time, impossible when decoding). "
                "Set router.expert_choice.allow_noncausal=true to train it anyway."
            )
        self.moe_cfg, self.num_experts = moe, num_experts
        self.router = build_router(d_model, num_experts, router)
        self.experts = SwiGLUExperts(num_experts, d_model, d_ff)
        self.shared = SwiGLU(d_model, moe.shared_d_ff or d_ff * moe.n_shared) if moe.n_shared > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if moe.n_shared > 0 and moe.shared_gate else None
        self.residual = SwiGLU(d_model, d_ff) if moe.residual else None
        self.residual_coef = nn.Linear(d_model, 2) if moe.residual else None
        # router -> dispatcher -> experts; moe.parallel.expert_parallel swaps in the all-to-all dispatcher
        self.dispatcher: Dispatcher = build_dispatcher(router.kind, moe, num_experts)
        self.ep_groups = None  # moe.parallel.expert_parallel: this layer's expert-parallel groups once sharded

    def _routed(self, x_TD: torch.Tensor, r: RoutingResult) -> tuple[torch.Tensor, RoutingResult]:
        x_SD, counts_E, plan = self.dispatcher.dispatch(x_TD, r.plan)
        with torch.profiler.record_function("moe/experts"):
            y_SD = self.experts(x_SD, counts_E)
        y_TD = self.dispatcher.combine(y_SD, plan)
        return y_TD, r if plan.dropped_fraction is None else replace(r, dropped_fraction=plan.dropped_fraction)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        """x: ``[..., S, d]`` -> (``[..., S, d]``, RoutingResult over the ``T = prod(...)`` flattened tokens)."""
        x_TD = x.reshape(-1, x.shape[-1])
        with torch.profiler.record_function("moe/router"):
            r = self.router(x_TD, seq_len=x.shape[-2] if x.dim() >= 2 else None)
        y_TD, r = self._routed(x_TD, r)
        if self.shared is not None:
            shared = self.shared(x_TD)
            y_TD = y_TD + (shared * torch.sigmoid(self.shared_gate(x_TD)) if self.shared_gate is not None else shared)
        if self.residual is not None:
            coef = torch.softmax(self.residual_coef(x_TD), dim=-1)
            y_TD = coef[:, :1] * self.residual(x_TD) + coef[:, 1:] * y_TD
        return y_TD.reshape(x.shape), r


def build_moe_layer(d_model: int, d_ff: int, num_experts: int, router: RouterConfig, moe: MoEConfig,
                    causal: bool = True) -> nn.Module:  # fmt: skip
    """The layer named by ``moe.kind``: "sparse" | "soft" | "smear"."""
    if moe.kind == "sparse":
        return MoELayer(d_model, d_ff, num_experts, router, moe, causal)
    if moe.kind == "soft":
        from moe.nn.soft_moe import SoftMoELayer

        return SoftMoELayer(d_model, d_ff, num_experts, moe.slots_per_expert, causal)
    if moe.kind == "smear":
        from moe.nn.smear import SMEARLayer

        return SMEARLayer(d_model, d_ff, num_experts, router, moe.smear_route_on, causal)
    raise ValueError(f"model.moe.kind={moe.kind!r}: expected 'sparse', 'soft' or 'smear'")
