"""Single-device dispatchers: token rows in, expert-sorted rows out, and back.

Shapes: T tokens, d model width, k experts per token, E experts, S dispatched rows (``T*k`` dropless, at most
``T*k`` with a capacity, ``E*C`` for expert choice).

Every dispatcher has one interface, used by ``moe.nn.layers.MoELayer``::

    x_SD, counts_E, plan = dispatcher.dispatch(x_TD, routing)   # routing: the router's moe.nn.routing.RoutingPlan
    y_SD = experts(x_SD, counts_E)
    y_TD = dispatcher.combine(y_SD, plan)                          # back to token order, weighted by the router

``routing`` carries ``weights_TK``, ``ids_TK`` and the router's ``counts_E`` (used as they are: no recount).
``plan`` is a frozen record of what combine needs; ``plan.dropped_fraction`` is the share of (token, choice)
slots that a capacity dropped (None when nothing can be dropped). These are the expert-parallel base case: the
all-to-all dispatcher (``moe.parallel.all_to_all``) wraps one of them and moves the rows between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from moe import kernels
from moe.nn.routing import RoutingPlan


@dataclass(frozen=True)
class DroplessPlan:
    weights_TK: torch.Tensor
    rows_TK: torch.Tensor  # slot (t, j) -> its row in the expert-sorted layout
    dropped_fraction: torch.Tensor | None = None


@dataclass(frozen=True)
class CapacityPlan:
    weights_TK: torch.Tensor
    order_S: torch.Tensor  # kept slots ``t*k + j``, grouped by expert
    num_tokens: int
    dropped_fraction: torch.Tensor | None = None


@dataclass(frozen=True)
class ExpertChoicePlan:
    weights_TE: torch.Tensor
    tokens_EC: torch.Tensor  # token ids each expert took
    num_tokens: int
    dropped_fraction: torch.Tensor | None = None


def slot_order(
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    policy: str,
    counts_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept slots (``t*k + j`` indices) grouped by expert, and the kept count per expert ``[E]``.

    Dropless (``capacity=None``): every slot, stable within an expert. Otherwise each expert keeps at most
    ``capacity`` slots: those with the highest weight ("probability") or the earliest tokens ("position").
    ``counts_E``: the histogram of ``ids_TK`` when the router already has it (else it is counted here).
    """
    flat_ids = ids_TK.reshape(-1)
    if capacity is None or policy == "position":
        order = torch.argsort(flat_ids, stable=True)
    else:
        by_weight = torch.argsort(-weights_TK.detach().reshape(-1), stable=True)
        order = by_weight[torch.argsort(flat_ids[by_weight], stable=True)]
    counts = counts_E.long() if counts_E is not None else torch.bincount(flat_ids, minlength=num_experts)
    if capacity is None:
        return order, counts
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_ids[order]]
    keep = rank < capacity
    return order[keep], counts.clamp(max=capacity)


class DroplessDispatcher:
    """Every (token, choice) slot reaches its expert: ``moe.kernels.permute`` / ``unpermute`` (gathers only, so
    the combine and its backward are deterministic)."""

    def dispatch(self, x_TD: torch.Tensor, r: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, DroplessPlan]:
        x_SD, rows_TK = kernels.permute(x_TD, r.ids_TK, r.counts_E)
        return x_SD, r.counts_E, DroplessPlan(r.weights_TK, rows_TK)

    def combine(self, y_SD: torch.Tensor, plan: DroplessPlan) -> torch.Tensor:
        return kernels.unpermute(y_SD, plan.weights_TK.to(y_SD.dtype), plan.rows_TK)


class CapacityDispatcher:
    """Each expert takes at most ``ceil(capacity_factor * T * k / E)`` slots; a full expert keeps the slots with the
    highest weight ("probability") or the earliest tokens ("position"). Dropped slots contribute 0, so those
    tokens pass only through the residual stream."""

    def __init__(self, num_experts: int, capacity_factor: float, drop_policy: str):
        self.num_experts, self.capacity_factor, self.drop_policy = num_experts, capacity_factor, drop_policy

    def dispatch(self, x_TD: torch.Tensor, r: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, CapacityPlan]:
        T, k = r.ids_TK.shape
        capacity = math.ceil(self.capacity_factor * T * k / self.num_experts)
        order_S, counts_E = slot_order(r.ids_TK, r.weights_TK, self.num_experts, capacity, self.drop_policy,
                                       r.counts_E)  # fmt: skip
        dropped = 1.0 - order_S.numel() / max(T * k, 1) + r.weights_TK.new_zeros(())
        return x_TD[order_S // k], counts_E, CapacityPlan(r.weights_TK, order_S, T, dropped)

    def combine(self, y_SD: torch.Tensor, plan: CapacityPlan) -> torch.Tensor:
        k = plan.weights_TK.shape[1]
        y_slots = y_SD.new_zeros(plan.num_tokens * k, y_SD.shape[-1]).index_put((plan.order_S,), y_SD)  # unique
        y_TKD = rearrange(y_slots, "(t k) d -> t k d", k=k)
        return torch.einsum("tkd,tk->td", y_TKD, plan.weights_TK.to(y_TKD.dtype))


class ExpertChoiceDispatcher:
    """Expert choice: expert e takes the tokens ``routing.expert_tokens_EC[e]`` (C each); a token's output is the sum
    of its experts' outputs times their gates (an ``index_add``, since a token may have 0..E experts)."""

    def dispatch(self, x_TD: torch.Tensor, r: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, ExpertChoicePlan]:
        x_SD = x_TD[r.expert_tokens_EC.reshape(-1)]
        return x_SD, r.counts_E, ExpertChoicePlan(r.weights_TK, r.expert_tokens_EC, len(x_TD))

    def combine(self, y_SD: torch.Tensor, plan: ExpertChoicePlan) -> torch.Tensor:
        E = plan.tokens_EC.shape[0]
        gates = plan.weights_TE[plan.tokens_EC, torch.arange(E, device=y_SD.device)[:, None]].reshape(-1, 1)
        y_TD = y_SD.new_zeros(plan.num_tokens, y_SD.shape[-1])
        return y_TD.index_add(0, plan.tokens_EC.reshape(-1), y_SD * gates.to(y_SD))
