"""PLeaS: Permutations and Least Squares (Nasery et al., CVPR 2025, https://arxiv.org/abs/2407.02447).

Merges two models of one architecture that need not share a base (e.g. trained from different seeds), into a model
of a chosen width, from unlabeled data. Model-agnostic: the model comes through a ``merging.protocols.PleasAdapter``
(``moe.adapters.moe_adapter.MoEAdapter`` for this library's MoE transformer). Steps (paper / official code):

1. Canonical form of both models (``adapter.canonical``) and their permutation spec: groups of units that permute
   together, how each tensor's axes carry them, the linear maps to refit.
2. Per group, cost ``C[i, j] = -sum over batches and points ||a_i - b_j||_2`` between unit i of A and unit j of B,
   each unit's activations flattened over the rows; a nested group (an expert's hidden units) compares the
   units of parent units already matched.
3. Matching: a maximising linear assignment of C (SciPy's ``linear_sum_assignment``, the Hungarian method).
4. Partial merge: of ``d`` matched pairs the ``round(r d)`` with the lowest cost stay unmerged (``r`` = the group's
   ratio, the code's "quantile of the matched costs"), both units kept; the group's width becomes ``d + round(r d)``:
   r = 0 is a full permutation merge (Git Re-Basin-style), r = 1 keeps every unit of both (an ensemble's width).
   Units are laid out ``[merged | A-only | B-only]``.
5. The wide model: merged -> merged weights ``(W_A + W_B) / 2``; separate -> separate the originals; merged input ->
   separate output the original; separate input -> merged output ``W / 2``; A-only <-> B-only 0. Activations are
   "stacked" the same way: ``[(a + b) / 2 | a_sep | b_sep]``, ungrouped axes averaged.
6. Least squares, per layer: ``W = argmin ||X W - Y||^2 + lam ||W - W_5||^2`` with X the stacked inputs and Y the
   stacked pre-activation outputs of the two original models (teacher-forced, so layers decouple), A-only <-> B-only
   blocks held at 0, rows weighted when the spec says so (an expert's routing weights). Solved in closed form (fp64
   normal equations per block of outputs). The official code instead runs 400 Adam steps from the step-5 weights
   W_5; the ridge ``lam = ridge * mean diag(X^T X)`` towards W_5 plays the part of that start (and of stopping
   early): it changes nothing where the fit is exact, and ridge 1e-2 generalised best in BENCHMARKS.md's demo.

Limits: two models at a time; tensors the spec does not refit keep the step-5 rule; nothing like BatchNorm
statistics is reset (an adapter whose model has them must fold or recompute them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from merging.protocols import Group, PleasAdapter, Spec, UnlabeledData


@dataclass
class Match:
    """One group's matching. perm ``[d]`` (nested: ``[P, d]``): B's unit matched to A's unit i; merged: bool, the
    pair is merged; a_index / b_index ``[W]`` (``[P, W]``): the unit of A / B at each position of the merged layout
    ``[merged | A-only | B-only]`` (-1: none)."""

    perm: torch.Tensor
    merged: torch.Tensor
    a_index: torch.Tensor
    b_index: torch.Tensor

    @property
    def width(self) -> int:
        return self.a_index.shape[-1]


@dataclass
class PleasResult:
    model: nn.Module
    matches: dict[str, Match]
    spec: Spec


def pleas(
    model_a, model_b, data: UnlabeledData, adapter: PleasAdapter, *, ratio: float | Mapping[str, float] = 0.5,
    least_squares: bool = True, ridge: float = 1e-2, max_batches: int | None = 100,
) -> PleasResult:  # fmt: skip
    """Merge ``model_a`` and ``model_b`` (paths or modules, read by ``adapter.load``) with PLeaS.

    - data: unlabeled input batches ``[B, S]`` (both models' kind of data), read in 1 + nesting depth passes, plus
      one for the least squares; at most ``max_batches`` per pass (the code's ``num_batches=100``).
    - ratio: per group the fraction of matched pairs kept unmerged (merged width ``d (1 + r)``); a float applies
      to every group that may widen, a mapping names groups (the rest 0).
    - least_squares: refit the spec's layers (step 6); False stops at the permuted, partially merged model.
    - ridge: relative ridge of the least-squares fits, towards the step-5 weights (0: plain least squares).

    Returns the merged model (``adapter.build`` of the merged state), each group's ``Match`` and the spec.
    """
    if ridge < 0:
        raise ValueError(f"ridge={ridge}: expected >= 0")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches}: expected >= 1 or None")
    a = adapter.canonical(adapter.load(model_a))
    b = adapter.canonical(adapter.load(model_b))
    spec, spec_b = adapter.spec(a), adapter.spec(b)
    if [(g.name, g.size) for g in spec.groups] != [(g.name, g.size) for g in spec_b.groups]:
        raise ValueError("model_b: its units differ from model_a's (PLeaS merges two models of one architecture)")
    groups = {g.name: g for g in spec.groups}
    _check_spec(spec, a.state_dict())
    ratios = _ratios(ratio, spec.groups)

    matches: dict[str, Match] = {}
    for level in _levels(spec.groups):
        points = sorted({p for g in level for p in g.points})
        cost: dict[str, torch.Tensor] = {}
        for acts_a, acts_b in _passes(adapter, a, b, data, points, max_batches):
            for g in level:
                for p in g.points:
                    c = _cost(acts_a[p], acts_b[p], spec.points[p], g, matches)
                    cost[g.name] = c if g.name not in cost else cost[g.name] + c
        for g in level:
            matches[g.name] = match_units(cost[g.name], round(ratios[g.name] * g.size))

    state_a, state_b = a.state_dict(), b.state_dict()
    state = {}
    for name, lay in spec.layouts.items():
        ta, ma = _gather(state_a[name].reshape(lay.view), lay.axes, matches, groups, "a")
        tb, mb = _gather(state_b[name].reshape(lay.view), lay.axes, matches, groups, "b")
        wide = _combine(ta, tb, ma, mb, set(lay.out))
        state[name] = wide.reshape(_stored_shape(state_a[name].shape, lay.view, wide.shape))
    if least_squares and spec.layers:
        _refit(adapter, a, b, data, spec, matches, groups, state, ridge, max_batches)
    return PleasResult(adapter.build(state), matches, spec)


def match_units(cost: torch.Tensor, n_separate: int) -> Match:
    """Steps 3-4 on a cost ``[d, d]`` (or ``[P, d, d]``, one matching per parent unit): the assignment maximising
    the summed cost, then the ``n_separate`` matched pairs of lowest cost left unmerged."""
    from scipy.optimize import linear_sum_assignment

    if cost.dim() == 3:
        parts = [match_units(c, n_separate) for c in cost]
        return Match(*(torch.stack([getattr(m, k) for m in parts]) for k in ("perm", "merged", "a_index", "b_index")))
    d = cost.shape[0]
    if not 0 <= n_separate <= d:
        raise ValueError(f"n_separate={n_separate}: expected 0..{d}")
    rows, cols = linear_sum_assignment(cost.double().numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    matched = cost[torch.arange(d), perm]
    order = torch.sort(matched, descending=True, stable=True).indices
    merged = torch.zeros(d, dtype=torch.bool)
    merged[order[: d - n_separate]] = True
    keep, sep = merged.nonzero().flatten(), (~merged).nonzero().flatten()
    none = torch.full((n_separate,), -1)
    a_index = torch.cat([keep, sep, none])
    b_index = torch.cat([perm[keep], none, perm[sep]])
    return Match(perm, merged, a_index, b_index)


def solve_least_squares(
    G: torch.Tensor, H: torch.Tensor, in_a: torch.Tensor, in_b: torch.Tensor, out_a: torch.Tensor,
    out_b: torch.Tensor, ridge: float = 0.0, prior: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``W [in, out]`` minimising ``||X W - Y||^2 + lam ||W - prior||^2`` from ``G = X^T X`` and ``H = X^T Y``, with
    the blocks PLeaS holds at zero: an output only A has (``out_a & ~out_b``) reads no input only B has, and vice
    versa. in_a/in_b ``[in]``, out_a/out_b ``[out]``: whether A / B has that unit (both: a merged unit).
    ``lam = ridge * mean diag(G)`` (per block of outputs); ridge 0: the minimum-norm least-squares solution."""
    W = torch.zeros(G.shape[0], H.shape[1], dtype=torch.float64)
    prior = torch.zeros_like(W) if prior is None else prior.double()
    exists = in_a | in_b
    for cols, rows in ((out_a & out_b, exists), (out_a & ~out_b, in_a), (out_b & ~out_a, in_b)):
        if cols.any() and rows.any():
            g, h = G[rows][:, rows].double(), H[rows][:, cols].double()
            if ridge > 0:
                lam = ridge * g.diagonal().mean().clamp_min(1e-30)
                sol = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), h + lam * prior[rows][:, cols])
            else:
                sol = torch.linalg.lstsq(g, h, driver="gelsd").solution
            W[rows.nonzero(), cols.nonzero().T] = sol
    return W


