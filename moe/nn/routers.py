"""Routers: ``x [T, d] -> RoutingResult``. Router math is fp32; every loss travels in the result.

ROUTERS maps ``router.kind`` to a module class:

- ``topk``: linear gate, any score function, optional jitter, aux-loss-free bias, group-limited routing. Softmax
  and sigmoid scores without score options or groups run through the fused kernel (``moe.nn.routing.route_fused``,
  ``router.impl``), everything else through ``moe.nn.routing.route``.
- ``noisy_topk``: Shazeer et al. 2017, ``H = x W_g + N(0,1) * softplus(x W_noise)`` (training), KeepTopK, softmax,
  with the importance and load losses.
- ``gumbel``: Gumbel-softmax gating, ``softmax((l + g) / tau)``, optionally straight-through hard; tau annealed
  by ``anneal(step)``; at eval the gate is a Monte-Carlo mean over ``mc_samples`` samples (GG-MoE recipe).
- ``expert_choice``: Zhou et al. 2022, each expert takes its top ``capacity_factor * T / E`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import RouterConfig
from moe.kernels import MAX_EXPERTS
from moe.nn.gating import SCORE_FUNCTIONS, update_expert_bias
from moe.nn.losses import cv_squared, importance_loss, load_balancing_loss, router_z_loss
from moe.nn.routing import (
    RouterAux,
    RoutingPlan,
    RoutingResult,
    check_logits,
    fused_applies,
    input_faults,
    route,
    route_fused,
    softmax_limit,
    stable_topk,
)

IMPLS = ("auto", "triton", "torch")


def _check(cfg: RouterConfig, num_experts: int) -> None:
    if not 1 <= cfg.k <= num_experts:
        raise ValueError(f"router.k={cfg.k}: expected 1 <= k <= model.num_experts ({num_experts})")
    if cfg.score not in SCORE_FUNCTIONS:
        raise ValueError(f"router.score={cfg.score!r}: expected one of {sorted(SCORE_FUNCTIONS)}")
    if not 0.0 <= cfg.jitter < 1.0:
        raise ValueError(f"router.jitter={cfg.jitter}: expected 0 <= jitter < 1")
    if cfg.impl not in IMPLS:
        raise ValueError(f"router.impl={cfg.impl!r}: expected one of {IMPLS}")


def check_in_training(router: nn.Module, logits_TE: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """A router's non-finite-logit check in training mode: refused now (``check_logits``, a device sync), or counted
    for the training step's end (``router.defer_checks``; returned for ``RouterAux.faults``). None in eval mode."""
    if not router.training:
        return None
    if router.defer_checks:
        return router.layer_name, input_faults(logits_TE)
    check_logits(logits_TE, router.layer_name)
    return None


class Router(nn.Module):
    """What every router offers the MoE layer, the model, the parallel code and the callbacks.

    - ``forward(x_TD, seq_len=None) -> RoutingResult``;
    - ``reduce_counts``: ``counts_E -> counts_E`` summed over the data-parallel ranks, installed from outside by
      ``moe.parallel.expert_parallel`` (None on one device), so losses, the bias and statistics see the global load;
    - ``layer_name``: the module path named in errors (``MoETransformer`` sets it);
    - ``defer_checks``: in training, count non-finite logits on the device and raise once per step
      (``moe.nn.routing.raise_router_faults``; the LightningModule sets it) instead of one sync per layer;
    - ``anneal(step)`` and ``update_bias()``: the step-driven state (``moe.callbacks.RouterScheduleCallback``);
      no-ops for routers without one.
    """

    def __init__(self, num_experts: int, cfg: RouterConfig):
        super().__init__()
        _check(cfg, num_experts)
        self.cfg, self.num_experts = cfg, num_experts
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.layer_name = "router"
        self.defer_checks = False

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        raise NotImplementedError

    def anneal(self, step: int) -> None:
        """Set the state that follows the optimizer step (Gumbel's temperature)."""

    def update_bias(self) -> None:
        """Apply the aux-loss-free bias rule to the load counted since the last call."""


