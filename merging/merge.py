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

import errno
import json
import math
import os
import signal
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from merging.engine import Engine, finish_report, merge_entries
from merging.heap import heap_policy
from merging.plan import CHUNK_ELEMS, DTYPES, HOLD_BYTES, REPORT_NAME, TIED, Loader, plan
from merging.registry import METHODS
from moe_merge_common.io import COPY_FROM_BASE, Checkpoint, ShardedWriter, link_roots, parse_size
from moe_merge_common.outputs import check_output, output_lock

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


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
    allow_nonfinite: bool = False,
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
    - allow_nonfinite: merge NaN/inf inputs (and write non-finite results) instead of refusing them; the report
      counts them per tensor. By default an input tensor holding NaN/inf, or a result that overflows fp32 or the
      fp16/bf16 ``out_dtype``, is an error naming the tensor and the model, and nothing is written.
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
    shard_bytes = parse_size(shard_size)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r}: expected an int >= 1 (or None: torch's thread count)")
    m = METHODS[method]
    p = m.resolve(params, len(models))
    base_ck = Checkpoint(base)
    model_cks = [Checkpoint(x, base=base_ck) for x in models]  # a LoRA adapter directory reads against the base
    out = check_output(out, [p_ for ck in (base_ck, *model_cks) for p_ in ck.input_paths()], overwrite)
    entries = plan(
        base_ck, model_cks, out_dtype, exclude, vectors, vocab, experts, router_source, {**TIED, **(tied or {})}
    )

    meta = {
        "merge_method": method,
        "merge_params": json.dumps(p),
        "merge_inputs": json.dumps([str(base), *(str(x) for x in models)]),
    }
    created = not out.exists()
    try:
        with output_lock(out), _sigterm_as_exit():
            writer = ShardedWriter(out, [(e.name, e.shape, e.out_dtype) for e in entries], shard_bytes, meta)
            engine = Engine(m, p, Loader(base_ck, model_cks, allow_nonfinite), entries, chunk_elems, report, hold_bytes)
            with heap_policy(), MergeProgress(progress, len(entries), method) as (advance, describe):
                engine.gather_global(describe)
                describe(f"merging ({method})")
                raw_report = merge_entries(engine, entries, writer, workers or torch.get_num_threads(), advance)
            _stage_side_files(writer, base_ck)
            if report:
                doc = {"method": method, "params": p, "base": str(base), "models": [str(x) for x in models],
                       "tensors": finish_report(raw_report)}  # fmt: skip
                if allow_nonfinite:
                    doc["nonfinite"] = {k: sum(t.get(k, 0) for t in doc["tensors"].values())
                                        for k in ("nonfinite_inputs", "nonfinite_outputs")}  # fmt: skip
                writer.add_file(REPORT_NAME, text=json.dumps(json_safe(doc), indent=1, allow_nan=False))
            return writer.commit()
    except BaseException as e:
        if "writer" in locals():
            writer.abort()
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise OSError(e.errno, f"out={out}: {e.strerror} while writing the merge; what was staged is removed "
                          "and the directory is as it was") from e  # fmt: skip
        raise



def json_safe(obj):
    """``obj`` with every NaN/inf float replaced by None: JSON has no NaN, so the report stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


@contextmanager
def _sigterm_as_exit():
    """SIGTERM (a scheduler's stop, ``kill``) cleans up like Ctrl-C: it raises SystemExit in the main thread, so the
    staged output is removed. Other threads cannot install handlers: there it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage_side_files(writer: ShardedWriter, base: Checkpoint) -> None:
    """config.json and tokenizer files from the base's folder; for a Lightning base, an export-style config."""
    roots = link_roots(base.folder)  # the base's folder, and a hub cache snapshot's blobs/
    for name in COPY_FROM_BASE:
        src = base.folder / name
        if not (src.exists() or src.is_symlink()) or not (base.path.is_dir() or base.path.suffix == ".safetensors"):
            continue
        real = src.resolve()
        if not any(real.is_relative_to(r) and real != r for r in roots) or not real.is_file():  # a link out, a FIFO
            raise ValueError(f"{src}: a side file of the base must be a regular file inside {base.folder} (it "
                             f"leads to {real}); remove it or replace it with the file itself")  # fmt: skip
        writer.add_file(name, src=src)
    if base.hparams.get("model") and not (writer.stage / "config.json").exists():
        cfg = {"model": base.hparams["model"], "router": base.hparams.get("router", {})}
        writer.add_file("config.json", text=json.dumps(cfg, indent=2))


class MergeProgress:
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
