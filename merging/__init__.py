"""Model merging: task arithmetic and TIES over safetensors checkpoints, streamed tensor by tensor."""

from merging.merge import merge
from merging.methods import METHODS, merge_tensors

__all__ = ["METHODS", "merge", "merge_tensors"]
