"""The streaming merge: one tensor name across all models at a time, in row chunks, fp32 compute, sharded output.

Plan: every output tensor (the base's names) is split into *units*, the populations a method's statistics
are taken over: the whole tensor, or one expert of a batched ``[E, ...]`` expert tensor when ``experts=True``.
Each unit is then merged ("merge"), copied from the base or from one model ("copy"), or averaged ("mean").

Passes: stages of level "global" (e.g. TIES/PCB thresholds over the whole model) are gathered first, streaming
every unit; then each unit gathers its "tensor" stages and is merged chunk by chunk straight into the output
file. Peak memory is about one chunk of every model plus one tensor's worth of output bytes, whatever the size
of the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.heap import heap_policy, release_above
from merging.io import COPY_FROM_BASE, Checkpoint, ShardedWriter, parse_size, row_shape
from merging.registry import DEFERRED, METHODS, Chunk, Method, Stage, apply_with_stats, gather_in_memory
from merging.select import SAMPLE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCAB_PATTERN = r"(embed|lm_head|wte|shared|word_embeddings|(^|\.)head\.)"
EXPERT_PATTERN = r"(\.experts\.|\.moe\.w_(gate|up|down)$)"  # batched [E, ...] expert weights
ROUTER_PATTERN = r"\.router\."  # router weights and buffers (gate, expert_bias, ...)
TIED = {"lm_head.weight": "model.embed_tokens.weight", "head.weight": "embed.weight"}
CHUNK_ELEMS = 1 << 18  # rows per chunk = CHUNK_ELEMS // row length; N x 1 MiB fp32 working tensors (cache-sized)
HOLD_BYTES = 256 << 20  # a unit read whole (fp32 base + N task vectors) for multi-pass methods: at most this
MEMORY_BUDGET = 1 << 30  # working memory of all merging threads together (see Engine.working_bytes)
WORK = 4  # a method's temporaries, in multiples of its fp32 input chunk
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


class Loader:
    """Reads rows of one output tensor from the base and every model, in fp32, as a ``Chunk``.

    ``hold(e, unit)`` reads a whole unit once and serves its rows from memory until ``release()``: methods that
    pass over a tensor several times (thresholds, votes) then read and convert it once."""

    def __init__(self, base: Checkpoint, models: list[Checkpoint]):
        self.base, self.models = base, models
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
        tau = torch.empty(len(self.models), *b.shape)
        for i, (m, src, have) in enumerate(zip(self.models, e.sources, e.rows)):
            if have >= r1:
                tau[i].copy_(m.read(src, (r0, r1)))
            else:  # rows this model lacks (a smaller vocabulary): no task vector there
                n = max(0, have - r0)
                if n:
                    tau[i, :n].copy_(m.read(src, (r0, have)))
                tau[i, n:].copy_(b[n:])
        tau.sub_(b)
        return Chunk(name=unit.key, base=b, tau=tau, shape=unit.shape, row0=r0 - unit.r0)

    def raw(self, e: Entry, unit: Unit, r0: int, r1: int) -> torch.Tensor:
        src = self.base if unit.source < 0 else self.models[unit.source]
        name = e.name if unit.source < 0 else e.sources[unit.source]
        return src.read(name, (r0, r1))


def _chunks(unit: Unit, cols: int, chunked: bool, chunk_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_elems // max(cols, 1)) if chunked else unit.r1 - unit.r0
    for r in range(unit.r0, unit.r1, step):
        yield r, min(unit.r1, r + step)


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
    excl = [re.compile(x) for x in exclude]
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
            e.sources.append(src)
            e.rows.append(min(row_shape(ms)[0], row_shape(shape)[0]))
        if mismatches:
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


class Engine:
    """Runs one method over the planned units: global stages first (``gather_global``), then per unit its tensor
    stages and the merge (``merge_unit``). Single-chunk units are read once for all of it."""

    def __init__(self, m: Method, p: dict, loader: Loader, entries: list[Entry], chunk_elems: int, report=True,
                 hold_bytes: int = 0):  # fmt: skip
        self.m, self.p, self.loader, self.entries, self.chunk_elems = m, p, loader, entries, chunk_elems
        self.hold_bytes = hold_bytes
        self.report = report
        self.stages = m.stages(p)
        self.tensor_stats: dict[str, dict] = {}
        self.global_stats: dict = {}
        self.n = len(loader.models)

    def units(self) -> Iterator[tuple[Entry, Unit]]:
        for e in self.entries:
            for u in e.units:
                if u.mode == "merge":
                    yield e, u

    def _unit_chunks(self, e: Entry, u: Unit, random: bool) -> Iterator[Chunk]:
        gens = self.m.generators(self.p, u.key, self.n) if random else None
        for r0, r1 in _chunks(u, row_shape(e.shape)[1], self.m.chunkable(self.p, u.shape), self.chunk_elems):
            c = self.loader.rows(e, u, r0, r1)
            c.gens = gens
            yield c

    def stats_for(self, e: Entry, u: Unit, upto: int, skip=()) -> dict:
        """Global stats so far plus this unit's tensor-level stats of stages ``[0, upto)`` (but ``skip``)."""
        own = self.tensor_stats.setdefault(u.key, {})
        stats = {**self.global_stats, **own}
        for stage in self.stages[:upto]:
            if stage.level == "global" or stage.key in stats or stage.key in skip:
                continue
            own[stage.key] = stats[stage.key] = self._gather(stage, [(e, u)], stats)
        return stats

    def _gather(self, stage: Stage, units, stats: dict | None) -> torch.Tensor:
        if len(units) == 1 and self._single(*units[0]):
            e, u = units[0]
            chunk = next(self._unit_chunks(e, u, False))
            s = stats if stats is not None else self.stats_for(e, u, self.stages.index(stage))
            return gather_in_memory(stage, chunk, s, lambda: self.m.generators(self.p, u.key, self.n))
        size = sum((u.r1 - u.r0) * row_shape(e.shape)[1] for e, u in units)
        acc = stage.accumulator(size)
        idx = self.stages.index(stage)
        p = 0
        while p < acc.passes:
            for e, u in units:
                s = stats if stats is not None else self.stats_for(e, u, idx)
                if acc.sampling and not stage.random:  # a few evenly spaced rows of every unit
                    cols = row_shape(e.shape)[1]
                    rows = u.r1 - u.r0
                    want = min(rows, math.ceil(SAMPLE * rows / size))  # ~ SAMPLE * (its share of the population)
                    for j in range(want):
                        r = u.r0 + (j * rows) // want
                        acc.update(self.loader.rows(e, u, r, r + 1), s, thin=cols > SAMPLE)
                    continue
                for chunk in self._unit_chunks(e, u, stage.random):
                    acc.update(chunk, s)
            acc.end_pass()
            p += 1
        return acc.result()

    def gather_global(self, progress) -> None:
        for stage in self.stages:
            if stage.level != "global":
                continue
            units = list(self.units())
            if progress:
                progress(f"global statistics: {stage.key}")
            self.global_stats[stage.key] = self._gather(stage, units, None) if units else torch.zeros(self.n, 1)

    def merge_unit(self, e: Entry, u: Unit, write, report: dict, patch) -> None:
        """Merge one unit: ``write(data)`` appends its output, ``patch(flat_index, values)`` rewrites entries of it
        (the deferred tie-break), ``report`` gathers its statistics."""
        if u.mode != "merge":
            for r0, r1 in _chunks(u, row_shape(e.shape)[1], True, self.chunk_elems):
                if u.mode == "copy":
                    data = self.loader.raw(e, u, r0, r1)
                    write(data.to(e.out_dtype))
                else:
                    c = self.loader.rows(e, u, r0, r1)
                    self._emit(report, c, c.base + c.tau.mean(0), None, write, e)
            return
        if self._single(e, u):  # one read serves every stage and the merge
            c = next(self._unit_chunks(e, u, False))
            merged, info = apply_with_stats(self.m, self.p, c, self.global_stats)
            self._emit(report, c, merged, info, write, e)
            return
        deferred = self._deferred()
        if self._holds(e, u):
            self.loader.hold(e, u)  # several passes over this unit: read and convert it once
        try:
            stats = self.stats_for(e, u, len(self.stages), skip=deferred)
            if deferred:
                stats[DEFERRED] = True
            total, fixes = 0.0, []
            for c in self._unit_chunks(e, u, self.m.random(self.p)):
                merged, info = self.m.apply(c, stats, self.p)
                if DEFERRED in info:
                    part, flip, alt = info.pop(DEFERRED)
                    total += float(part)
                    if flip.numel():
                        fixes.append((flip, alt, merged.flatten()[flip], c.base.flatten()[flip], c.row0))
                self._emit(report, c, merged, info, write, e)
        finally:
            self.loader.release(u)
            self.tensor_stats.pop(u.key, None)  # per-entry stats (DELLA's tensor-scope ranks) are N x the tensor
        if fixes and total < 0:  # the deferred tie-break sign is -1: rewrite the entries it decides
            self._fix(e, u, fixes, patch, report)

    def _fix(self, e: Entry, u: Unit, fixes: list, patch, report: dict) -> None:
        C = row_shape(e.shape)[1]
        for flip, alt, _, _, row0 in fixes:  # one chunk's span at a time
            patch((u.r0 + row0) * C + flip, alt.to(e.out_dtype))
        alt, cur, base = (torch.cat([f[i] for f in fixes]) for i in (1, 2, 3))
        if self.report:
            r = report[u.key]
            r["sq_merged"] = r["sq_merged"] + (alt.double().square() - cur.double().square()).sum()
            r["sq_delta"] = r["sq_delta"] + ((alt - base).double().square() - (cur - base).double().square()).sum()

    def _emit(self, report, c, merged, info, write, e) -> None:
        if self.report:
            _account(report, c, merged, info)
        write(merged.to(e.out_dtype))

    def _deferred(self) -> set[str]:
        return {s.key for s in self.stages if s.deferrable and s.level == "tensor"}

    def _holds(self, e: Entry, u: Unit) -> bool:
        passes = any(s.level == "tensor" and s.key not in self._deferred() for s in self.stages)
        return passes and (self.n + 1) * (u.r1 - u.r0) * row_shape(e.shape)[1] * 4 <= self.hold_bytes

    def working_bytes(self, e: Entry) -> int:
        """About the memory merging ``e`` takes: fp32 base + task vectors of a chunk, a held unit or a whole
        tensor, times ``WORK`` for the method's temporaries."""
        C, most = row_shape(e.shape)[1], 0
        for u in e.units:
            elems = (u.r1 - u.r0) * C
            if u.mode == "merge" and self._single(e, u):
                cost = WORK * (self.n + 1) * elems * 4
            else:
                cost = WORK * (self.n + 1) * min(elems, self.chunk_elems) * 4
                if u.mode == "merge" and self._holds(e, u):
                    cost += (self.n + 1) * elems * 4
            if u.mode == "merge" and any(s.kind == "gather" for s in self.stages):  # [N, elems] fp32, int64 keys
                cost += (self.n * 4 + 8) * elems
            most = max(most, cost)
        return most

    def _single(self, e: Entry, u: Unit) -> bool:
        return not self.m.chunkable(self.p, u.shape) or (u.r1 - u.r0) * row_shape(e.shape)[1] <= self.chunk_elems


