"""Soft MoE (Puigcerver et al., ICLR 2024): every slot is a convex mix of the tokens of one sequence.

Per sequence ``X [m, d]``, slot parameters ``Phi [d, n*p]`` (n experts, p slots each), learnable ``scale``:

    logits = l2norm(X) @ (scale * l2norm(Phi))          # [m, n*p], l2norm(v) = v * rsqrt(sum v^2 + 1e-6)
    D = softmax over tokens (dim m)  ;  C = softmax over slots (dim n*p)
    slots = D^T X  -> expert i runs on its p slots  ->  Y = C @ expert_outputs

No top-k, no drops, no load-balancing loss. Every slot sees every token of the sequence, so the layer is not
causal and refuses to be built inside a causal decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.nn.routing import RouterAux, RoutingPlan, RoutingResult


def l2_normalize(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v * torch.rsqrt(v.square().sum(dim, keepdim=True) + 1e-6)


class SoftMoELayer(nn.Module):
    """``x [B, m, d] -> (y [B, m, d], RoutingResult)`` with batched SwiGLU experts ``[E, d, f]``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, slots_per_expert: int = 1, causal: bool = False):
        super().__init__()
        if causal:
            raise ValueError(
                "model.moe.kind=soft in a causal decoder: each Soft MoE slot is a softmax-weighted mix of all tokens "
                "of the sequence, so every output would see future tokens. Use it in an encoder (causal=False)."
            )
        if slots_per_expert < 1:
            raise ValueError(f"model.moe.slots_per_expert={slots_per_expert}: expected >= 1")
        self.num_experts, self.slots = num_experts, slots_per_expert
        self.phi = nn.Parameter(torch.randn(d_model, num_experts * slots_per_expert) / math.sqrt(d_model))
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.w_gate = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_up = nn.Parameter(torch.randn(num_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_down = nn.Parameter(torch.randn(num_experts, d_ff, d_model) / math.sqrt(d_ff))

    def dispatch_combine(self, x_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch ``D [B, m, n*p]`` (columns sum to 1 over tokens) and combine ``C`` (rows sum to 1 over slots)."""
        dt = torch.promote_types(x_BMD.dtype, torch.float32)  # fp32 router math (fp64 stays fp64)
        logits = l2_normalize(x_BMD.to(dt), -1) @ (self.scale * l2_normalize(self.phi.to(dt), 0))
        return torch.softmax(logits, dim=1), torch.softmax(logits, dim=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        if x.dim() != 3:
            raise ValueError(f"x: expected [B, m, d] (one group per sequence), got {tuple(x.shape)}")
        D, C = self.dispatch_combine(x)
        slots = torch.einsum("bms,bmd->bsd", D.to(x.dtype), x)
        slots_ESD = rearrange(slots, "b (e p) d -> e (b p) d", e=self.num_experts)
        h = F.silu(slots_ESD @ self.w_gate) * (slots_ESD @ self.w_up)
        out = rearrange(h @ self.w_down, "e (b p) d -> b (e p) d", b=x.shape[0])
        y = torch.einsum("bms,bsd->bmd", C.to(x.dtype), out)
        # Statistics: each token's combine mass per expert (a distribution over experts).
        probs = rearrange(C, "b m (e p) -> (b m) e p", e=self.num_experts).sum(-1)
        T, E = probs.shape
        zero = probs.sum() * 0.0
        ids = torch.arange(E, device=x.device).expand(T, E)
        plan = RoutingPlan(probs, ids, torch.full((E,), T, device=x.device))
        return y, RoutingResult(plan, RouterAux(zero, zero, probs))