# ---------------------------------------------------------------------------------------------------- internals


def _check_spec(spec: Spec, state: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first part of the adapter's spec that does not hold together."""
    groups = {g.name: g for g in spec.groups}

    def check_axes(where: str, axes) -> None:
        for g in axes:
            if g is not None and g not in groups:
                raise ValueError(f"{where}: unknown group {g!r}")
            if g is not None and groups[g].parent is not None and groups[g].parent not in axes:
                raise ValueError(f"{where}: nested group {g!r} needs its parent {groups[g].parent!r} on an axis too")

    for g in spec.groups:
        if g.parent is not None and (g.parent not in groups or groups[g.parent].widen):
            raise ValueError(f"group {g.name!r}: parent {g.parent!r} must be an earlier group that does not widen")
        for p in g.points:
            if g.name not in spec.points.get(p, ()):
                raise ValueError(f"group {g.name!r}: point {p!r} is not in spec.points or has no {g.name!r} axis")
    for p, axes in spec.points.items():
        check_axes(f"spec.points[{p!r}]", axes)
    floats = {k for k, v in state.items() if v.is_floating_point()}
    missing, unknown = sorted(floats - set(spec.layouts)), sorted(set(spec.layouts) - floats)
    if missing or unknown:
        raise ValueError(
            f"spec.layouts: must describe exactly the state's tensors; missing {missing}, unknown {unknown}"
        )
    for name, lay in spec.layouts.items():
        if math.prod(lay.view) != state[name].numel() or len(lay.view) != len(lay.axes):
            raise ValueError(
                f"spec.layouts[{name!r}]: view {lay.view} / axes {lay.axes} do not fit {state[name].shape}"
            )
        check_axes(f"spec.layouts[{name!r}]", lay.axes)
    for ly in spec.layers:
        lay = spec.layouts[ly.tensor]
        batch = [lay.axes[ly.batch]] if ly.batch is not None else []
        want_x, want_y = [lay.axes[i] for i in ly.inputs], [lay.axes[i] for i in ly.outputs]
        x, y = list(spec.points[ly.x]), list(spec.points[ly.y])
        w = list(spec.points[ly.weight]) if ly.weight is not None else batch
        if x not in (want_x, batch + want_x) or y != batch + want_y or w != batch:
            raise ValueError(f"layer {ly.tensor!r}: points x {x}, y {y}, weight {w}; expected x {batch + want_x} (or "
                             f"{want_x}: shared by the batch), y {batch + want_y}, weight {batch}")  # fmt: skip


def _ratios(ratio, groups: tuple[Group, ...]) -> dict[str, float]:
    if isinstance(ratio, Mapping):
        unknown = set(ratio) - {g.name for g in groups}
        if unknown:
            raise ValueError(f"ratio: unknown groups {sorted(unknown)}; the spec has {[g.name for g in groups]}")
        out = {g.name: float(ratio.get(g.name, 0.0)) for g in groups}
    else:
        out = {g.name: float(ratio) if g.widen else 0.0 for g in groups}
    for g in groups:
        if not 0.0 <= out[g.name] <= 1.0:
            raise ValueError(f"ratio[{g.name!r}]={out[g.name]}: expected 0 <= ratio <= 1")
        if out[g.name] > 0 and not g.widen:
            raise ValueError(f"ratio[{g.name!r}]={out[g.name]}: this group cannot widen (it must be fully merged)")
    return out


def _levels(groups: tuple[Group, ...]) -> list[list[Group]]:
    """Groups by nesting depth: every parent is matched before its children."""
    depth: dict[str, int] = {}
    for g in groups:
        depth[g.name] = 0 if g.parent is None else depth[g.parent] + 1
    return [[g for g in groups if depth[g.name] == k] for k in range(max(depth.values(), default=-1) + 1)]


def _passes(adapter, a, b, data, points, max_batches):
    """One pass over ``data``: (A's activations, B's activations) per batch at ``points``."""
    seen = 0
    for tokens in data:
        if max_batches is not None and seen >= max_batches:
            break
        seen += 1
        yield adapter.activations(a, tokens, points), adapter.activations(b, tokens, points)
    if seen == 0:
        raise ValueError("data: yielded no batches (it must be re-iterable, e.g. a list of token tensors)")


def _cost(act_a, act_b, axes, g: Group, matches) -> torch.Tensor:
    """``-||a_i - b_j||_2`` ``[d, d]`` (nested: ``[P, d, d]``) for one point and batch."""
    ax = 1 + axes.index(g.name)
    if g.parent is None:
        fa, fb = (t.movedim(ax, 0).reshape(g.size, -1).double() for t in (act_a, act_b))
        return -torch.cdist(fa, fb)
    pa = 1 + axes.index(g.parent)
    act_b = act_b.index_select(pa, matches[g.parent].perm)  # B's parent units in A's order
    P = act_a.shape[pa]
    fa, fb = (t.movedim((pa, ax), (0, 1)).reshape(P, g.size, -1).double() for t in (act_a, act_b))
    return -torch.cdist(fa, fb)


def _gather(t, axes, matches, groups, side: str, offset: int = 0):
    """``t`` laid out in the merged order along every grouped axis, and per grouped axis a mask broadcastable to the
    result: whether this side has the unit there. ``offset``: leading axes not in ``axes`` (rows)."""
    masks = {}
    key = "a_index" if side == "a" else "b_index"
    order = sorted((i for i, g in enumerate(axes) if g is not None), key=lambda i: groups[axes[i]].parent is not None)
    for i in order:
        g, ax = groups[axes[i]], offset + i
        idx = getattr(matches[g.name], key)
        shape = [1] * t.dim()
        if g.parent is None:
            t = t.index_select(ax, idx.clamp_min(0))
            shape[ax] = idx.shape[0]
        else:
            pa = offset + axes.index(g.parent)
            shape[pa], shape[ax] = idx.shape
            idx = idx if pa < ax else idx.T  # reshape keeps the order of the two axes
            t = t.gather(ax, idx.clamp_min(0).reshape(shape).expand(*t.shape[:ax], shape[ax], *t.shape[ax + 1 :]))
        masks[ax] = (idx >= 0).reshape(shape)
    return t, masks


def _combine(ta, tb, ma, mb, out_axes: set[int], offset: int = 0) -> torch.Tensor:
    """Step 5's rule: ``c_A * has_A(inputs) * A + c_B * has_B(inputs) * B``, with ``c_A = 1/2`` where both models
    have the output unit (a merged unit averages), 1 where only A has it, 0 where only B has it (and vice versa)."""
    ones = torch.ones((), dtype=torch.bool)
    a_out = b_out = a_in = b_in = ones
    for ax in ma:
        if ax - offset in out_axes:
            a_out, b_out = a_out & ma[ax], b_out & mb[ax]
        else:
            a_in, b_in = a_in & ma[ax], b_in & mb[ax]
    a_out, b_out = a_out.to(ta.dtype), b_out.to(ta.dtype)
    return ta * (a_out * (1 - b_out / 2) * a_in) + tb * (b_out * (1 - a_out / 2) * b_in)


def _stack(act_a, act_b, axes, matches, groups) -> torch.Tensor:
    """Activations ``[N, *axes]`` of both models in the merged layout: ``[(a + b) / 2 | a_sep | b_sep]``."""
    ta, ma = _gather(act_a, axes, matches, groups, "a", offset=1)
    tb, mb = _gather(act_b, axes, matches, groups, "b", offset=1)
    return _combine(ta, tb, ma, mb, set(range(len(axes))), offset=1)


def _origins(wide_shape, axes, matches, groups, side) -> torch.Tensor:
    """Whether ``side`` has each entry of a point's merged layout (no row axis)."""
    shape = [n if g is None else groups[g].size for n, g in zip(wide_shape, axes)]
    _, masks = _gather(torch.zeros(shape), axes, matches, groups, side)
    out = torch.ones(wide_shape, dtype=torch.bool)
    for m in masks.values():
        out = out & m
    return out


def _wide_shape(shape, axes, matches) -> tuple[int, ...]:
    return tuple(n if g is None else matches[g].width for n, g in zip(shape, axes))


def _stored_shape(stored, view, wide_view) -> tuple[int, ...]:
    """The stored shape of a widened tensor: each stored dim is the product of a run of consecutive view axes."""
    out, i = [], 0
    for n in stored:
        j, prod = i, 1
        while prod < n and j < len(view):
            prod, j = prod * view[j], j + 1
        if prod != n:
            raise ValueError(f"view {tuple(view)} does not split the stored shape {tuple(stored)} into runs")
        out.append(math.prod(wide_view[i:j]))
        i = j
    if any(n != 1 for n in view[i:]):
        raise ValueError(f"view {tuple(view)} does not split the stored shape {tuple(stored)} into runs")
    return tuple(out)


def _rows(act: torch.Tensor, index: int, batched: bool) -> torch.Tensor:
    """``[N, cols]``: a stacked point's rows for one batch index (``act[:, index]`` when the point has the axis)."""
    act = act[:, index] if batched else act
    return act.reshape(act.shape[0], -1).double()


def _refit(adapter, a, b, data, spec: Spec, matches, groups, state, ridge, max_batches) -> None:
    """Step 6: per layer and batch index, accumulate ``X^T w X`` and ``X^T w Y`` of the stacked points over the
    data, solve under PLeaS's zero blocks, and write the solutions into the merged tensors."""
    points = sorted({p for ly in spec.layers for p in (ly.x, ly.y, ly.weight) if p is not None})
    n_batch = [1 if ly.batch is None else spec.layouts[ly.tensor].view[ly.batch] for ly in spec.layers]
    x_batched = [ly.batch is not None and len(spec.points[ly.x]) == 1 + len(ly.inputs) for ly in spec.layers]
    acc: dict[tuple[int, int], list[torch.Tensor]] = {}
    wide: dict[str, tuple[int, ...]] = {}
    for acts_a, acts_b in _passes(adapter, a, b, data, points, max_batches):
        stacked = {p: _stack(acts_a[p], acts_b[p], spec.points[p], matches, groups) for p in points}
        wide = {p: tuple(t.shape[1:]) for p, t in stacked.items()}
        for li, ly in enumerate(spec.layers):
            for bi in range(n_batch[li]):
                x = _rows(stacked[ly.x], bi, x_batched[li])
                y = _rows(stacked[ly.y], bi, ly.batch is not None)
                x_w = x if ly.weight is None else x * _rows(stacked[ly.weight], bi, ly.batch is not None)
                G, H = x_w.T @ x, x_w.T @ y
                acc[li, bi] = [G, H] if (li, bi) not in acc else [acc[li, bi][0] + G, acc[li, bi][1] + H]
    for li, ly in enumerate(spec.layers):
        n, org = n_batch[li], {}
        for key, p, batched in (("x", ly.x, x_batched[li]), ("y", ly.y, ly.batch is not None)):
            for side in "ab":
                o = _origins(wide[p], spec.points[p], matches, groups, side)
                org[key, side] = o.reshape(n, -1) if batched else o.reshape(1, -1).expand(n, -1)
        lay = spec.layouts[ly.tensor]
        view = _wide_shape(lay.view, lay.axes, matches)
        order = ([ly.batch] if ly.batch is not None else []) + [*ly.inputs, *ly.outputs]
        n_in = math.prod(view[i] for i in ly.inputs)
        prior = state[ly.tensor].reshape(view).permute(*order).reshape(n, n_in, -1)  # the step-5 weights
        W = torch.stack([solve_least_squares(*acc[li, bi], *(org[k][bi] for k in org), ridge=ridge,
                                             prior=prior[bi]) for bi in range(n)])  # fmt: skip
        W = W.reshape([view[i] for i in order]).permute(*torch.tensor(order).argsort().tolist())
        state[ly.tensor] = W.to(state[ly.tensor].dtype).contiguous().reshape(state[ly.tensor].shape)
