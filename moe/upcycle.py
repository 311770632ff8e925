"""Dense -> MoE upcycling of SwiGLU MLPs: expert weights (copy, drop, split) and router rows (random, zero, hidden).

A dense SwiGLU ``F(x) = (silu(x W_g) * (x W_u)) W_d`` with ``W_g, W_u: [d, f]``, ``W_d: [f, d]`` becomes E experts
``[E, d, f_e]`` / ``[E, f_e, d]`` (``moe.nn.layers.SwiGLUExperts``):

- ``copy`` (Sparse Upcycling, arXiv 2212.05055): E copies. With renormalised softmax top-k the layer computes
  ``(sum of the kept weights) * F(x) = F(x)`` for any router: exact at init (``exactness_problems`` lists what breaks
  it: no renormalisation, jitter, capacity drops, a scaling, a shared expert).
- ``drop`` (Drop-Upcycling, arXiv 2502.19261): copies, then in each expert ``int(ratio * f)`` intermediate neurons,
  drawn per expert from a seeded generator, are re-initialised: their ``W_g`` / ``W_u`` columns and ``W_d`` rows
  from ``Normal(mean, std)`` of the values they replace, per matrix. One neuron set per expert re-draws all three
  matrices (the reference code draws each matrix's set independently, which leaves ``(1 - r)^3`` of the neurons
  intact instead of ``1 - r``). The reference's first step, a random neuron permutation, changes no function and
  is left out.
- ``split`` (MoEfication, LLaMA-MoE; Megatron's granular upcycling for ``granularity`` g > 1): g copies of the MLP,
  each partitioned into ``E / g`` experts of ``f_e = g f / E`` neurons (``random`` or ``cluster``: balanced k-means
  of the neurons' activations on calibration tokens). ``W_d`` is divided by g, so all E experts with unit weights
  sum to ``F(x)`` exactly (SwiGLU is a sum of per-neuron terms); the router's ``scaling`` is set to E, which makes
  a uniform renormalised router exact at ``k = E`` and keeps the output's magnitude at any k (no constant is exact
  for ``k < E``).

Router rows: ``random`` (``Normal(0, std)``), ``zero``, or ``hidden`` (mergekit-moe style): row e is the L2-normalised
mean of the router's own input (the MLP's input, after the post-attention norm) over the tokens of expert e's
calibration prompts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moe.config import MoEConfig, RouterConfig

METHODS = ("copy", "drop", "split")
ROUTER_INITS = ("random", "zero", "hidden")
SPLITS = ("random", "cluster")
Experts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # w_gate [E, d, f_e], w_up [E, d, f_e], w_down [E, f_e, d]


def copy_experts(w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor,
                 num_experts: int) -> Experts:  # fmt: skip
    """E copies: ``[E, d, f]``, ``[E, d, f]``, ``[E, f, d]``."""
    return tuple(w.unsqueeze(0).expand(num_experts, *w.shape).clone() for w in (w_gate_DF, w_up_DF, w_down_FD))


def drop_experts(w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor, num_experts: int,
                 ratio: float, generator: torch.Generator) -> tuple[Experts, list[torch.Tensor]]:  # fmt: skip
    """Drop-Upcycling: copies with ``int(ratio * f)`` neurons per expert re-drawn (module docstring). Returns the
    experts and, per expert, the re-initialised neuron indices ``[int(ratio * f)]``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"model.upcycle.drop_ratio={ratio}: expected 0 <= drop_ratio <= 1")
    gate, up, down = copy_experts(w_gate_DF, w_up_DF, w_down_FD, num_experts)
    f = w_gate_DF.shape[1]
    n = int(ratio * f)
    dropped = []
    for e in range(num_experts):
        idx = torch.randperm(f, generator=generator)[:n].sort().values
        dropped.append(idx)
        if n == 0:
            continue
        for w_EXY, dim in ((gate, 2), (up, 2), (down, 1)):  # columns of W_g, W_u; rows of W_d
            old = w_EXY[e].index_select(dim - 1, idx).float()
            mean, std = old.mean(), old.std() if old.numel() > 1 else old.new_zeros(())
            new = torch.randn(old.shape, generator=generator) * std + mean
            w_EXY[e].index_copy_(dim - 1, idx, new.to(w_EXY.dtype))
    return (gate, up, down), dropped


