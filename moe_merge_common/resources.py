"""Memory checked before models are built: a config that declares a model too large for this machine is refused
with its size, instead of an allocation that swaps, is killed, or fails after an output was written."""

from __future__ import annotations

import psutil

HEADROOM = 1.25  # activations, the evaluation's batches and the allocator's slack on top of the weights


def check_memory(nbytes: int, what: str, copies: int = 1) -> None:
    """Refuse (MemoryError naming ``what``) when ``copies`` models of ``nbytes`` each, with ``HEADROOM``, exceed
    the memory available now (``psutil.virtual_memory().available``)."""
    need, have = int(nbytes * copies * HEADROOM), psutil.virtual_memory().available
    if need > have:
        raise MemoryError(f"{what}: needs about {_gib(need)} of memory ({copies} x {_gib(nbytes)} of weights, with "
                          f"headroom); {_gib(have)} is available")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
