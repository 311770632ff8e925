"""The merge plan: every output tensor split into *units* (a whole tensor, or one expert of a batched ``[E, ...]``
expert tensor), each merged, copied from the base or a model, or averaged; and the loader that reads a unit's
rows from every model in fp32 chunks."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from merging.registry import Chunk
from moe_merge_common.io import Checkpoint, row_shape
from moe_merge_common.patterns import compile_pattern

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCAB_PATTERN = r"(embed|lm_head|wte|shared|word_embeddings|(^|\.)head\.)"
EXPERT_PATTERN = r"(\.experts\.|\.moe\.w_(gate|up|down)$)"  # batched [E, ...] expert weights
ROUTER_PATTERN = r"\.router\."  # router weights and buffers (gate, expert_bias, ...)
TIED = {"lm_head.weight": "model.embed_tokens.weight", "head.weight": "embed.weight"}
CHUNK_ELEMS = 1 << 18  # rows per chunk = CHUNK_ELEMS // row length; N x 1 MiB fp32 working tensors (cache-sized)
HOLD_BYTES = 256 << 20  # a unit read whole (fp32 base + N task vectors) for multi-pass methods: at most this
REPORT_NAME = "merge_report.json"


@dataclass
class Unit:
    """Rows ``[r0, r1)`` of output tensor ``name`` merged as one population; ``key`` names it (RNG, report)."""

    name: str
    key: str
    r0: int
    r1: int
    shape: tuple[int, ...]  # the unit's own shape (an expert's matrix for an expert unit)
    mode: str = "merge"  # merge | copy | mean
    source: int = -1  # mode "copy": -1 = base, i = models[i]


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    units: list[Unit] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # the name read from each model (a tied alias maybe)
    rows: list[int] = field(default_factory=list)  # rows each model has (vocab crop)


def all_finite(t: torch.Tensor) -> bool:
    """Every value of ``t`` is finite. One sum first (a NaN or an inf carries through it); only a non-finite sum (a
    NaN/inf, or finite values summing past fp32's range) pays for the exact elementwise check."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


class NonFiniteError(ValueError):
    """An input or merged tensor holds NaN or inf (see ``merge(allow_nonfinite=...)``)."""


class Loader:
    """Reads rows of one output tensor from the base and every model, in fp32, as a ``Chunk``.

    ``hold(e, unit)`` reads a whole unit once and serves its rows from memory until ``release()``: methods that
    pass over a tensor several times (thresholds, votes) then read and convert it once."""

    def __init__(self, base: Checkpoint, models: list[Checkpoint], allow_nonfinite: bool = False):
        self.base, self.models, self.allow_nonfinite = base, models, allow_nonfinite
        self._held: dict[int, Chunk] = {}  # id(unit) -> the whole unit (one per merging thread at most)

    def hold(self, e: Entry, unit: Unit) -> None:
        self._held[id(unit)] = self._read(e, unit, unit.r0, unit.r1)

    def release(self, unit: Unit) -> None:
        self._held.pop(id(unit), None)

    def rows(self, e: Entry, unit: Unit, r0: int, r1: int) -> Chunk:
        whole = self._held.get(id(unit))
        if whole is not None:
            a, b = r0 - unit.r0, r1 - unit.r0
            return Chunk(name=unit.key, base=whole.base[a:b], tau=whole.tau[:, a:b], shape=unit.shape, row0=a)
        return self._read(e, unit, r0, r1)

    def _read(self, e: Entry, unit: Unit, r0: int, r1: int) -> Chunk:
        b = self.base.read(e.name, (r0, r1)).float()
        self.check_finite(b, self.base, e.name, "the base")
        tau = torch.empty(len(self.models), *b.shape)
        for i, (m, src, have) in enumerate(zip(self.models, e.sources, e.rows)):
            if have >= r1:
                tau[i].copy_(m.read(src, (r0, r1)))
            else:  # rows this model lacks (a smaller vocabulary): no task vector there
                n = max(0, have - r0)
                if n:
                    tau[i, :n].copy_(m.read(src, (r0, have)))
                tau[i, n:].copy_(b[n:])
        if not self.allow_nonfinite and not all_finite(tau):  # one check for all models
            for i, (m, src) in enumerate(zip(self.models, e.sources)):
                self.check_finite(tau[i], m, src, f"model {i}")
        tau.sub_(b)
        return Chunk(name=unit.key, base=b, tau=tau, shape=unit.shape, row0=r0 - unit.r0)

    def raw(self, e: Entry, unit: Unit, r0: int, r1: int) -> torch.Tensor:
        src = self.base if unit.source < 0 else self.models[unit.source]
        name = e.name if unit.source < 0 else e.sources[unit.source]
        data = src.read(name, (r0, r1))
        if data.is_floating_point():
            self.check_finite(data, src, name, "the base" if unit.source < 0 else f"model {unit.source}")
        return data

    def check_finite(self, t: torch.Tensor, ck: Checkpoint, name: str, who: str) -> None:
        """Refuse NaN/inf input values (unless ``allow_nonfinite``), naming the tensor, the model and its file."""
        if self.allow_nonfinite or all_finite(t):
            return
        bad = ~torch.isfinite(t)
        kinds = [k for k, m in (("NaN", t.isnan()), ("+inf", t == float("inf")), ("-inf", t == float("-inf")))
                 if bool(m.any())]  # fmt: skip
        raise NonFiniteError(
            f"{ck.file_of(name)}: tensor {name!r} of {who} holds {int(bad.sum())} non-finite values "
            f"({', '.join(kinds)}) in the rows read; fix the checkpoint, exclude the tensor (exclude=[...]) or pass "
            "allow_nonfinite=true to merge it anyway"
        )


def unit_chunks(unit: Unit, cols: int, chunked: bool, chunk_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_elems // max(cols, 1)) if chunked else unit.r1 - unit.r0
    for r in range(unit.r0, unit.r1, step):
        yield r, min(unit.r1, r + step)


def dtype_class(dtype: torch.dtype) -> str:
    """"complex", "floating", "bool" or "integer": tensors of different classes are never merged together."""
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "bool" if dtype == torch.bool else "integer"


def plan(
    base: Checkpoint,
    models: list[Checkpoint],
    out_dtype: str | None,
    exclude: Sequence[str],
    vectors: str,
    vocab: str,
    experts: bool,
    router_source: str,
    tied: dict[str, str],
) -> list[Entry]:
    """Decide, per base tensor, what each model contributes and how it is merged; errors name file and tensor."""
    excl = [compile_pattern(x, f"exclude[{i}]") for i, x in enumerate(exclude)]
    entries = []
    mismatches = []
    for name in base.names:
        shape, dtype = base.shape(name), base.dtype(name)
        e = Entry(name, shape, dtype, DTYPES[out_dtype] if out_dtype and dtype.is_floating_point else dtype)
        vocab_like = re.search(VOCAB_PATTERN, name) is not None and len(shape) == 2
        if any(x.search(name) for x in excl):  # copied from the base: the models need not have it
            e.units = [Unit(name, name, 0, row_shape(shape)[0], shape, "copy", -1)]
            entries.append(e)
            continue
        for m in models:
            src = name if name in m.where else tied.get(name) if tied.get(name) in m.where else None
            if src is None:
                for a, b in tied.items():  # the reverse direction of a tie
                    if b == name and a in m.where:
                        src = a
            if src is None:
                mismatches.append(f"{m.path}: missing tensor {name!r}")
                continue
            ms = m.shape(src)
            if ms != shape and not (vocab_like and len(ms) == 2 and ms[1] == shape[1]):
                mismatches.append(f"{m.file_of(src)}: tensor {name!r} has shape {ms}, base has {shape}")
            if dtype_class(m.dtype(src)) != dtype_class(dtype):  # an int or complex tensor is no weight to merge
                mismatches.append(f"{m.file_of(src)}: tensor {name!r} is {m.dtype(src)}, base has {dtype} (a "
                                  f"{dtype_class(m.dtype(src))} vs a {dtype_class(dtype)} tensor; exclude it to "
                                  "copy the base's)")  # fmt: skip
            e.sources.append(src)
            e.rows.append(min(row_shape(ms)[0], row_shape(shape)[0]))
        if mismatches:
            continue
        if math.prod(shape) == 0:  # nothing to merge or walk: the base's (empty) tensor as it is
            e.units = [Unit(name, name, 0, 0, shape, "copy", -1)]
            entries.append(e)
            continue
        R, _ = row_shape(shape)
        copy = (
            not dtype.is_floating_point
            or (vectors == "base" and len(shape) <= 1)
            or (vocab == "base" and any(m.shape(s) != shape for m, s in zip(models, e.sources)))
        )
        mode = "copy" if copy else "mean" if vectors == "mean" and len(shape) <= 1 else "merge"
        source = -1
        if re.search(ROUTER_PATTERN, name) and router_source != "merge" and not copy:
            mode, source = "copy", (-1 if router_source == "base" else int(router_source))
        if experts and mode == "merge" and re.search(EXPERT_PATTERN, name) and len(shape) >= 3:
            per = R // shape[0]
            e.units = [Unit(name, f"{name}[{i}]", i * per, (i + 1) * per, shape[1:]) for i in range(shape[0])]
        else:
            e.units = [Unit(name, name, 0, R, shape, mode, source)]
        entries.append(e)
    for name in sorted(set().union(*(m.names for m in models)) - set(base.names)):
        if not any(name in (a, b) for a, b in tied.items()):
            mismatches.append(f"{next(m.path for m in models if name in m.where)}: extra tensor {name!r} (not in base)")
    if mismatches:
        raise ValueError("checkpoints do not match the base:\n  " + "\n  ".join(mismatches[:20]))
    return entries