def split_assignment(act_TF: torch.Tensor | None, f: int, parts: int, method: str,
                     generator: torch.Generator, iters: int = 10) -> torch.Tensor:  # fmt: skip
    """int64 ``[f]``: each neuron's part in ``0..parts-1``, every part ``f / parts`` neurons. ``random``: a seeded
    permutation; ``cluster``: balanced k-means of the neurons' L2-normalised activation columns ``act_TF``
    (calibration tokens), each round an optimal equal-size assignment (``scipy.optimize.linear_sum_assignment``)."""
    if method not in SPLITS:
        raise ValueError(f"model.upcycle.split={method!r}: expected one of {SPLITS}")
    if f % parts:
        raise ValueError(f"model.upcycle: d_ff={f} does not split into {parts} equal experts")
    size = f // parts
    perm = torch.randperm(f, generator=generator)
    part = torch.empty(f, dtype=torch.int64)
    part[perm] = torch.arange(f) // size
    if method == "random" or parts == 1:
        return part
    if act_TF is None or act_TF.shape[1] != f:
        raise ValueError("model.upcycle.split=cluster needs calibration activations of every neuron "
                         "(model.upcycle.calibration)")  # fmt: skip
    from scipy.optimize import linear_sum_assignment

    feats_FT = torch.nn.functional.normalize(act_TF.float().abs().T, dim=1)
    for _ in range(iters):  # start from the random balanced split; move neurons to the nearest centroid with room
        centroids_PT = torch.stack([feats_FT[part == p].mean(0) for p in range(parts)])
        cost_FP = -(feats_FT @ torch.nn.functional.normalize(centroids_PT, dim=1).T)
        rows, cols = linear_sum_assignment(cost_FP.repeat_interleave(size, dim=1).numpy())
        new = torch.as_tensor(cols // size, dtype=torch.int64)[torch.as_tensor(rows).argsort()]
        if torch.equal(new, part):
            break
        part = new
    return part


def split_experts(w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor, num_experts: int,
                  granularity: int, assignment_F: torch.Tensor) -> Experts:  # fmt: skip
    """Expert e = the neurons of part ``e % (E / g)`` (``assignment_F``) of copy ``e // (E / g)``, ``W_d / g``:
    the E experts with unit weights sum to the dense MLP. ``[E, d, f_e]``, ``[E, d, f_e]``, ``[E, f_e, d]``."""
    if granularity < 1 or num_experts % granularity:
        raise ValueError(f"model.upcycle.granularity={granularity}: must divide model.upcycle.num_experts="
                         f"{num_experts}")  # fmt: skip
    parts = num_experts // granularity
    idx = [torch.nonzero(assignment_F == p).squeeze(1) for p in range(parts)]
    gate = torch.stack([w_gate_DF[:, i] for i in idx] * granularity)
    up = torch.stack([w_up_DF[:, i] for i in idx] * granularity)
    down = torch.stack([w_down_FD[i] / granularity for i in idx] * granularity)
    return gate, up, down


def router_rows(method: str, num_experts: int, d_model: int, std: float, generator: torch.Generator,
                hidden_means_ED: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[E, d]`` router weights: ``random`` ``Normal(0, std)``, ``zero``, or ``hidden``: the L2-normalised rows of
    ``hidden_means_ED`` (the mean router input over each expert's calibration prompts)."""
    if method == "random":
        return torch.randn(num_experts, d_model, generator=generator) * std
    if method == "zero":
        return torch.zeros(num_experts, d_model)
    if method == "hidden":
        if hidden_means_ED is None or hidden_means_ED.shape != (num_experts, d_model):
            raise ValueError(f"model.upcycle.router_init=hidden needs one prompt set per expert ({num_experts}) "
                             "in model.upcycle.prompts")  # fmt: skip
        return torch.nn.functional.normalize(hidden_means_ED.float(), dim=1)
    raise ValueError(f"model.upcycle.router_init={method!r}: expected one of {ROUTER_INITS}")


def exactness_problems(router: RouterConfig, moe: MoEConfig) -> list[str]:
    """What keeps copy upcycling from computing the dense model at init (empty: exact for any router weights)."""
    bad = []
    if router.kind != "topk" or router.score != "softmax" or router.order != "score_then_topk":
        bad.append(f"router kind/score/order {router.kind}/{router.score}/{router.order} (softmax top-k is exact)")
    if not router.renormalize:
        bad.append("router.renormalize=false scales the output by the kept probability mass")
    if router.jitter > 0:
        bad.append(f"router.jitter={router.jitter}")
    if router.scaling != 1.0:
        bad.append(f"router.scaling={router.scaling}")
    if moe.capacity_factor > 0:
        bad.append(f"model.moe.capacity_factor={moe.capacity_factor} drops tokens")
    if moe.n_shared or moe.residual:
        bad.append("a shared expert or residual branch adds to the copies")
    return bad


def upcycled_router(router: RouterConfig, method: str, num_experts: int, k: int) -> RouterConfig:
    """The routing of an upcycled layer: ``router`` with ``k``; ``split`` scales the weights by E (docstring)."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"model.upcycle.k={k}: expected 1 <= k <= num_experts ({num_experts})")
    scaling = float(num_experts) if method == "split" else router.scaling
    return replace(router, k=k, scaling=scaling)


def selected_layers(spec, n_layers: int) -> list[int]:
    """``model.upcycle.layers``: "all", "upper_half", every n-th (an int n: layers n-1, 2n-1, ...), or a list."""
    if spec == "all":
        return list(range(n_layers))
    if spec == "upper_half":
        return list(range(n_layers // 2, n_layers))
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return list(range(spec - 1, n_layers, spec))
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(i, int) and 0 <= i < n_layers for i in spec):
        return sorted(set(spec))
    raise ValueError(f"model.upcycle.layers={spec!r}: expected all, upper_half, an int n (every n-th layer) or a "
                     f"list of layer indices in [0, {n_layers})")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# A transformers model, in place
# ---------------------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers to upcycle")
    return layers


def dense_weights(mlp: nn.Module, where: str) -> Experts:
    """``W_g [d, f]``, ``W_u [d, f]``, ``W_d [f, d]`` of a transformers SwiGLU MLP (``gate_proj``, ``up_proj``,
    ``down_proj``, no bias)."""
    linears = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(lin, nn.Linear) for lin in linears) or any(lin.bias is not None for lin in linears):
        raise ValueError(f"{where}: {type(mlp).__name__} is not a SwiGLU MLP of bias-free gate_proj, up_proj and "
                         "down_proj (what upcycling converts)")  # fmt: skip
    gate, up, down = (lin.weight.detach() for lin in linears)
    return gate.T, up.T, down.T


@torch.no_grad()
def router_inputs(model: nn.Module, layer_ids: list[int], tokenizer, prompts: list[list[str]]
                  ) -> dict[int, list[torch.Tensor]]:  # fmt: skip
    """Per upcycled layer, per prompt set: the MLP's inputs ``[T_e, d]`` (what the router will see) over the
    tokens of the set's prompts, each prompt run alone (no padding)."""
    layers = decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}

    def keep(i: int):
        return lambda module, args: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float())

    hooks = [layers[i].mlp.register_forward_pre_hook(keep(i)) for i in layer_ids]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    was_training = model.training
    model.eval()
    try:
        for texts in prompts:
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
            for i in layer_ids:
                out[i].append(torch.cat(seen[i]) if seen[i] else torch.zeros(0, layers[i].mlp.gate_proj.in_features))
                seen[i].clear()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def upcycle(model: nn.Module, num_experts: int, k: int, *, method: str = "copy", layers="all",
            drop_ratio: float = 0.5, split: str = "random", granularity: int = 1, router_init: str = "random",
            router_std: float = 0.02, prompts: list[list[str]] | None = None, seed: int = 0, exact: bool = True,
            router: RouterConfig | None = None, moe: MoEConfig | None = None, tokenizer=None) -> RouterConfig:
    """Replace the dense SwiGLU MLPs of ``layers`` in the transformers causal LM ``model`` by our ``MoELayer``
    (wrapped in ``moe.hf.blocks.HFMoEBlock``), in place; returns the layers' routing. Module docstring for the
    methods; ``router``: the routing (default softmax top-k, renormalised), given ``k``; ``tokenizer``: for
    ``router_init=hidden`` and ``split=cluster``, which read ``prompts`` (one list of texts per expert)."""
    from moe.hf.blocks import HFMoEBlock, layer_from_tensors

    if method not in METHODS:
        raise ValueError(f"model.upcycle.method={method!r}: expected one of {METHODS}")
    if num_experts < 1:
        raise ValueError(f"model.upcycle.num_experts={num_experts}: expected >= 1")
    router, moe = upcycled_router(router or RouterConfig(), method, num_experts, k), moe or MoEConfig()
    if moe.n_shared or moe.residual or moe.kind != "sparse":
        raise ValueError("model.upcycle: upcycles into a sparse layer without shared experts or residual branch "
                         "(model.moe: dropless or capacity)")  # fmt: skip
    problems = exactness_problems(router, moe) if method == "copy" else []
    if problems and exact:
        raise ValueError(f"model.upcycle.method=copy would not equal the dense model at init: {'; '.join(problems)}. "
                         "Set model.upcycle.exact=false to upcycle anyway")  # fmt: skip
    if getattr(getattr(model, "config", None), "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act={model.config.hidden_act!r}: upcycling converts SwiGLU MLPs (silu)")
    blocks = decoder_layers(model)
    ids = selected_layers(layers, len(blocks))
    needs_data = router_init == "hidden" or (method == "split" and split == "cluster")
    if needs_data and (tokenizer is None or not prompts or (router_init == "hidden" and len(prompts) != num_experts)):
        raise ValueError(f"model.upcycle: router_init={router_init}, split={split} need model.upcycle.prompts "
                         f"({num_experts} lists of texts, one per expert, for hidden) and the model's "
                         "tokenizer")  # fmt: skip
    inputs = router_inputs(model, ids, tokenizer, prompts) if needs_data else {}
    gen = torch.Generator().manual_seed(seed)
    for i in ids:
        mlp = blocks[i].mlp
        w_gate, w_up, w_down = dense_weights(mlp, f"model.model.layers.{i}.mlp")
        d, f = w_gate.shape
        if method == "copy":
            experts = copy_experts(w_gate, w_up, w_down, num_experts)
        elif method == "drop":
            experts, _ = drop_experts(w_gate, w_up, w_down, num_experts, drop_ratio, gen)
        else:
            act = None
            if split == "cluster":
                x = torch.cat(inputs[i]).to(w_gate)
                act = torch.nn.functional.silu(x @ w_gate) * (x @ w_up)
            parts = num_experts // granularity if granularity >= 1 and num_experts % granularity == 0 else 0
            if parts == 0:
                raise ValueError(f"model.upcycle.granularity={granularity}: must divide num_experts={num_experts}")
            experts = split_experts(w_gate, w_up, w_down, num_experts, granularity,
                                    split_assignment(act, f, parts, split, gen))  # fmt: skip
        means = torch.stack([x.mean(0) if len(x) else torch.zeros(d) for x in inputs[i]]) if router_init == "hidden" \
            else None  # fmt: skip
        tensors = dict(zip(("experts.w_gate", "experts.w_up", "experts.w_down"), experts))
        tensors["router.weight"] = router_rows(router_init, num_experts, d, router_std, gen, means)
        layer = layer_from_tensors(d, experts[0].shape[2], num_experts, router, moe, tensors, w_gate.dtype,
                                   f"model.model.layers.{i}.mlp")  # fmt: skip
        blocks[i].mlp = HFMoEBlock(layer.to(w_gate.device))
    return router
