"""Assemble one MoE from N fine-tuned checkpoints of the same base: every model's experts become experts.

A dense fine-tune here is an ``MoETransformer`` with ``model.num_experts=1`` (its one expert is a plain SwiGLU
FFN; train it with ``python train.py model.num_experts=1 router.k=1``). For N such fine-tunes the output has N
experts per layer: expert t is fine-tune t's FFN, copied unchanged. Models with E_t > 1 experts contribute all of
them (the output has sum_t E_t experts). Every other weight (attention, embeddings, norms, head) is merged with
the chosen method, exactly as ``merging.merge`` does.

Router initialisation (``router_init``):

- "zero": all router weights 0, so every expert starts with the same score (top-k ties break by index until
  training separates them).
- "stats": let m_t be the mean input of that MoE layer (its ``norm_moe`` output, measured with the base model on
  the training data, through the adapter's ``task_means``) over the non-padding tokens of model t's fine-tuning
  tasks, M = [m_1 .. m_N].
  The router rows R are the minimum-norm solution of ``R m_s = scale * (e_s - 1/N)``, i.e.
  ``R = scale * (I - 1/N) pinv(M^T)``: on the mean token of task s, expert s scores ``scale * (1 - 1/N)`` and
  every other expert ``-scale / N`` (exact while the m_t are linearly independent). The router has no bias, so
  this is the linear map that separates the task means. A model with several experts adds its row to its own
  router rows.

The output is an export directory (``model.safetensors`` + ``config.json`` with ``num_experts = sum_t E_t`` and
``router.k``), so ``python train.py init_from=OUT`` trains the assembled model, router included.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from merging.engine import Engine
from merging.merge import MergeProgress
from merging.plan import DTYPES, EXPERT_PATTERN, ROUTER_PATTERN, Loader, plan
from merging.protocols import TaskAdapter
from merging.registry import METHODS
from moe_merge_common.io import Checkpoint, ShardedWriter, parse_size
from moe_merge_common.outputs import check_output, output_lock


def _without(ck: Checkpoint, pattern: re.Pattern) -> Checkpoint:
    view = copy.copy(ck)
    view.where = {n: f for n, f in ck.where.items() if not pattern.search(n)}
    view.names = sorted(view.where)
    return view


def _config(ck: Checkpoint) -> dict:
    if (ck.folder / "config.json").is_file():
        cfg = json.loads((ck.folder / "config.json").read_text())
    else:
        cfg = {"model": ck.hparams.get("model"), "router": ck.hparams.get("router", {})}
    if not cfg.get("model"):
        raise FileNotFoundError(f"{ck.path}: no config.json (export format) beside the weights")
    return cfg


def router_statistics(base: str | os.PathLike, tasks: Sequence[str], data, adapter: TaskAdapter) -> list[torch.Tensor]:
    """Per MoE layer, ``[N, d]``: the mean MoE input of the base over each model's tasks' tokens (``adapter``)."""
    return adapter.task_means(adapter.load(base), list(tasks), data)


def assemble(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    router_init: str = "zero",
    k: int = 2,
    tasks: Sequence[str] | None = None,
    scale: float = 1.0,
    data=None,
    adapter: TaskAdapter | None = None,
    out_dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_size: int | str = "5GB",
    allow_nonfinite: bool = False,
    **params,
) -> Path:
    """Build an MoE from ``models`` (see the module docstring); returns ``out/model.safetensors``. NaN/inf inputs
    are refused naming the tensor unless ``allow_nonfinite`` (as in ``merging.merge``)."""
    if router_init not in ("zero", "stats"):
        raise ValueError(f"router_init={router_init!r}: expected 'zero' or 'stats'")
    if router_init == "stats" and (tasks is None or len(tasks) != len(models)):
        raise ValueError("tasks: router_init=stats needs one task spec per model (e.g. [sort, copy+add])")
    if router_init == "stats" and adapter is None:
        raise ValueError("adapter: router_init=stats measures the base on task data through an adapter "
                         "(e.g. moe.adapters.moe_adapter.MoEAdapter())")  # fmt: skip
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"assemble.k={k!r}: expected an int >= 1 (experts per token)")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"assemble.scale={scale!r}: expected a finite value > 0")
    m = METHODS[method]
    p = m.resolve(params, len(models))
    base_ck = Checkpoint(base)
    model_cks = [Checkpoint(x, base=base_ck) for x in models]
    cfg = _config(base_ck)
    out = check_output(out, [p_ for ck in (base_ck, *model_cks) for p_ in ck.input_paths()], overwrite)
    moe_pat = re.compile(f"({EXPERT_PATTERN})|({ROUTER_PATTERN})")
    entries = plan(_without(base_ck, moe_pat), [_without(c, moe_pat) for c in model_cks], out_dtype, (), "method",
                   "crop", False, "merge", {})  # fmt: skip
    counts = []
    for c in model_cks:
        names = [n for n in c.names if re.search(EXPERT_PATTERN, n)]
        if not names:
            raise ValueError(f"{c.path}: no expert tensors (names matching {EXPERT_PATTERN!r})")
        counts.append(c.shape(names[0])[0])
    total = sum(counts)
    special, copied = [], set()
    for name in base_ck.names:
        if not moe_pat.search(name):
            continue
        shape = base_ck.shape(name)
        dtype = DTYPES[out_dtype] if out_dtype and base_ck.dtype(name).is_floating_point else base_ck.dtype(name)
        if not re.search(EXPERT_PATTERN, name) and (not shape or shape[0] != counts[0]):
            special.append((name, shape, dtype))  # not per expert (e.g. a router temperature): from the base
            copied.add(name)
            continue
        for c, e in zip(model_cks, counts):
            if name not in c.where or c.shape(name) != (e, *shape[1:]):
                raise ValueError(f"{c.path}: expert/router tensor {name!r} missing or not shaped ({e}, *{shape[1:]})")
        special.append((name, (total, *shape[1:]), dtype))
    stats = None
    if router_init == "stats":
        stats = router_statistics(base, list(tasks), data, adapter)

    order = sorted([*((e.name, e.shape, e.out_dtype) for e in entries), *special])
    by_name = {e.name: e for e in entries}
    cfg["model"]["num_experts"] = total
    cfg.setdefault("router", {})["k"] = min(k, total)
    meta = {"merge_method": f"assemble+{method}", "merge_params": json.dumps(p), "merge_inputs": json.dumps(
        [str(base), *map(str, models)])}  # fmt: skip
    created = not out.exists()
    try:
        with output_lock(out):
            writer = ShardedWriter(out, order, parse_size(shard_size), meta)
            try:
                loader = Loader(base_ck, model_cks, allow_nonfinite)
                engine = Engine(m, p, loader, entries, 1 << 22)
                report: dict = {}
                with MergeProgress(progress, len(order), f"assemble ({method})") as (advance, describe):
                    engine.gather_global(describe)
                    for name, shape, dtype in order:
                        if name in by_name:
                            for u in by_name[name].units:
                                engine.merge_unit(
                                    by_name[name], u, lambda data, n=name: writer.write(n, data), report,
                                    lambda index, values, n=name: writer.patch(n, index, values))  # fmt: skip
                        elif name in copied:
                            writer.write(name, base_ck.read(name).to(dtype))
                        elif re.search(ROUTER_PATTERN, name):
                            writer.write(name, _router(name, model_cks, counts, shape, stats, scale).to(dtype))
                        else:
                            for i, c in enumerate(model_cks):
                                t = c.read(name)
                                if t.is_floating_point():
                                    loader.check_finite(t, c, name, f"model {i}")
                                writer.write(name, t.to(dtype))
                        advance()
                writer.add_file("config.json", text=json.dumps(cfg, indent=2))
                return writer.commit()
            except BaseException:
                writer.abort()
                raise
    finally:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()


def _router(name, models, counts, shape, stats, scale) -> torch.Tensor:
    """The gate (``router.weight``) from ``router_init``; other per-expert router tensors (bias, noise) at 0."""
    if stats is None or not name.endswith(".router.weight"):
        return torch.zeros(shape)
    layer = int(re.search(r"blocks\.(\d+)\.", name).group(1))
    means = stats[layer].double()  # [N, d]
    n = means.shape[0]
    target = scale * (torch.eye(n, dtype=torch.float64) - 1.0 / n)
    rows = (target @ torch.linalg.pinv(means.T)).float()  # R M^T = target
    out = []
    for c, e, row in zip(models, counts, rows):
        own = c.read(name).float() if e > 1 else torch.zeros(e, shape[1])
        out.append(own + row)
    return torch.cat(out)
