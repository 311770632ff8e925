"""Lightning callbacks: routing statistics and pictures, the routers' schedules, and the run's own loop control."""

from moe.callbacks.router_schedule import RouterScheduleCallback
from moe.callbacks.routing_stats import RoutingStatsCallback
from moe.callbacks.run import LastCheckpoint, RunState, StepProgressBar, ValidateAtLastStep

__all__ = [
    "LastCheckpoint",
    "RouterScheduleCallback",
    "RoutingStatsCallback",
    "RunState",
    "StepProgressBar",
    "ValidateAtLastStep",
]
