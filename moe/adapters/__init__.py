"""What ``merging`` needs from this library's model: ``MoEAdapter`` (a ``merging.protocols`` adapter: load, build,
evaluate, task data, PLeaS's permutation spec), its byte-level LM variant, and the train-then-merge pipeline. The
only modules of ``moe`` that import ``merging``."""

from moe.adapters.moe_adapter import MoEAdapter

__all__ = ["MoEAdapter"]
