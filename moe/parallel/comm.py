"""Process groups and the collectives of expert parallelism: the EP and EDP groups, sums and gathers, the expert
gradients' reduction and the whole model's gradient norm. With ``moe.parallel.all_to_all``, the only modules of
``moe/`` that import ``torch.distributed``.

Groups (DeepSpeed's layout, ``deepspeed.utils.groups._create_expert_and_data_parallel``): with world size W and
expert-parallel size P, the expert-parallel (EP) groups are consecutive ranks ``[0..P-1], [P..2P-1], ...``; the
expert-data-parallel (EDP) groups join the ranks that hold the same experts, ``[i, i+P, i+2P, ...]``; dense
parameters are data-parallel over all W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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
