"""DivMerge (Touayouch et al., arXiv 2509.02108, EACL 2026): task-arithmetic coefficients learned by minimising a
divergence between the merged model's and each fine-tune's output distributions on unlabeled inputs.

Model-agnostic: the model comes through a ``merging.protocols.DivMergeAdapter`` (``moe.adapters.MoEAdapter``).

- Merge (Sec. 4): ``theta(G) = theta_0 + sum_t G[t, l(p)] tau_t`` for every parameter p, ``tau_t = theta_t -
  theta_0``, l(p) its layer (the adapter's): "layer" granularity (LL, one coefficient per task and layer, the
  paper's better one) or "task" (TL, one per task; TL with every G = lam is task arithmetic with lam).
- Objective (Eq. 4, divided by T): ``J(G) = 1/T sum_t mean_{x in X_t} mean_j D(p_t(.|x, y_<j) || p_G(.|x, y_<j))``
  where y is fine-tune t's greedy continuation of prompt x (until ``eos`` or ``max_new_tokens``), decoded once with
  its distributions cached, and then teacher-forced through the merged model (App. B.1). D = JS (default),
  ``JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``, in log space; or KL with the fine-tune as
  reference. Each task's fine-tune judges only its own task's inputs, which balances the tasks without labels.
- Optimiser (Alg. 1, Table 9): Adam (default betas), lr 1e-2, minibatches of 4T prompts drawn from the union of the
  tasks' prompts, 4 epochs; G starts at 1/T (Alg. 1; Table 9 lists 0.5, the same at T = 2). The paper uses 200
  (TL) or 400 (LL) prompts per task; pass as many in ``data``.

Buffers are taken from the base. Memory: theta_0, every tau_t and the cached distributions (rows x tokens x V).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from merging.protocols import DivMergeAdapter, UnlabeledData


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last axis from log-probabilities; terms with ``p = 0`` count 0."""
    return torch.where(logp > -math.inf, logp.exp() * (logp - logq), 0.0).sum(-1)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``, over the last axis (at most log 2)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (kl_divergence(logp, logm) + kl_divergence(logq, logm))


DIVERGENCES = {"js": js_divergence, "kl": kl_divergence}


@torch.no_grad()
def greedy_decode(adapter, model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos: int | None = None):
    """prompts ``[B, P]`` -> (tokens ``[B, P + n]``, mask ``[B, n]``: the generated token counts, up to and including
    the first ``eos``). Stops early once every row has emitted ``eos``."""
    tokens, done = prompts, torch.zeros(prompts.shape[0], dtype=torch.bool)
    masks = []
    for _ in range(max_new_tokens):
        nxt = adapter.logits(model, tokens)[:, -1].argmax(-1)
        masks.append(~done)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if eos is not None:
            done = done | (nxt == eos)
            if done.all():
                break
    return tokens, torch.stack(masks, 1)


@dataclass
class _Rows:
    """Cached examples of one shape: tokens ``[R, P + n]``, teacher log-probs ``[R, n, V]``, mask ``[R, n]``."""

    prompt_len: int
    tokens: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor  # [R]: 1 / (T * rows of the example's task)
    task: torch.Tensor  # [R]: the example's task index


