"""Dispatchers: the seam between a router and its experts (``dispatch`` rows to experts, ``combine`` them back).

``moe.dispatch.local`` holds the single-device ones (dropless, capacity, expert choice);
``moe.dispatch.all_to_all`` the expert-parallel one, installed from outside by ``moe.parallel.expert_parallel``.
"""

from __future__ import annotations

from moe.config import MoEConfig
from moe.dispatch.local import CapacityDispatcher, DroplessDispatcher, ExpertChoiceDispatcher, slot_order

__all__ = ["CapacityDispatcher", "DroplessDispatcher", "ExpertChoiceDispatcher", "build_dispatcher", "slot_order"]


def build_dispatcher(router_kind: str, moe: MoEConfig, num_experts: int):
    """The single-device dispatcher for a layer: expert choice, capacity-limited (``capacity_factor > 0``) or
    dropless."""
    if router_kind == "expert_choice":
        return ExpertChoiceDispatcher()
    if moe.capacity_factor > 0:
        return CapacityDispatcher(num_experts, moe.capacity_factor, moe.drop_policy)
    return DroplessDispatcher()
