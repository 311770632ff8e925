"""Stream a merge over tensor names: load one name from every checkpoint, merge in fp32, cast, collect, commit."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.progress import track

from merging.io import AtomicOutputDir, TensorReader
from merging.methods import METHODS, merge_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "ties",
    out_dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **params,
) -> Path:
    """Merge ``models`` against ``base`` with ``METHODS[method]`` and write ``out/model.safetensors``.

    Every checkpoint must hold the same tensor names and shapes. Floating-point tensors are merged in fp32 and
    written as ``out_dtype`` (default: the base tensor's dtype); other tensors (integer buffers) are copied from
    the base. Returns the path of the written weights.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    if not models:
        raise ValueError("models: expected at least one fine-tuned checkpoint")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ValueError(f"out_dtype={out_dtype!r}: expected one of {sorted(DTYPES)} or None")
    base_r = TensorReader(base)
    readers = [TensorReader(m) for m in models]
    writer = AtomicOutputDir(out, [base_r.path, *(r.path for r in readers)], overwrite=overwrite)
    names = set(base_r.names)
    for r in readers:
        if set(r.names) != names:
            missing, extra = sorted(names - set(r.names)), sorted(set(r.names) - names)
            raise ValueError(f"{r.path}: tensor names differ from the base: missing={missing[:5]} extra={extra[:5]}")

    iterator = sorted(names)
    if progress:
        iterator = track(iterator, description=f"merging ({method})", transient=True)
    for name in iterator:
        b = base_r.get(name)
        fts = [r.get(name) for r in readers]
        for r, f in zip(readers, fts):
            if f.shape != b.shape:
                raise ValueError(f"{r.path}: tensor {name!r} has shape {tuple(f.shape)}, base has {tuple(b.shape)}")
        if not b.is_floating_point():
            writer.add(name, b)
            continue
        merged = merge_tensors(method, b, fts, **params)
        writer.add(name, merged.to(DTYPES[out_dtype] if out_dtype else b.dtype))
    meta = {
        "merge_method": method,
        "merge_params": json.dumps(params),
        "merge_inputs": json.dumps([str(m) for m in models]),
    }
    return writer.commit(base_r.path.parent, meta)
