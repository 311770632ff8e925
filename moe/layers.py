"""MoE feed-forward: a router, batched SwiGLU experts ``[E, d, f]``, and dropless sort-by-expert dispatch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.config import RouterConfig
from moe.routing import RoutingResult, route


class Router(nn.Module):
    """Linear gate ``x [T, d] -> logits [T, E]`` evaluated in fp32, then ``route`` (softmax top-k)."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        if cfg.kind != "softmax_topk":
            raise ValueError(f"router.kind={cfg.kind!r}: expected 'softmax_topk'")
        if not 1 <= cfg.k <= num_experts:
            raise ValueError(f"router.k={cfg.k}: expected 1 <= k <= model.num_experts ({num_experts})")
        self.cfg = cfg
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * cfg.init_std)

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        return route(logits_TE, self.cfg.k, renormalize=self.cfg.renormalize, aux_loss_mode=self.cfg.aux_loss_mode)


class SwiGLUExperts(nn.Module):
    """E independent SwiGLU MLPs, ``down(silu(x @ gate) * (x @ up))``, weights stored batched.

    w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_down = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / math.sqrt(d_ff))

    def forward(self, x_SD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """x_SD: ``[S, d]`` rows sorted by expert, ``counts_E[e]`` rows for expert e. Returns ``[S, d]``."""
        outs = []
        for e, x_e in enumerate(torch.split(x_SD, counts_E)):
            if x_e.shape[0] == 0:
                continue
            h = F.silu(x_e @ self.w_gate[e]) * (x_e @ self.w_up[e])
            outs.append(h @ self.w_down[e])
        return torch.cat(outs) if outs else x_SD.new_zeros(x_SD.shape)


class MoELayer(nn.Module):
    """Dropless token-choice MoE: every token reaches all k of its experts (no capacity, no drops).

    Dispatch: flatten the ``T*k`` (token, choice) slots, stable-sort them by expert id, gather the token rows in
    that order, run each expert on its contiguous block, un-sort with the inverse permutation, and combine the k
    outputs of each token with its routing weights. Deterministic: gathers only, no scatter-add.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, router: RouterConfig):
        super().__init__()
        self.router = Router(d_model, num_experts, router)
        self.experts = SwiGLUExperts(num_experts, d_model, d_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        """x: ``[..., d]`` -> (``[..., d]``, RoutingResult over the ``T = prod(...)`` flattened tokens)."""
        x_TD = x.reshape(-1, x.shape[-1])
        r = self.router(x_TD)
        T, k = r.ids.shape
        order_S = torch.argsort(r.ids.reshape(-1), stable=True)  # S = T*k slots, grouped by expert
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_SD = self.experts(x_TD[order_S // k], r.counts.tolist())
        y_TKD = rearrange(y_SD[inverse_S], "(t k) d -> t k d", k=k)
        y_TD = torch.einsum("tkd,tk->td", y_TKD, r.weights.to(y_TKD.dtype))
        return y_TD.reshape(x.shape), r
