"""SMEAR (Muqeeth et al. 2023): merge the experts' parameters by the routing probabilities, apply the merged one.

    p = softmax(router(r))                      # r = the token ("token") or its sequence mean ("sequence")
    theta_bar = sum_e p_e theta_e ;  y = SwiGLU(x; theta_bar)

With per-token routing the merged linear maps are applied as ``x @ sum_e p_e W_e = sum_e p_e (x @ W_e)``, which
is exact and causal. Per-sequence routing averages over the whole sequence, so it is refused in a causal decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import RouterConfig
from moe.nn.losses import load_balancing_loss, router_z_loss
from moe.nn.routing import RouterAux, RoutingPlan, RoutingResult

ROUTE_ON = ("token", "sequence")


class SMEARLayer(nn.Module):
    """``x [..., m, d] -> (y, RoutingResult)``; the router is a linear gate with a softmax in fp32."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, router: RouterConfig, route_on: str = "token",
                 causal: bool = True):  # fmt: skip
        super().__init__()
        if route_on not in ROUTE_ON:
            raise ValueError(f"model.moe.smear_route_on={route_on!r}: expected one of {ROUTE_ON}")
        if route_on == "sequence" and causal:
            raise ValueError("model.moe.smear_route_on=sequence in a causal decoder: the sequence mean includes "
                             "future tokens. Use smear_route_on=token.")  # fmt: skip
        self.route_on, self.num_experts, self.router_cfg = route_on, num_experts, router
        self.router = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=router.init_std)
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_down = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / math.sqrt(d_ff))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        if self.route_on == "sequence":
            r_BD = x.mean(dim=-2)
            logits = F.linear(r_BD.float(), self.router.weight.float())
            p_BE = torch.softmax(logits, dim=-1).to(x.dtype)
            merged = [torch.einsum("...e,eij->...ij", p_BE, w) for w in (self.w_gate, self.w_up, self.w_down)]
            h = F.silu(x @ merged[0]) * (x @ merged[1])
            y = h @ merged[2]
            probs = torch.softmax(logits, dim=-1).unsqueeze(-2).expand(*x.shape[:-1], self.num_experts)
            logits = logits.unsqueeze(-2).expand_as(probs)
        else:
            logits = F.linear(x.float(), self.router.weight.float())
            probs = torch.softmax(logits, dim=-1)
            p = probs.to(x.dtype)
            gate = torch.einsum("...e,...ef->...f", p, torch.einsum("...d,edf->...ef", x, self.w_gate))
            up = torch.einsum("...e,...ef->...f", p, torch.einsum("...d,edf->...ef", x, self.w_up))
            h = F.silu(gate) * up
            y = torch.einsum("...e,...ed->...d", p, torch.einsum("...f,efd->...ed", h, self.w_down))
        probs_TE = probs.reshape(-1, self.num_experts)
        T, E = probs_TE.shape
        ids = probs_TE.argmax(-1, keepdim=True)
        plan = RoutingPlan(probs_TE, torch.arange(E, device=x.device).expand(T, E),
                           torch.bincount(ids.reshape(-1), minlength=E))  # fmt: skip
        aux = RouterAux(load_balancing_loss(probs_TE, ids, E), router_z_loss(logits.reshape(-1, E)), probs_TE)
        return y, RoutingResult(plan, aux)
