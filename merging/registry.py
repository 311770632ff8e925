"""The method registry and the contract every merge method follows.

A method merges one tensor name across N fine-tuned models. It sees the tensor as a 2-D *row view* ``[R, C]``
(``C`` = the last dimension; a 1-D tensor is one row) and works on ``Chunk``s of whole rows. Where the recipe needs
a statistic of a whole population (a magnitude threshold over the tensor or over the whole model, a norm), the
method declares it as a ``Stage``; the caller gathers every stage over the population first, then calls
``apply`` chunk by chunk. The in-memory call ``merge_tensors`` runs the same stages over one chunk, so a streamed
merge and an in-memory one compute the same numbers.

Randomness comes only from ``Chunk.gens``: one ``Stream`` per (seed, tensor name, model index), consumed
in row order, so results do not depend on chunking, on the order tensors are visited, or on the thread count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from merging.select import SAMPLE, StreamSelect, order_stats
from moe_merge_common.io import row_shape as row_view_shape


class Stream:
    """The random stream of model ``index`` on tensor ``name``, seeded from a hash of (seed, name, index).

    Bernoulli masks draw 32-bit words from numpy's PCG64: on the CPU it is about 2.5x faster per draw than torch's
    serial mt19937 and can run on several threads. ``torch`` is a ``torch.Generator`` from the same hash, for
    torch's samplers (the randomized SVD's Gaussian sketch).
    """

    def __init__(self, seed: int, name: str, index: int):
        digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=16).digest()
        self.key = int.from_bytes(digest, "little")
        self.bits = np.random.PCG64(self.key)
        self._torch: torch.Generator | None = None

    @property
    def torch(self) -> torch.Generator:
        if self._torch is None:
            self._torch = torch.Generator().manual_seed(self.key & ((1 << 63) - 1))
        return self._torch

    def int32(self, rows: int, cols: int) -> torch.Tensor:
        """``[rows, cols]`` uniform int32 (every bit pattern equally likely); each row takes ``ceil(cols / 2)``
        64-bit words, so what a row gets does not depend on how the rows are chunked."""
        words = (cols + 1) // 2
        raw = self.bits.random_raw(rows * words).view(np.int32)
        return torch.from_numpy(raw).view(rows, 2 * words)[:, :cols]


@dataclass
class Chunk:
    """Rows ``[row0, row0 + R)`` of one tensor, in fp32. tau: ``[N, R, C]`` task vectors; base: ``[R, C]``."""

    name: str
    base: torch.Tensor
    tau: torch.Tensor
    shape: tuple[int, ...]  # the full tensor's shape
    row0: int = 0
    gens: list[Stream] | None = None

    @property
    def n(self) -> int:
        return self.tau.shape[0]


DEFERRED = "deferred"  # stats flag and info key of a deferred stage (see Stage.deferrable)


@dataclass
class Stage:
    """A population statistic gathered before ``apply``: ``stats[key]`` is then visible to later stages and apply.

    kind "select": ``fn(chunk, stats) -> [N, m]`` values; result ``[N, len(ranks)]`` k-th smallest values, with
    ``ranks(population_size)`` 1-based. kind "sum": ``fn(chunk, stats) -> tensor``; result: the sum over chunks.
    kind "gather" (level "tensor" only): ``fn(chunk, stats) -> [N, entries of the chunk]``; result: ``[N, m]``,
    the whole tensor's values in row-major order (for statistics of every entry, e.g. ranks over the tensor).
    level: "tensor" (one population per tensor) or "global" (all tensors of the model together).
    random: fn draws from ``chunk.gens`` (the caller hands it fresh streams for each pass).
    inline: ``apply`` computes it itself when its chunk is the whole population, so it is skipped then.
    finish: turns the gathered result into what later stages and apply read (e.g. a decomposition of a sum).
    deferrable: a tensor-level "sum" used only for its sign, to break ties. Instead of a pass of its own, the
    caller may set ``stats[DEFERRED]``: ``apply`` then assumes the sign is +1 and returns ``info[DEFERRED] =
    (partial sum, flat indices in the chunk, values there if the sign is -1)``; the caller rewrites those
    entries when the whole sum comes out negative.
    """

    key: str
    kind: str
    fn: Callable[[Chunk, dict], torch.Tensor]
    level: str = "tensor"
    ranks: Callable[[int], list[int]] | None = None
    random: bool = False
    inline: bool = False
    deferrable: bool = False
    finish: Callable[[torch.Tensor], object] | None = None

    def accumulator(self, size: int) -> Accumulator:
        """``size``: entries per model in the population."""
        return Accumulator(self, size)


class Accumulator:
    """Gathers one stage over a population streamed as chunks: ``passes``, ``update``, ``end_pass``, ``result``.

    While ``sampling`` is true (the first pass of a select), any representative subset of the population may be
    fed: whole chunks are thinned to about ``SAMPLE`` entries per model, or the caller feeds a few rows only.
    """

    def __init__(self, stage: Stage, size: int):
        self.stage = stage
        self.size = size
        self._sel = StreamSelect(stage.ranks, size) if stage.kind == "select" else None
        self._sum: torch.Tensor | None = None
        if stage.kind == "gather" and stage.level != "tensor":
            raise ValueError(f"stage {stage.key!r}: a 'gather' stage must be of level 'tensor'")

    @property
    def passes(self) -> int:
        return self._sel.passes if self._sel else 1

    @property
    def sampling(self) -> bool:
        return self._sel is not None and self._sel.sampling

    def update(self, chunk: Chunk, stats: dict, thin: bool = True) -> None:
        value = self.stage.fn(chunk, stats)
        if self.stage.kind == "gather":
            if self._sum is None:
                self._sum = torch.empty(value.shape[0], self.size)
            at = chunk.row0 * chunk.tau.shape[-1]
            self._sum[:, at : at + value.shape[1]] = value
        elif self._sel is not None:
            if self._sel.sampling and thin:
                value = value[:, :: max(1, self.size // SAMPLE)]
            self._sel.update(value)
        else:
            self._sum = value.double() if self._sum is None else self._sum + value.double()

    def end_pass(self) -> None:
        if self._sel is not None:
            self._sel.end_pass()

    def result(self):
        out = self._sel.result() if self._sel is not None else self._sum
        return self.stage.finish(out) if self.stage.finish else out


def gather_in_memory(stage: Stage, chunk: Chunk, stats: dict, fresh_gens) -> torch.Tensor:
    """A stage over a population made of this single chunk."""
    if stage.random:
        chunk.gens = fresh_gens()
    value = stage.fn(chunk, stats)
    if stage.kind == "select":
        out = order_stats(value, stage.ranks)
    else:
        out = value if stage.kind == "gather" else value.double()
    return stage.finish(out) if stage.finish else out


@dataclass
class Param:
    default: object
    doc: str
    choices: tuple | None = None


@dataclass
class Method:
    """A registered merge method. Call it like a pure function: ``METHODS[name](base, finetuned, **params)``."""

    name: str
    pretty_name: str
    reference_url: str
    params: dict[str, Param]
    apply: Callable[[Chunk, dict, dict], tuple[torch.Tensor, dict]]  # (chunk, stats, params) -> (merged, info)
    stages: Callable[[dict], list[Stage]] = lambda p: []
    chunkable: Callable[[dict, tuple], bool] = lambda p, shape: True  # False: apply needs the whole tensor (shape)
    random: Callable[[dict], bool] = lambda p: False
    validate: Callable[[dict, int], None] = lambda p, n: None
    doc: str = ""

    def resolve(self, params: dict, n: int) -> dict:
        """Defaults filled in, unknown names and bad choices rejected (ValueError naming the parameter)."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"method {self.name!r} does not take {sorted(unknown)}; it takes {sorted(self.params)}")
        p = {k: params.get(k, spec.default) for k, spec in self.params.items()}
        for k, v in p.items():
            values = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                raise ValueError(f"method.params.{k}={v!r}: expected finite numbers (method {self.name!r})")
        for k, spec in self.params.items():
            if spec.choices is not None and p[k] not in spec.choices:
                raise ValueError(f"method.params.{k}={p[k]!r}: expected one of {list(spec.choices)} "
                                 f"(method {self.name!r})")
        if "weights" in p and p["weights"] is not None and len(p["weights"]) != n:
            raise ValueError(f"weights: expected {n} values (one per fine-tuned model), got {len(p['weights'])}")
        self.validate(p, n)
        return p

    def generators(self, p: dict, name: str, n: int) -> list[Stream] | None:
        return [Stream(int(p["seed"]), name, i) for i in range(n)] if self.random(p) else None

    def __call__(self, base: torch.Tensor, finetuned: Sequence[torch.Tensor], name: str = "", **params):
        return merge_tensors(self.name, base, finetuned, name=name, **params)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def method_params(method: str) -> dict[str, object]:
    """The parameters a method accepts and their defaults."""
    return {k: spec.default for k, spec in _method(method).params.items()}


