"""Expert parallelism, applied from outside the model code.

``expert_parallel(model, ep_size)`` (after ``torch.distributed.init_process_group``):

- shards every sparse ``MoELayer`` over EP groups of ``ep_size`` consecutive ranks: the rank with index i in its
  group keeps experts ``i*E/ep .. (i+1)*E/ep - 1``, in order, as the same ``SwiGLUExperts`` parameters with
  ``E/ep`` rows, tagged the way DeepSpeed expects (``param.allreduce = False``, ``param.group_name``);
- installs the all-to-all dispatcher (``moe.parallel.all_to_all``) around the layer's own dispatcher;
- makes every router reduce its expert counts over all ranks, so the load-balancing loss, the aux-loss-free bias
  and the routing statistics see the global batch (also at ``ep_size=1``, plain data parallelism).

Soft MoE and SMEAR layers mix every expert into every token; they stay whole and data-parallel.

Placement (world W, EP size P; ranks r = g*P + i):

| parameters   | held by rank r                 | gradient reduced over             |
|--------------|--------------------------------|-----------------------------------|
| dense        | all of them                    | all W ranks (mean)                |
| experts      | experts ``i*E/P .. i*E/P+E/P-1`` | EDP group ``{i, i+P, ...}``, divided by W |

Checkpoints hold the full, unsharded experts (``gather_state_dict``), so they load at any EP size
(``shard_state_dict``) and in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.nn.layers import MoELayer
from moe.nn.routers import Router
from moe.parallel import comm
from moe.parallel.all_to_all import AllToAllDispatcher
from moe.parallel.comm import ExpertParallelGroups, make_groups

__all__ = [
    "ExpertParallelGroups",
    "expert_parallel",
    "expert_params",
    "gather_state_dict",
    "is_expert_param",
    "layout",
    "make_groups",
    "shard_state_dict",
    "sharded_layers",
]

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's test for an expert-parallel parameter (``deepspeed.moe.utils.is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


def expert_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_expert_param(p)]


def sharded_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """The sparse MoE layers that ``expert_parallel`` sharded, with their module names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer) and m.ep_groups is not None]


def layout(world_size: int, ep_size: int) -> list[dict[str, object]]:
    """Where every rank sits: ``{"rank", "ep_group", "ep_rank", "edp_group", "experts"}`` per rank, for
    ``E``-agnostic display (``experts`` is the slice index ``i`` of ``i*E/ep .. (i+1)*E/ep - 1``)."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size}: expected a divisor of the world size ({world_size})")
    return [
        {
            "rank": r,
            "ep_group": list(range(r - r % ep_size, r - r % ep_size + ep_size)),
            "ep_rank": r % ep_size,
            "edp_group": list(range(r % ep_size, world_size, ep_size)),
            "experts": r % ep_size,
        }
        for r in range(world_size)
    ]


def expert_parallel(model: nn.Module, ep_size: int, groups: ExpertParallelGroups | None = None) -> nn.Module:
    """Shard ``model``'s sparse MoE layers over EP groups of ``ep_size`` ranks, in place; returns ``model``.

    Call it on every rank with the same (unsharded, identically initialised) model, before the optimizer is built:
    an optimizer made earlier would hold the replaced expert tensors and silently never update the experts.
    ``groups``: made elsewhere (DeepSpeed's); by default ``make_groups(ep_size)`` creates them. Every forward of
    the result is a collective: all ranks must run it. ``ep_size=1`` shards nothing and only makes the routers'
    counts global.
    """
    if not comm.is_initialized():
        raise RuntimeError("moe.parallel.expert_parallel: call torch.distributed.init_process_group first")
    groups = groups or make_groups(ep_size)
    if groups.ep_size != ep_size:
        raise ValueError(f"groups.ep_size={groups.ep_size} differs from ep_size={ep_size}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    if any(m.ep_groups is not None for _, m in layers):
        raise ValueError("expert_parallel: the model is already sharded")
    for name, layer in layers:
        if layer.num_experts % ep_size:
            raise ValueError(
                f"{name}: model.num_experts={layer.num_experts} is not divisible by parallel.ep_size={ep_size}"
            )
    reduce = _count_reducer(groups)
    for m in model.modules():
        if isinstance(m, Router):
            m.reduce_counts = reduce
    if ep_size == 1:  # plain data parallelism: whole experts, reduced with the dense parameters
        return model
    for _, layer in layers:
        E, L, i = layer.num_experts, layer.num_experts // ep_size, groups.ep_rank
        experts = layer.experts
        for w in EXPERT_WEIGHTS:
            full = getattr(experts, w)
            shard = nn.Parameter(full.detach()[i * L : (i + 1) * L].clone(), requires_grad=full.requires_grad)
            shard.allreduce, shard.group_name = False, groups.group_name
            setattr(experts, w, shard)
        experts.num_experts = L
        layer.dispatcher = AllToAllDispatcher(layer.dispatcher, groups, E)
        layer.ep_groups = groups
    return model


def _count_reducer(groups: ExpertParallelGroups):
    def reduce_counts(counts_E: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_sum(counts_E, groups.dp_group)

    return reduce_counts


def gather_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None, prefix: str = ""):
    """``model``'s state dict with every sharded expert tensor gathered to its full ``[E, ...]`` (a collective
    over each EP group). ``state``: a state dict of ``model`` to gather instead (keys under ``prefix``)."""
    state = dict(model.state_dict() if state is None else state)
    for name, layer in sharded_layers(model):
        for w in EXPERT_WEIGHTS:
            key = f"{prefix}{name}.experts.{w}" if name else f"{prefix}experts.{w}"
            if key in state:
                state[key] = comm.all_gather_dim0(state[key], layer.ep_groups.ep_group)
    return state


def shard_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict cut to this rank's experts, ready for ``model.load_state_dict``."""
    state = dict(state)
    for name, layer in sharded_layers(model):
        P, i = layer.ep_groups.ep_size, layer.ep_groups.ep_rank
        for w in EXPERT_WEIGHTS:
            key = f"{prefix}{name}.experts.{w}" if name else f"{prefix}experts.{w}"
            if key not in state:
                continue
            full = state[key]
            if full.shape[0] != layer.num_experts:
                raise ValueError(
                    f"{key}: expected the full [{layer.num_experts}, ...] experts, got shape {tuple(full.shape)}"
                )
            L = layer.num_experts // P
            state[key] = full[i * L : (i + 1) * L].clone()
    return state
