"""Model merging, streamed tensor by tensor: linear, task arithmetic, TIES, DARE, DELLA, PCB, STAR, Breadcrumbs,
SLERP, Model Stock, TSV-M, Iso-C / Iso-CTS (``METHODS``), DivMerge and PLeaS (data-aware), and MoE assembly.

It imports nothing of ``moe``: what it needs from a model comes through ``merging.protocols`` (the adapter the
``adapter`` config node names). The checkpoint reader and writer, the output policy and the CLI plumbing live in
``moe_merge_common``; their old paths (``merging.io``, ``merging.outputs``, ``merging.cli``, ...) still import.
"""

from merging import methods, pcb, star  # noqa: F401  (register the methods)
from merging.merge import merge
from merging.registry import METHODS, merge_tensors
from moe_merge_common.aliases import install

MOVED = {f"merging.{m}": f"moe_merge_common.{m}" for m in ("io", "outputs", "patterns", "resources", "cli", "lora")}
install(MOVED)

__all__ = ["METHODS", "merge", "merge_tensors"]
