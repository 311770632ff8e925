"""Lightning callbacks for MoE training: routing statistics and pictures, and the routers' schedules."""

from moe.callbacks.router_schedule import RouterScheduleCallback
from moe.callbacks.routing_stats import RoutingStatsCallback

__all__ = ["RouterScheduleCallback", "RoutingStatsCallback"]
