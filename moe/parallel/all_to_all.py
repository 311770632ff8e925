"""The expert-parallel dispatcher: a local dispatcher's rows exchanged over an EP group (``moe.parallel.comm``
makes the groups), so that each rank runs its ``E/P`` experts on every rank's tokens for them.

Dispatch across an EP group of P ranks, each holding ``L = E/P`` experts (rank i: experts ``i*L .. i*L+L-1``)::

    x_SD  = the local dispatcher's rows, grouped by global expert (so by destination rank)
    1. all_to_all_single(counts [P, L])        -> recv_PL: rows each source rank sends to each of my experts
    2. one host sync for the splits
    3. all_to_all_single(x_SD, splits)          -> x_RD grouped by source rank, then expert
    4. a stable sort to expert-major order      -> x_local [sum(recv_PL), d], counts recv_PL.sum(0)

Combine runs 4, 3 backwards (a gather through the inverse order, the reverse exchange) and hands the rows back
to the local dispatcher's combine. Both exchanges are autograd functions whose backward is the opposite
exchange, so a rank's expert parameters get the gradient of the sum of the EP group's losses. Zero-row splits
are valid everywhere: a rank that routes no tokens, or an expert that receives none, still joins every exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.dispatch import Dispatcher, DispatchPlan
from moe.nn.routing import RoutingPlan
from moe.parallel.comm import ExpertParallelGroups


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; the backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    with torch.profiler.record_function("moe/all_to_all"):
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable variable-split all-to-all of the rows of ``x`` (``in_splits[j]`` rows go to rank j)."""
    return _Exchange.apply(x, out_splits, in_splits, group)


@dataclass(frozen=True)
class AllToAllPlan:
    inner: DispatchPlan  # the local dispatcher's plan
    send_splits: list[int]
    recv_splits: list[int]
    inverse_R: torch.Tensor  # rank-major row i is expert-major row inverse_R[i]
    dropped_fraction: torch.Tensor | None = None


class AllToAllDispatcher:
    """Expert-parallel dispatch over an EP group: wraps a local dispatcher (dropless, capacity or expert choice)
    whose rows come grouped by global expert, and runs this rank's ``E/P`` experts on every rank's rows for them.

    Bytes per layer and direction: exactly the rows the local dispatcher produced (``T*k*d`` elements dropless),
    plus ``E`` counts.
    """

    def __init__(self, local: Dispatcher, groups: ExpertParallelGroups, num_experts: int):
        if num_experts % groups.ep_size:
            raise ValueError(f"num_experts={num_experts}: not divisible by parallel.ep_size={groups.ep_size}")
        self.local, self.groups = local, groups
        self.num_experts, self.num_local = num_experts, num_experts // groups.ep_size

    def dispatch(self, x_TD: torch.Tensor, r: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, AllToAllPlan]:
        P, L, group = self.groups.ep_size, self.num_local, self.groups.ep_group
        # counts_E: the rows per expert the local dispatcher produced; dropless, that is the router's counts_E itself
        # (the fused kernel's histogram goes straight into the count exchange, nothing is recounted)
        x_SD, counts_E, inner = self.local.dispatch(x_TD, r)
        counts_PL = counts_E.to(torch.int64).reshape(P, L)
        recv_PL = torch.empty_like(counts_PL)
        with torch.profiler.record_function("moe/all_to_all_counts"):
            dist.all_to_all_single(recv_PL, counts_PL, group=group)  # recv_PL[j, e]: rank j's rows for my expert e
        send_splits = counts_PL.sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_RD = exchange(x_SD, recv_splits, send_splits, group)  # grouped by source rank, then local expert
        # rank-major (j, e) blocks -> expert-major (e, j): a stable sort of each row's block key e*P + j
        block_R = torch.repeat_interleave(torch.arange(P * L, device=x_RD.device), recv_PL.reshape(-1).to(x_RD.device))
        key_R = (block_R % L) * P + block_R // L
        order_R = torch.argsort(key_R, stable=True)
        inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(len(order_R), device=x_RD.device))
        plan = AllToAllPlan(inner, send_splits, recv_splits, inverse_R, inner.dropped_fraction)
        return x_RD[order_R], recv_PL.sum(0).to(counts_E.device), plan

    def combine(self, y_RD: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        y_rank_major = y_RD[plan.inverse_R]  # a gather: deterministic
        y_SD = exchange(y_rank_major, plan.send_splits, plan.recv_splits, self.groups.ep_group)
        return self.local.combine(y_SD, plan.inner)
