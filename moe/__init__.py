"""Mixture-of-Experts routing, layers and training. Submodules import lazily; nothing heavy is loaded here."""

from moe.losses import load_balancing_loss, router_z_loss
from moe.routing import RoutingResult, route

__all__ = ["RoutingResult", "load_balancing_loss", "route", "router_z_loss"]
