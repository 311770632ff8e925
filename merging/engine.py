"""The merge engine: global statistics passes, then each unit's tensor stages and its chunked merge straight into
the staged output, on worker threads within a memory budget; the per-tensor report."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from merging.heap import release_above
from merging.plan import Entry, Loader, NonFiniteError, Unit, all_finite, unit_chunks
from merging.registry import DEFERRED, Chunk, Method, Stage, apply_with_stats, gather_in_memory
from merging.select import SAMPLE
from moe_merge_common.io import ShardedWriter, row_shape

MEMORY_BUDGET = 1 << 30  # working memory of all merging threads together (see Engine.working_bytes)
WORK = 4  # a method's temporaries, in multiples of its fp32 input chunk


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
        for r0, r1 in unit_chunks(u, row_shape(e.shape)[1], self.m.chunkable(self.p, u.shape), self.chunk_elems):
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
            for r0, r1 in unit_chunks(u, row_shape(e.shape)[1], True, self.chunk_elems):
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
        allow = self.loader.allow_nonfinite
        if self.report:
            _account(report, c, merged, info, allow)
        out = merged.to(e.out_dtype)
        if not allow and not all_finite(out):
            _refuse_nonfinite(e, c, merged, out)
        write(out)

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


def _refuse_nonfinite(e: Entry, c: Chunk, merged: torch.Tensor, out: torch.Tensor):
    """The inputs were finite (the loader checks them), so the method's arithmetic or the cast overflowed."""
    if bool(torch.isfinite(merged).all()):
        top = float(merged.abs().max())
        raise NonFiniteError(
            f"{c.name}: merged values up to {top:.4g} overflow out_dtype={str(e.out_dtype).removeprefix('torch.')} "
            f"(largest finite {torch.finfo(e.out_dtype).max:.4g}); use out_dtype=float32 or lower method.params.lam"
        )
    raise NonFiniteError(
        f"{c.name}: the merge produced {int((~torch.isfinite(merged)).sum())} non-finite values from finite inputs "
        "(fp32 overflow: check method.params.lam / method.params.weights); allow_nonfinite=true writes them anyway"
    )


def _account(report: dict, c: Chunk, merged: torch.Tensor, info: dict | None = None, nonfinite=False) -> None:
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
    if nonfinite:  # allow_nonfinite: positions where the base or a task vector is NaN/inf, and such outputs
        add("nonfinite_inputs", (~torch.isfinite(c.base) | (~torch.isfinite(c.tau)).any(0)).sum())
        add("nonfinite_outputs", (~torch.isfinite(merged)).sum())


def finish_report(raw: dict) -> dict:
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
        if "nonfinite_inputs" in r:
            row["nonfinite_inputs"], row["nonfinite_outputs"] = int(r["nonfinite_inputs"]), int(r["nonfinite_outputs"])
        if "rank_kept" in r:
            row["rank_fraction"] = [a / b for a, b in zip(r["rank_kept"].tolist(), r["rank_full"].tolist())]
        out[key] = row
    return out


def merge_entries(engine: Engine, entries: list[Entry], writer: ShardedWriter, workers: int, advance) -> dict:
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
