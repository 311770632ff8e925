"""MoE feed-forward layers over batched SwiGLU experts ``[E, d, f]``.

- ``MoELayer``: routed experts (token choice or expert choice), dropless by default or capacity-limited, plus
  optional shared experts and a PR-MoE residual branch.
- ``SoftMoELayer`` (moe/soft_moe.py) and ``SMEARLayer`` (moe/smear.py): fully differentiable mixtures.

Every layer maps ``x [..., d] -> (y [..., d], RoutingResult)``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe import kernels
from moe.config import MoEConfig, RouterConfig
from moe.routers import build_router
from moe.routing import RoutingResult

DROP_POLICIES = ("probability", "position")
GROUPED_MM = getattr(F, "grouped_mm", None)


def _grouped_mm_ok(x: torch.Tensor, num_experts: int) -> bool:
    """Whether ``grouped_mm`` should run the experts: bf16 on CUDA; fp32/bf16 on the CPU from 16 experts up.

    Measured on the 2-core CPU VM, forward+backward of one layer: T=2176 d=128 f=256 E=8 k=2 (the default model)
    53 ms with grouped_mm vs 40 ms with the per-expert loop; T=2048 d=256 f=128 E=32 k=4, 2.1-2.9x faster with
    grouped_mm (benchmarks/bench_moe_layer.py). Few large experts favour the loop, many small ones the grouped GEMM.
    """
    if GROUPED_MM is None:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16) and num_experts >= 16
    return x.dtype == torch.bfloat16


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

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD: ``[S, d]`` rows sorted by expert, ``counts_E[e]`` rows for expert e. Returns ``[S, d]``.

        Uses ``grouped_mm`` (one GEMM per weight over all experts, offsets from the counts, no host sync) where
        torch supports the dtype and device; otherwise a loop of per-expert matmuls.
        """
        if _grouped_mm_ok(x_SD, self.num_experts):
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h = F.silu(GROUPED_MM(x_SD, self.w_gate, offs=offs)) * GROUPED_MM(x_SD, self.w_up, offs=offs)
            return GROUPED_MM(h, self.w_down, offs=offs)
        outs = []
        for e, x_e in enumerate(torch.split(x_SD, counts_E.tolist())):
            if x_e.shape[0] == 0:
                continue
            h = F.silu(x_e @ self.w_gate[e]) * (x_e @ self.w_up[e])
            outs.append(h @ self.w_down[e])
        return torch.cat(outs) if outs else x_SD.new_zeros(x_SD.shape)


class SwiGLU(nn.Module):
    """One dense SwiGLU MLP ``[..., d] -> [..., d]`` (shared experts, PR-MoE residual branch)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def slot_order(
    ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int | None, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept slots (``t*k + j`` indices) grouped by expert, and the kept count per expert ``[E]``.

    Dropless (``capacity=None``): every slot, stable within an expert. Otherwise each expert keeps at most
    ``capacity`` slots: those with the highest weight ("probability") or the earliest tokens ("position").
    """
    flat_ids = ids_TK.reshape(-1)
    if capacity is None or policy == "position":
        order = torch.argsort(flat_ids, stable=True)
    else:
        by_weight = torch.argsort(-weights_TK.detach().reshape(-1), stable=True)
        order = by_weight[torch.argsort(flat_ids[by_weight], stable=True)]
    counts = torch.bincount(flat_ids, minlength=num_experts)
    if capacity is None:
        return order, counts
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_ids[order]]
    keep = rank < capacity
    return order[keep], counts.clamp(max=capacity)