def _method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    return METHODS[method]


def make_chunk(name: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> Chunk:
    R, C = row_view_shape(base.shape)
    b = base.float().reshape(R, C)
    tau = torch.empty(len(finetuned), R, C)
    for i, f in enumerate(finetuned):
        tau[i].copy_(f.reshape(R, C))
    tau.sub_(b)
    return Chunk(name=name, base=b, tau=tau, shape=tuple(base.shape))


def merge_tensors(
    method: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor], *, name: str = "", **params
) -> torch.Tensor:
    """Merge one tensor in memory with ``METHODS[method]``; returns fp32 shaped like ``base``.

    ``name`` is the tensor's name: it seeds the random methods (DARE, DELLA, randomized SVD) together with
    ``seed`` and the model index. A "global" trim scope here means "over this tensor" (it is the whole model).
    """
    m = _method(method)
    if not finetuned:
        raise ValueError("finetuned: expected at least one fine-tuned tensor")
    for i, f in enumerate(finetuned):
        if f.shape != base.shape:
            raise ValueError(f"finetuned[{i}]: shape {tuple(f.shape)} differs from base {tuple(base.shape)}")
    p = m.resolve(params, len(finetuned))
    merged, _ = apply_with_stats(m, p, make_chunk(name, base, finetuned))
    return merged.reshape(base.shape)


def apply_with_stats(m: Method, p: dict, chunk: Chunk, stats: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Gather every stage over this one chunk (skipping keys already in ``stats``), then apply."""
    stats = dict(stats or {})
    fresh = lambda: m.generators(p, chunk.name, chunk.n)  # noqa: E731
    for stage in m.stages(p):
        if stage.key not in stats and not stage.inline:
            stats[stage.key] = gather_in_memory(stage, chunk, stats, fresh)
    chunk.gens = fresh()
    return m.apply(chunk, stats, p)