class DivMergeObjective:
    """``J(G)`` of a base, its fine-tunes and their unlabeled prompts; call with ``G [T, L]`` (and optionally the
    indices of the rows of a minibatch, for an unbiased estimate of J)."""

    def __init__(self, base, models: Sequence, data: Sequence[UnlabeledData], adapter: DivMergeAdapter, *,
                 granularity: str = "layer", divergence: str = "js", max_new_tokens: int | Sequence[int] = 16,
                 eos: int | None = None):  # fmt: skip
        if granularity not in ("layer", "task"):
            raise ValueError(f"granularity={granularity!r}: expected 'layer' or 'task'")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}: expected one of {sorted(DIVERGENCES)}")
        if not models or len(data) != len(models):
            raise ValueError(f"data: expected one source of prompts per fine-tuned model ({len(models)}), "
                             f"got {len(data)}")  # fmt: skip
        n_new = [max_new_tokens] * len(models) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(n_new) != len(models) or min(n_new) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1, or one such per model")
        self.adapter, self.divergence = adapter, DIVERGENCES[divergence]
        self.base = adapter.load(base)
        theta0 = {n: p.detach() for n, p in self.base.named_parameters() if p.is_floating_point()}
        fts = [adapter.load(m) for m in models]
        ft_params = [dict(ft.named_parameters()) for ft in fts]
        self.tau: dict[str, torch.Tensor] = {}
        for name, t0 in theta0.items():
            own = [params.get(name) for params in ft_params]
            for i, p in enumerate(own):
                if p is None or p.shape != t0.shape:
                    raise ValueError(f"models[{i}]: parameter {name!r} missing or shaped unlike the base's")
            self.tau[name] = torch.stack([p.detach() - t0 for p in own])  # [T, ...]
        self.theta0 = theta0
        layers = adapter.layers(self.base) if granularity == "layer" else {"all": list(theta0)}
        owner = [n for names in layers.values() for n in names]
        if sorted(owner) != sorted(theta0):
            raise ValueError("adapter.layers: must list every floating-point parameter exactly once")
        self.layers = list(layers)
        self.layer_of = {n: i for i, names in enumerate(layers.values()) for n in names}
        self.rows = self._cache(fts, data, n_new, eos)
        self.n_rows = sum(r.tokens.shape[0] for r in self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """``(T, L)``: the coefficients' shape."""
        return len(next(iter(self.tau.values()))), len(self.layers)

    def _cache(self, fts, data, max_new_tokens, eos) -> list[_Rows]:
        """Decode every prompt with its task's fine-tune once; keep its tokens and distributions, grouped by shape."""
        groups: dict[tuple[int, int], list] = {}
        for t, (ft, source) in enumerate(zip(fts, data)):
            parts = []
            for prompts in source:
                if prompts.dim() != 2:
                    raise ValueError(f"data[{t}]: expected token batches [B, S], got shape {tuple(prompts.shape)}")
                tokens, mask = greedy_decode(self.adapter, ft, prompts, max_new_tokens[t], eos)
                with torch.no_grad():
                    logits = self.adapter.logits(ft, tokens[:, :-1])[:, prompts.shape[1] - 1 :]
                parts.append((prompts.shape[1], tokens, F.log_softmax(logits.float(), -1), mask))
            n = sum(p[1].shape[0] for p in parts)
            if n == 0:
                raise ValueError(f"data[{t}]: yielded no prompts")
            for P, tokens, teacher, mask in parts:
                w = torch.full((tokens.shape[0],), 1.0 / (len(fts) * n))
                task = torch.full((tokens.shape[0],), t)
                groups.setdefault((P, tokens.shape[1]), []).append((tokens, teacher, mask, w, task))
        return [_Rows(P, *(torch.cat(x) for x in zip(*parts))) for (P, _), parts in groups.items()]

    def params(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        """``theta(G)``, differentiable in G."""
        return {n: t0 + torch.tensordot(gamma[:, self.layer_of[n]], self.tau[n], dims=1) for n, t0 in
                self.theta0.items()}  # fmt: skip

    def _divergence(self, params, g: _Rows, sel: torch.Tensor) -> torch.Tensor:
        """Mean divergence over each selected row's generated tokens ``[len(sel)]``."""
        logits = self.adapter.logits(self.base, g.tokens[sel, :-1], params)[:, g.prompt_len - 1 :]
        d = self.divergence(g.teacher[sel], F.log_softmax(logits.float(), -1))  # [b, n]
        mask = g.mask[sel].float()
        return (d * mask).sum(1) / mask.sum(1).clamp_min(1)

    def __call__(self, gamma: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """J(G) over all rows, or ``n_rows / len(rows) * sum_{r in rows} w_r D_r`` over a minibatch."""
        params, total, start = self.params(gamma), 0.0, 0
        for g in self.rows:
            R = g.tokens.shape[0]
            sel = torch.arange(R) if rows is None else rows[(rows >= start) & (rows < start + R)] - start
            start += R
            if len(sel):
                total = total + (g.weight[sel] * self._divergence(params, g, sel)).sum()
        return total if rows is None else total * (self.n_rows / len(rows))

    @torch.no_grad()
    def evaluate(self, gamma: torch.Tensor) -> float:
        return float(self(gamma))

    @torch.no_grad()
    def per_task(self, gamma: torch.Tensor) -> list[float]:
        """Each task's mean divergence (J is their mean)."""
        params, T = self.params(gamma), self.shape[0]
        out = torch.zeros(T, dtype=torch.float64)
        for g in self.rows:
            out.index_add_(0, g.task, (T * g.weight * self._divergence(params, g, torch.arange(len(g.task)))).double())
        return out.tolist()


@dataclass
class DivMergeResult:
    model: nn.Module
    coefficients: torch.Tensor  # [T, L]
    layers: list[str]
    objective: DivMergeObjective
    history: list[float] = field(default_factory=list)  # the minibatch loss at each step


def divmerge(
    base, models: Sequence, data: Sequence[UnlabeledData], adapter: DivMergeAdapter, *, granularity: str = "layer",
    divergence: str = "js", lr: float = 1e-2, epochs: int = 4, batch_size: int | None = None,
    init: float | None = None, max_new_tokens: int | Sequence[int] = 16, eos: int | None = None, seed: int = 0,
) -> DivMergeResult:  # fmt: skip
    """Merge ``models`` (fine-tunes of ``base``; paths or modules, read by ``adapter.load``) with DivMerge.

    - data: one source of unlabeled prompts ``[B, P]`` per model (its task's inputs).
    - granularity: "layer" (LL) or "task" (TL); divergence: "js" or "kl".
    - lr, epochs, batch_size (default 4T), init (default 1/T), seed (minibatch order): the optimiser.
    - max_new_tokens (one for all, or one per model), eos: how far each fine-tune decodes its prompts.

    Returns the merged model (``adapter.build``), the coefficients ``[T, L]`` and their layer names, the objective
    (``result.objective(G)`` scores any coefficients) and the loss per step.
    """
    for key, value in (("lr", lr), ("epochs", epochs)):
        if value <= 0:
            raise ValueError(f"{key}={value}: expected > 0")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    objective = DivMergeObjective(base, models, data, adapter, granularity=granularity, divergence=divergence,
                                  max_new_tokens=max_new_tokens, eos=eos)  # fmt: skip
    T, L = objective.shape
    gamma = torch.full((T, L), 1.0 / T if init is None else float(init), requires_grad=True)
    opt = torch.optim.Adam([gamma], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        for rows in torch.randperm(objective.n_rows, generator=gen).split(batch_size or 4 * T):
            loss = objective(gamma, rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
    gamma = gamma.detach()
    state = {**objective.base.state_dict(), **{n: p.detach() for n, p in objective.params(gamma).items()}}
    return DivMergeResult(adapter.build(state), gamma, objective.layers, objective, history)
