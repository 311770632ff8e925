"""Routing statistics and how they are shown: the per-layer summaries (``stats``), the pictures (``plots``) and
the offline run report (``render``; ``python -m moe.report RUN_DIR``). The callback that collects the statistics
during training is ``moe.callbacks.RoutingStatsCallback``."""

from moe.report.render import main, metric_series, read_stats, render

__all__ = ["main", "metric_series", "read_stats", "render"]
