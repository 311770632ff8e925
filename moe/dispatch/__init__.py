"""Dispatchers: the seam between a router and its experts (``dispatch`` rows to experts, ``combine`` them back).

``moe.dispatch.local`` holds the single-device ones (dropless, capacity, expert choice);
``moe.parallel.all_to_all`` the expert-parallel one, installed from outside by ``moe.parallel.expert_parallel``.
Both are ``Dispatcher`` s.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from moe.config import MoEConfig
from moe.dispatch.local import CapacityDispatcher, DroplessDispatcher, ExpertChoiceDispatcher, slot_order
from moe.nn.routing import RoutingPlan

__all__ = ["CapacityDispatcher", "DispatchPlan", "Dispatcher", "DroplessDispatcher", "ExpertChoiceDispatcher",
           "build_dispatcher", "slot_order"]  # fmt: skip


@runtime_checkable
class DispatchPlan(Protocol):
    """What ``dispatch`` hands to ``combine`` (a frozen record); ``dropped_fraction``: the share of (token, choice)
    slots a capacity dropped, None when nothing can be dropped."""

    dropped_fraction: torch.Tensor | None


@runtime_checkable
class Dispatcher(Protocol):
    """Moves token rows to the experts and back. S: the rows the experts see (``T*k`` dropless)."""

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """``x_SD`` grouped by expert, ``counts_E`` (rows per expert, in that order), and the plan for combine."""

    def combine(self, y_SD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs back to token order, weighted by the router: ``y_TD``."""


def build_dispatcher(router_kind: str, moe: MoEConfig, num_experts: int):
    """The single-device dispatcher for a layer: expert choice, capacity-limited (``capacity_factor > 0``) or
    dropless."""
    if router_kind == "expert_choice":
        return ExpertChoiceDispatcher()
    if moe.capacity_factor > 0:
        return CapacityDispatcher(num_experts, moe.capacity_factor, moe.drop_policy)
    return DroplessDispatcher()
