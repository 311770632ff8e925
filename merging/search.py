"""Per-task lambda search for PCB (the paper's optional step), on a validation split only.

PCB with per-task lambdas is ``theta_0 + lam * sum_i lambda_i c_i`` with ``c_i = beta^_i tau~_i / sum_j beta^_j``:
linear in the lambdas, so the N contributions are computed once (``weights`` one-hot) and every candidate costs
one evaluation. The search is coordinate ascent over ``grid`` for each task in turn, ``rounds`` times, maximizing
the mean normalized accuracy (merged / the task's own fine-tune) on a *search* split: the embedded data drawn
with another seed, with every row of the reported validation split removed. The official PCB code (NLP) tunes on
the test split; this never sees it. The adapter (``merging.protocols.TaskAdapter``) reads and scores the models.

The model is small enough to merge in memory: the whole model is one flattened tensor, so PCB's default global
scope is exact here.

``sweep_objective`` is what a ``python -m merging -m hydra/sweeper=merge_optuna ...`` job returns: the mean
``gain_share`` of the merge on the adapter's "search" split (conf/hydra/sweeper/merge_optuna.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from merging.protocols import TaskAdapter
from merging.registry import merge_tensors

GRID = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6)


def search_lambdas(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    tasks: Sequence[str],
    data,
    adapter: TaskAdapter,
    method: str = "pcb",
    grid: Sequence[float] = GRID,
    rounds: int = 2,
    **params,
) -> tuple[list[float], float]:
    """(per-task lambdas, mean normalized accuracy on the search split) for ``method`` (linear in ``weights``)."""
    if len(tasks) != len(models):
        raise ValueError(f"tasks: expected {len(models)} entries (one per model), got {len(tasks)}")
    model = adapter.load(base)
    names = list(model.state_dict())
    shapes = [model.state_dict()[n].shape for n in names]

    def flat(path):
        state = adapter.load(path).state_dict()
        return torch.cat([state[n].float().reshape(-1) for n in names])

    b, fts = flat(base), [flat(m) for m in models]
    n = len(models)
    lam = params.pop("lam", 1.0)
    contrib = [merge_tensors(method, b, fts, weights=[float(i == j) for j in range(n)], lam=1.0, **params) - b
               for i in range(n)]  # fmt: skip
    own = {t: adapter.evaluate(adapter.load(m), data, "search") for t, m in zip(tasks, models)}

    def score(lams):
        vec = b + lam * sum(w * c for w, c in zip(lams, contrib))
        state = dict(zip(names, (v.reshape(s) for v, s in zip(vec.split([s.numel() for s in shapes]), shapes))))
        model.load_state_dict(state)
        acc = adapter.evaluate(model, data, "search")
        return sum(acc[t] / max(own[t][t], 1e-9) for spec in tasks for t in spec.split("+")) / len(tasks)

    lams = [1.0] * n
    best = score(lams)
    for _ in range(rounds):
        for i in range(n):
            for g in grid:
                trial = [*lams[:i], g, *lams[i + 1 :]]
                s = score(trial)
                if s > best:
                    best, lams = s, trial
    return lams, best


def gain_share(merged: Mapping[str, float], base: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """Per task: (merged - base) / (own - base), the share of its fine-tune's gain over the base that the merge keeps
    (1: the fine-tune's score, 0: the base's). The same for accuracies and for losses (the sign cancels); a task
    whose fine-tune scores exactly the base has none."""
    return {t: (merged[t] - base[t]) / (own[t] - base[t]) for t in own if own[t] != base[t]}


# A sweep's jobs run in one process (Hydra's basic launcher): they share the adapter (its data) and the inputs' scores,
# the latter keyed by the files' identity (path, size, mtime), so an input rewritten between runs is scored again
_ADAPTERS: dict[str, TaskAdapter] = {}
_SCORES: dict[tuple, dict[str, float]] = {}


def _identity(path: str | os.PathLike) -> tuple:
    """``(path, (relative name, size, mtime_ns) per file)`` of a checkpoint file or export directory."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        st = os.stat(path)
        return path, (("", st.st_size, st.st_mtime_ns),)
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
    return path, tuple(sorted(files))


def sweep_objective(config, make_adapter: Callable[[], TaskAdapter]) -> float | None:
    """What ``python -m merging -m hydra/sweeper=...`` jobs return: the mean gain share of the merged model
    (``config.out``) over ``config.tasks`` on the adapter's "search" split, never the reported one. None outside a
    multirun or without ``tasks`` (one per model), so a single merge evaluates nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if config.tasks is None or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if config.base is None or len(config.tasks) != len(config.models):
        raise ValueError(f"tasks: a sweep needs base=PATH and one task per model ({len(config.models)})")
    if repr(config.adapter) not in _ADAPTERS:
        _ADAPTERS[repr(config.adapter)] = make_adapter()
    adapter = _ADAPTERS[repr(config.adapter)]

    def scores(path, cache=True):
        key = (_identity(path), repr(config.data))
        if not cache or key not in _SCORES:
            _SCORES[key] = adapter.evaluate(adapter.load(str(path)), config.data, "search")
        return _SCORES[key]

    base, merged = scores(config.base), scores(config.out, cache=False)
    own = {t: scores(m)[t] for m, spec in zip(config.models, config.tasks) for t in spec.split("+")}
    shares = gain_share(merged, base, own)
    if not shares:
        raise ValueError(f"tasks={config.tasks}: no fine-tune scores differently from the base on the search split")
    return sum(shares.values()) / len(shares)