class MoELayer(nn.Module):
    """Routed SwiGLU experts; dropless sort-by-expert dispatch, or capacity-limited with a drop policy.

    Dispatch: take the kept ``(token, choice)`` slots grouped by expert (``moe.kernels.permute`` when dropless),
    gather their token rows, run the experts on their contiguous blocks (grouped GEMM), put the outputs back at
    their slot (dropped slots stay 0, so those tokens pass only through the residual stream) and combine each
    token's k outputs with its routing weights (``moe.kernels.unpermute``). Gathers only: no scatter-add, so
    token-choice routing is deterministic.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, router: RouterConfig, moe: MoEConfig | None = None,
                 causal: bool = True):  # fmt: skip
        super().__init__()
        moe = moe or MoEConfig()
        if moe.drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.drop_policy={moe.drop_policy!r}: expected one of {DROP_POLICIES}")
        if moe.capacity_factor < 0:
            raise ValueError(f"model.moe.capacity_factor={moe.capacity_factor}: expected >= 0 (0 = dropless)")
        if router.kind == "expert_choice" and causal and not router.allow_noncausal:
            raise ValueError(
                "router.kind=expert_choice in a causal decoder: each expert picks its tokens from the whole batch, "
                "so a token's routing depends on later tokens (a leak at training time, impossible when decoding). "
                "Set router.allow_noncausal=true to train it anyway."
            )
        self.moe_cfg, self.num_experts = moe, num_experts
        self.router = build_router(d_model, num_experts, router)
        self.experts = SwiGLUExperts(num_experts, d_model, d_ff)
        self.shared = SwiGLU(d_model, moe.shared_d_ff or d_ff * moe.n_shared) if moe.n_shared > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if moe.n_shared > 0 and moe.shared_gate else None
        self.residual = SwiGLU(d_model, d_ff) if moe.residual else None
        self.residual_coef = nn.Linear(d_model, 2) if moe.residual else None

    def _routed(self, x_TD: torch.Tensor, r: RoutingResult) -> tuple[torch.Tensor, RoutingResult]:
        if r.expert_tokens is not None:  # expert choice: expert e takes tokens expert_tokens[e]
            E, C = r.expert_tokens.shape
            y_SD = self.experts(x_TD[r.expert_tokens.reshape(-1)], torch.full((E,), C, device=x_TD.device))
            gates = r.weights[r.expert_tokens, torch.arange(E, device=x_TD.device)[:, None]].reshape(-1, 1)
            return torch.zeros_like(x_TD).index_add(0, r.expert_tokens.reshape(-1), y_SD * gates.to(y_SD)), r
        T, k = r.ids.shape
        cf = self.moe_cfg.capacity_factor
        if cf == 0:  # dropless: moe.kernels permute / unpermute (Triton on CUDA, the PyTorch reference elsewhere)
            x_SD, rows_TK = kernels.permute(x_TD, r.ids, r.counts)
            y_SD = self.experts(x_SD, r.counts)
            return kernels.unpermute(y_SD, r.weights.to(y_SD.dtype), rows_TK), r
        capacity = math.ceil(cf * T * k / self.num_experts)
        order_S, counts_E = slot_order(r.ids, r.weights, self.num_experts, capacity, self.moe_cfg.drop_policy)
        y_SD = self.experts(x_TD[order_S // k], counts_E)
        y_slots = x_TD.new_zeros(T * k, x_TD.shape[-1]).index_put((order_S,), y_SD)  # unique indices: deterministic
        y_TKD = rearrange(y_slots, "(t k) d -> t k d", k=k)
        y_TD = torch.einsum("tkd,tk->td", y_TKD, r.weights.to(y_TKD.dtype))
        return y_TD, replace(r, dropped_fraction=1.0 - order_S.numel() / max(T * k, 1) + r.weights.new_zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        """x: ``[..., S, d]`` -> (``[..., S, d]``, RoutingResult over the ``T = prod(...)`` flattened tokens)."""
        x_TD = x.reshape(-1, x.shape[-1])
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
        from moe.soft_moe import SoftMoELayer

        return SoftMoELayer(d_model, d_ff, num_experts, moe.slots_per_expert, causal)
    if moe.kind == "smear":
        from moe.smear import SMEARLayer

        return SMEARLayer(d_model, d_ff, num_experts, router, moe.smear_route_on, causal)
    raise ValueError(f"model.moe.kind={moe.kind!r}: expected 'sparse', 'soft' or 'smear'")