class TopKRouter(Router):
    """Linear gate ``x @ W^T`` in fp32, then ``moe.nn.routing.route_fused`` (the fused kernel, ``router.impl``) where it
    covers the configured score and options (``fused_reason``), else ``moe.nn.routing.route``."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__(num_experts, cfg)
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * cfg.init_std)
        self.score_kwargs = dict(cfg.score_kwargs)
        if cfg.learn_ssmax_s:
            if cfg.score != "ssmax":
                raise ValueError("router.learn_ssmax_s=true needs router.score=ssmax")
            self.ssmax_s = nn.Parameter(torch.tensor(float(self.score_kwargs.pop("s", 0.43))))
        # Auxiliary-loss-free bias: a buffer (not a parameter), moved by the sign rule in update_bias().
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("pending_counts", torch.zeros(num_experts), persistent=False)
        reason = self.fused_reason()
        if cfg.impl == "triton" and reason is not None:
            raise ValueError(f"router.impl=triton: the fused router does not cover {reason}; use router.impl=auto")
        self.fused = reason is None

    @property
    def uses_bias(self) -> bool:
        """Experts are ranked by ``score + expert_bias``: the bias is updated, or imported (``select_bias``)."""
        return self.cfg.bias_update_rate > 0 or self.cfg.select_bias

    def fused_reason(self) -> str | None:
        """None when the fused kernel covers this router, else why not. Jitter perturbs the gate's input, upstream
        of the logits, so it is covered; the aux-loss-free bias ranks ``score + bias`` inside the kernel."""
        cfg = self.cfg
        if type(self) is not TopKRouter:
            return f"router.kind={cfg.kind}"
        if cfg.learn_ssmax_s:
            return "router.learn_ssmax_s"
        if cfg.impl == "triton" and self.num_experts > MAX_EXPERTS:  # "auto" takes the reference there
            return f"model.num_experts={self.num_experts} > {MAX_EXPERTS}"
        return fused_applies(cfg.score, cfg.order, self.uses_bias, cfg.n_group, cfg.score_kwargs)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
        return F.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        common = dict(
            score=cfg.score, renormalize=cfg.renormalize, order=cfg.order, scaling=cfg.scaling,
            bias=self.expert_bias if self.uses_bias else None, aux_loss_mode=cfg.aux_loss_mode,
            seq_len=seq_len, reduce_counts=self.reduce_counts, check=self.layer_name if self.training else None,
            defer=self.defer_checks,
        )  # fmt: skip
        if self.fused:
            r = route_fused(logits_TE, cfg.k, impl=cfg.impl, **common)
        else:
            kw = dict(self.score_kwargs)
            if cfg.learn_ssmax_s:
                kw["s"] = self.ssmax_s
            r = route(logits_TE, cfg.k, n_group=cfg.n_group, topk_group=cfg.topk_group, **common, **kw)
        if self.training and cfg.bias_update_rate > 0:
            self.pending_counts += r.load.to(self.pending_counts)
        if cfg.importance_loss_coef > 0:  # Shazeer's CV^2 of sum_t probs: the column sums are enough
            r.extra_losses["importance"] = cfg.importance_loss_coef * cv_squared(r.prob_sums)
        return r

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the sign rule to the loads counted since the last call (call after the optimizer step)."""
        if self.cfg.bias_update_rate > 0 and self.pending_counts.sum() > 0:
            self.expert_bias.copy_(update_expert_bias(self.expert_bias, self.pending_counts, self.cfg.bias_update_rate))
            self.pending_counts.zero_()


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017); W_g and W_noise start at zero as in the paper."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__(num_experts, cfg)
        if cfg.k >= num_experts and cfg.noisy_topk.load_loss_coef > 0:
            raise ValueError("router.noisy_topk.load_loss_coef > 0 needs router.k < model.num_experts (no k+1-th "
                             "expert)")  # fmt: skip
        self.w_gate = nn.Parameter(torch.zeros(num_experts, d_model))
        self.w_noise = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        cfg, E, k = self.cfg, self.num_experts, self.cfg.k
        x32 = x_TD.float()
        clean_TE = F.linear(x32, self.w_gate.float())
        faults = check_in_training(self, clean_TE)
        clean_TE = softmax_limit(clean_TE)
        noisy_TE, sigma_TE = clean_TE, None
        if self.training:
            sigma_TE = F.softplus(F.linear(x32, self.w_noise.float())) + 1e-6
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * sigma_TE
        top_vals, ids = stable_topk(noisy_TE, min(k + 1, E))
        weights = torch.softmax(top_vals[:, :k], dim=-1)  # KeepTopK(H, k) then softmax: exactly k nonzeros
        gates_TE = torch.zeros_like(clean_TE).scatter(1, ids[:, :k], weights)
        probs = torch.softmax(noisy_TE, dim=-1)
        extra = {}
        if cfg.importance_loss_coef > 0:
            extra["importance"] = cfg.importance_loss_coef * importance_loss(gates_TE)
        if cfg.noisy_topk.load_loss_coef > 0 and sigma_TE is not None:
            # P(x, i) = Phi((clean_i - kth_excluding_i) / sigma_i): the chance expert i stays in the top k under
            # fresh noise. kth_excluding_i is the k-th largest of the others: H's (k+1)-th if i is in the top k.
            in_top = torch.zeros_like(clean_TE, dtype=torch.bool).scatter(1, ids[:, :k], True)
            threshold = torch.where(in_top, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
            p_in = torch.distributions.Normal(0.0, 1.0).cdf((clean_TE - threshold) / sigma_TE)
            extra["load"] = cfg.noisy_topk.load_loss_coef * cv_squared(p_in.sum(0))
        ids = ids[:, :k]
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        load = self.reduce_counts(counts) if self.reduce_counts is not None else None
        aux = load_balancing_loss(probs, ids, E, cfg.aux_loss_mode, seq_len, counts_E=load)
        return RoutingResult(
            RoutingPlan(weights, ids, counts),
            RouterAux(aux, router_z_loss(clean_TE), probs, extra_losses=extra, global_counts_E=load, faults=faults),
        )


def gumbel_tau(step: int, tau0: float, rate: float, tau_min: float) -> float:
    """Annealed temperature ``max(tau_min, tau0 * exp(-rate * step))`` (Jang et al. 2017)."""
    return max(tau_min, tau0 * math.exp(-rate * step))


class GumbelRouter(TopKRouter):
    """Gumbel-softmax gate over the experts, then top-k of the (sampled) gate; ``hard`` = straight-through.

    Training: ``y = softmax((l + g) / tau)``, g ~ Gumbel(0, 1); the k largest y are the experts, their weights the
    renormalised y (hard: forward ``1/k`` each, gradient of the soft weights). Eval: ``y`` is averaged over
    ``mc_samples`` draws from a generator seeded per call, so evaluation is deterministic.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__(d_model, num_experts, cfg)
        g = cfg.gumbel
        if g.tau <= 0 or g.tau_min <= 0:
            raise ValueError(f"router.gumbel.tau={g.tau}, router.gumbel.tau_min={g.tau_min}: expected > 0")
        if g.mc_samples < 1:
            raise ValueError(f"router.gumbel.mc_samples={g.mc_samples}: expected >= 1")
        self.register_buffer("tau", torch.tensor(float(g.tau)), persistent=True)

    def anneal(self, step: int) -> None:
        g = self.cfg.gumbel
        self.tau.fill_(gumbel_tau(step, g.tau, g.tau_anneal_rate, g.tau_min))

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        cfg, E = self.cfg, self.num_experts
        logits_TE = self.logits(x_TD)
        faults = check_in_training(self, logits_TE)
        logits_TE = softmax_limit(logits_TE)
        if self.training:
            gumbel = -torch.empty_like(logits_TE).exponential_().log()
            y_TE = torch.softmax((logits_TE + gumbel) / self.tau, dim=-1)
        else:
            gen = torch.Generator(device=logits_TE.device).manual_seed(0)
            noise = torch.empty((cfg.gumbel.mc_samples, *logits_TE.shape), device=logits_TE.device)
            gumbel = -noise.exponential_(generator=gen).log()
            y_TE = torch.softmax((logits_TE + gumbel) / self.tau, dim=-1).mean(0)
        _, ids = stable_topk(y_TE.detach(), cfg.k)
        soft = y_TE.gather(1, ids)
        soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = soft - soft.detach() + 1.0 / cfg.k if cfg.gumbel.hard else soft
        probs = torch.softmax(logits_TE, dim=-1)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        load = self.reduce_counts(counts) if self.reduce_counts is not None else None
        aux = load_balancing_loss(probs, ids, E, cfg.aux_loss_mode, seq_len, counts_E=load)
        return RoutingResult(
            RoutingPlan(weights, ids, counts),
            RouterAux(aux, router_z_loss(logits_TE), probs, global_counts_E=load, faults=faults),
        )


class ExpertChoiceRouter(TopKRouter):
    """Expert choice (Zhou et al. 2022): ``S = softmax(x W)`` over experts, each expert takes its top-C tokens.

    ``C = ceil(capacity_factor * T / E)`` (at most T). A token may get 0..E experts. The result's ``weights`` and
    ``ids`` are ``[T, E]`` (ids = every expert, weight 0 where the expert did not take the token) and
    ``expert_tokens`` ``[E, C]`` lists the tokens per expert. Selection looks at the whole batch, so in a causal
    decoder a token's routing depends on later tokens: refused unless ``allow_noncausal``.
    """

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__(d_model, num_experts, cfg)
        if cfg.expert_choice.capacity_factor <= 0:
            raise ValueError(f"router.expert_choice.capacity_factor={cfg.expert_choice.capacity_factor}: expected > 0")

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        cfg, E = self.cfg, self.num_experts
        T = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        faults = check_in_training(self, logits_TE)
        logits_TE = softmax_limit(logits_TE)
        probs = torch.softmax(logits_TE, dim=-1)
        C = min(T, math.ceil(cfg.expert_choice.capacity_factor * T / E))
        gates_EC, tokens_EC = stable_topk(probs.t(), C)
        expert_of_slot = torch.arange(E, device=probs.device).repeat_interleave(C)
        weights_TE = torch.zeros_like(probs).index_put((tokens_EC.reshape(-1), expert_of_slot),
                                                       gates_EC.reshape(-1))  # fmt: skip
        ids_TE = torch.arange(E, device=probs.device).expand(T, E)
        return RoutingResult(
            RoutingPlan(weights_TE, ids_TE, torch.full((E,), C, device=probs.device), expert_tokens_EC=tokens_EC),
            RouterAux(probs.sum() * 0.0, router_z_loss(logits_TE), probs, faults=faults),
        )


ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "gumbel": GumbelRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(d_model: int, num_experts: int, cfg: RouterConfig) -> Router:
    if cfg.kind == "from_model":
        raise ValueError("router.kind=from_model (router=from_model) takes the routing from a Hugging Face "
                         "checkpoint's config: it needs model=hf; choose a router=... for this model")  # fmt: skip
    if cfg.kind not in ROUTERS:
        raise ValueError(f"router.kind={cfg.kind!r}: expected one of {sorted(ROUTERS)}")
    return ROUTERS[cfg.kind](d_model, num_experts, cfg)