def _account(report: dict, c: Chunk, merged: torch.Tensor, info: dict | None = None) -> None:
    r = report.setdefault(c.name, {})

    def add(key, value):
        v = value.double() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        r[key] = r[key] + v if key in r else v

    norm = torch.linalg.vector_norm
    add("numel", c.base.numel())
    add("sq_base", norm(c.base).double() ** 2)
    add("sq_merged", norm(merged).double() ** 2)
    add("sq_delta", norm(merged - c.base).double() ** 2)
    add("sq_tau", norm(c.tau.flatten(1), dim=1).double() ** 2)
    for k, v in (info or {}).items():
        add(k, v)


def _finish_report(raw: dict) -> dict:
    out = {}
    for key, r in raw.items():
        numel = float(r["numel"])
        row = {
            "numel": int(numel),
            "norm_base": math.sqrt(r["sq_base"]),
            "norm_merged": math.sqrt(r["sq_merged"]),
            "norm_delta": math.sqrt(r["sq_delta"]),
            "norm_tau": [math.sqrt(x) for x in r["sq_tau"].tolist()],
        }
        if "kept" in r:
            row["kept_fraction"] = [k / numel for k in r["kept"].tolist()]
        if "active" in r:
            row["sign_conflict_rate"] = float(r["conflict"]) / max(float(r["active"]), 1.0)
        if "rank_kept" in r:
            row["rank_fraction"] = [a / b for a, b in zip(r["rank_kept"].tolist(), r["rank_full"].tolist())]
        out[key] = row
    return out


