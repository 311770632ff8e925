"""Expert parallelism over ``torch.distributed``: process groups, the all-to-all dispatcher, and the few
collectives the parallel code needs. The only module of ``moe/`` that imports ``torch.distributed``.

Groups (DeepSpeed's layout, ``deepspeed.utils.groups._create_expert_and_data_parallel``): with world size W and
expert-parallel size P, the expert-parallel (EP) groups are consecutive ranks ``[0..P-1], [P..2P-1], ...``; the
expert-data-parallel (EDP) groups join the ranks that hold the same experts, ``[i, i+P, i+2P, ...]``; dense
parameters are data-parallel over all W ranks.

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

from moe.routing import RoutingPlan


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the EP layout. ``ep_rank`` is the index inside its EP group."""

    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None  # ranks holding the same experts
    dp_group: dist.ProcessGroup | None  # every rank (None = the default group)

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for the expert parameters' group (``param.group_name``)."""
        return f"ep_size_{self.ep_size}"

    @property
    def edp_size(self) -> int:
        return dist.get_world_size(self.edp_group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def make_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the EP and EDP groups (a collective: every rank calls it, in the same order)."""
    if not is_initialized():
        raise RuntimeError("expert parallelism: call torch.distributed.init_process_group first")
    world, me = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size}: expected a divisor of the world size ({world})")
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # new_group must be called by every rank for every group
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= me < start + ep_size:
            ep_group = g
    for i in range(ep_size):
        g = dist.new_group(list(range(i, world, ep_size)))
        if me % ep_size == i:
            edp_group = g
    return ExpertParallelGroups(ep_size, me % ep_size, ep_group, edp_group, None)


def groups_from(ep_size: int, ep_group, edp_group, dp_group=None) -> ExpertParallelGroups:
    """Wrap groups made elsewhere (DeepSpeed's) in the same record."""
    return ExpertParallelGroups(ep_size, dist.get_rank(ep_group), ep_group, edp_group, dp_group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``t`` over ``group`` (a new tensor; ``t`` is left as it is; no autograd)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_dim0(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenation along dim 0 of every group member's ``t`` (same shapes), in group-rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


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
    inner: object  # the local dispatcher's plan
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

    def __init__(self, local, groups: ExpertParallelGroups, num_experts: int):
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


# ---- gradients of expert-parallel parameters ------------------------------------------------------------------


@torch.no_grad()
def reduce_expert_grads(params: list[torch.nn.Parameter], groups: ExpertParallelGroups) -> None:
    """Give expert gradients the dense parameters' scaling: ``grad = sum over the EDP group / world size``.

    After backward a rank's expert gradient is the gradient of the sum of its EP group's P losses; data-parallel
    dense gradients are the mean over all W ranks' losses, so the sum over the EDP group is divided by W.
    """
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if groups.edp_size > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=groups.edp_group)
        p.grad.div_(world)


@torch.no_grad()
def global_grad_norm(dense: list[torch.Tensor], experts: list[torch.Tensor], groups: ExpertParallelGroups,
                     norm_type: float = 2.0) -> torch.Tensor:  # fmt: skip
    """The gradient norm of the whole (unsharded) model: every dense parameter once (they are equal on all ranks
    after the data-parallel reduction) and every expert once (summed over the EP group)."""
    if norm_type != 2.0:
        raise ValueError(f"norm_type={norm_type}: expert-parallel clipping supports the 2-norm")

    def sq(ts):
        grads = [t.grad.detach().float() for t in ts if t.grad is not None]
        return torch.stack([g.square().sum() for g in grads]).sum() if grads else torch.zeros(())

    expert_sq = sq(experts)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=groups.ep_group)
    return (sq(dense) + expert_sq).sqrt()
