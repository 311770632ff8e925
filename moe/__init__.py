"""Mixture-of-Experts routing, layers and training. Submodules import lazily; nothing heavy is loaded here."""

from moe.losses import load_balancing_loss, router_z_loss
from moe.routing import RouterAux, RoutingPlan, RoutingResult, route, route_fused

__all__ = ["RouterAux", "RoutingPlan", "RoutingResult", "load_balancing_loss", "route", "route_fused", "router_z_loss"]