def merge(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "ties",
    out_dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    exclude: Sequence[str] = (),
    vectors: str = "method",
    vocab: str = "crop",
    tied: dict[str, str] | None = None,
    experts: bool = True,
    router_source: str = "merge",
    shard_size: int | str = "5GB",
    chunk_elems: int = CHUNK_ELEMS,
    hold_bytes: int = HOLD_BYTES,
    workers: int | None = None,
    report: bool = True,
    **params,
) -> Path:
    """Merge ``models`` into ``base`` with ``METHODS[method]`` and write the result to ``out``.

    Returns the path of ``out/model.safetensors`` (one shard) or ``out/model.safetensors.index.json``.

    - base, models: safetensors files, HF-style or export directories, Lightning ``.ckpt`` files.
    - out_dtype: "float32" | "bfloat16" | "float16"; None keeps each base tensor's dtype. Compute is fp32.
    - exclude: regexes; matching tensors are copied from the base. Integer tensors are always copied.
    - vectors: 1-D tensors (norms, biases) "method" (merged like the rest), "mean" (base + mean task vector), or
      "base" (copied).
    - vocab: a 2-D embedding / LM-head tensor whose row count differs: "crop" (rows beyond the base are dropped;
      rows a model lacks count as unchanged from the base) or "base" (copy the base tensor).
    - tied: ``{name: alias}``; a model lacking ``name`` contributes its ``alias`` (and vice versa). Defaults cover
      ``lm_head.weight`` / ``model.embed_tokens.weight`` and ``head.weight`` / ``embed.weight``. The output holds
      exactly the base's names, so a base with tied (omitted) weights keeps them tied.
    - experts: merge every expert of batched ``*.experts.*`` tensors ``[E, ...]`` as its own tensor (thresholds,
      random streams and report per expert).
    - router_source: ``*.router.*`` tensors: "merge" (with the method), "base", or a model index "0".."N-1" to keep.
    - shard_size: the largest output shard in bytes ("5GB", "500MB", ...).
    - chunk_elems: entries per model in one streamed chunk (whole rows; small enough to stay in cache).
    - hold_bytes: methods that pass over a tensor more than once (thresholds, votes) read a tensor whose fp32
      base and task vectors fit in this many bytes once and keep it in memory; larger ones are re-read per pass.
    - workers: tensors merged at once, each on its own thread with single-threaded torch ops (default: torch's
      thread count). The output is identical for any number: every tensor is merged the same way on its own.
    - params: the method's parameters (see ``merging.METHODS[method].params``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    if not models:
        raise ValueError("models: expected at least one fine-tuned checkpoint")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ValueError(f"out_dtype={out_dtype!r}: expected one of {sorted(DTYPES)} or None")
    for key, value, choices in (("vectors", vectors, ("method", "mean", "base")), ("vocab", vocab, ("crop", "base"))):
        if value not in choices:
            raise ValueError(f"{key}={value!r}: expected one of {list(choices)}")
    router_source = str(router_source)
    if router_source not in ("merge", "base") and not (router_source.isdigit() and int(router_source) < len(models)):
        raise ValueError(
            f"router_source={router_source!r}: expected 'merge', 'base' or a model index 0..{len(models) - 1}"
        )
    m = METHODS[method]
    p = m.resolve(params, len(models))
    base_ck = Checkpoint(base)
    model_cks = [Checkpoint(x, base=base_ck) for x in models]  # a LoRA adapter directory reads against the base
    out = Path(out).resolve()
    inputs = set(base_ck.input_paths())
    for ck in model_cks:
        inputs |= set(ck.input_paths())
    if out in inputs or any(out == p_.parent for p_ in inputs):
        raise ValueError(f"out={out}: refuses to overwrite an input checkpoint")
    if ((out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()) and not overwrite:
        raise FileExistsError(f"out={out}: merged weights exist; pass overwrite=true to replace them")
    entries = plan(
        base_ck, model_cks, out_dtype, exclude, vectors, vocab, experts, router_source, {**TIED, **(tied or {})}
    )

    meta = {
        "merge_method": method,
        "merge_params": json.dumps(p),
        "merge_inputs": json.dumps([str(base), *(str(x) for x in models)]),
    }
    created = not out.exists()
    writer = ShardedWriter(out, [(e.name, e.shape, e.out_dtype) for e in entries], parse_size(shard_size), meta)
    try:
        engine = Engine(m, p, Loader(base_ck, model_cks), entries, chunk_elems, report, hold_bytes)
        with heap_policy(), _progress(progress, len(entries), method) as (advance, describe):
            engine.gather_global(describe)
            describe(f"merging ({method})")
            raw_report = _merge_entries(engine, entries, writer, workers or torch.get_num_threads(), advance)
        _stage_side_files(writer, base_ck)
        if report:
            doc = {"method": method, "params": p, "base": str(base), "models": [str(x) for x in models],
                   "tensors": _finish_report(raw_report)}  # fmt: skip
            writer.add_file(REPORT_NAME, text=json.dumps(doc, indent=1))
        return writer.commit()
    except BaseException:
        writer.abort()
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise


def _merge_entries(engine: Engine, entries: list[Entry], writer: ShardedWriter, workers: int, advance) -> dict:
    """Merge every entry into ``writer``; returns the raw report. With ``workers`` > 1, entries are merged on that
    many threads, each running single-threaded torch ops (one op on 2 threads gains far less than 2 tensors at
    once); entries finish in any order, their bytes go to fixed places in the output."""

    def one(e: Entry) -> dict:
        report: dict = {}
        for u in e.units:
            engine.merge_unit(e, u, lambda data: writer.write(e.name, data), report,
                              lambda index, values: writer.patch(e.name, index, values))  # fmt: skip
        return report

    raw: dict = {}
    if workers <= 1:
        for e in entries:
            raw.update(one(e))
            release_above(1 << 30)  # keeps the merge's own peak well under 1.5 GB
            advance()
        return raw
    budget, threads = _Budget(MEMORY_BUDGET), torch.get_num_threads()

    def within_budget(e: Entry) -> dict:
        need = engine.working_bytes(e)
        with budget.take(need):
            if need > budget.total // 4:  # a large tensor: first hand back the free memory the heap keeps
                release_above(0)
            if need < budget.total:
                return one(e)
            torch.set_num_threads(threads)  # it runs alone: its ops may use every thread
            try:
                return one(e)
            finally:
                torch.set_num_threads(1)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="merging", initializer=torch.set_num_threads, initargs=(1,))
    try:
        for done in [pool.submit(within_budget, e) for e in entries]:  # only the running ones hold tensors
            raw.update(done.result())
            release_above(1 << 30)
            advance()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return raw


class _Budget:
    """Bytes of working memory the merging threads may hold at once. A thread waits until its entry's share is
    free; an entry larger than the whole budget waits until it can run alone."""

    def __init__(self, total: int):
        self.total = self.free = total
        self.cv = threading.Condition()

    @contextmanager
    def take(self, nbytes: int) -> Iterator[None]:
        n = min(nbytes, self.total)
        with self.cv:
            self.cv.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self.cv:
                self.free += n
                self.cv.notify_all()


def _stage_side_files(writer: ShardedWriter, base: Checkpoint) -> None:
    """config.json and tokenizer files from the base's folder; for a Lightning base, an export-style config."""
    for name in COPY_FROM_BASE:
        src = base.folder / name
        if src.is_file() and (base.path.is_dir() or base.path.suffix == ".safetensors"):
            writer.add_file(name, src=src)
    if base.hparams.get("model") and not (writer.stage / "config.json").exists():
        cfg = {"model": base.hparams["model"], "router": base.hparams.get("router", {})}
        writer.add_file("config.json", text=json.dumps(cfg, indent=2))


class _progress:
    """A rich progress bar over tensors (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, method: str):
        self.enabled, self.total, self.method = enabled, total, method

    def __enter__(self):
        if not self.enabled:
            return (lambda: None), (lambda text: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)  # fmt: skip
        self.bar.__enter__()
        task = self.bar.add_task(f"merging ({self.method})", total=self.total)
        return (lambda: self.bar.advance(task)), (lambda text: self.bar.update(task, description=text))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
