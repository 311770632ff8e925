"""Model merging: linear, task arithmetic, TIES, DARE, DELLA, PCB and STAR, streamed tensor by tensor."""

from merging import methods, pcb, star  # noqa: F401  (register the methods)
from merging.merge import merge
from merging.registry import METHODS, merge_tensors

__all__ = ["METHODS", "merge", "merge_tensors"]
