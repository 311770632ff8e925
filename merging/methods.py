"""Linear, task arithmetic, TIES, DARE, DELLA and Breadcrumbs (all but linear: configurations of ``merging.gta``).

Notation: base theta_0, fine-tuned theta_t (t = 1..N), task vectors tau_t = theta_t - theta_0, weights w_t.
Every method: (1) optionally drop (DARE: Bernoulli; DELLA: rank-based MagPrune; Breadcrumbs: both magnitude tails)
with a rescale, (2) optionally trim to the top-``density`` magnitudes (TIES), (3) combine: "linear" = sum_t w_t
tau_t, "ties" = elect a sign per entry and take the disjoint (weighted) mean of the agreeing entries,
(4) theta = theta_0 + lam * combined.

Importing this module also registers the methods of their own modules (SLERP, Model Stock, TSV-M, Iso-C/CTS).
"""

from __future__ import annotations

from merging.gta import gta_method, info_of, weighted
from merging.registry import Chunk, Method, Param, register
from merging.sparsify import elect_sign, trim_topk, weights_of

__all__ = ["elect_sign", "trim_topk"]

LAM = Param(1.0, "scale of the merged task vector: theta_0 + lam * merged")
WEIGHTS = Param(None, "one weight per fine-tuned model (None = all 1)")
SEED = Param(0, "with the tensor name and the model index, seeds each model's generator")
SIGN = Param(
    "total",
    "sign election: 'total' = sign of the summed mass (TIES), 'frequency' = majority vote",
    ("total", "frequency"),
)
WEIGHTED_SIGN = Param(False, "elect on w_t * tau_t (mergekit) instead of tau_t (TIES paper, PEFT)", (False, True))
DIVISOR = Param("weights", "disjoint mean divisor: 'weights' = sum of agreeing w_t (= count when w = 1; mergekit), "
                "'count' = number of agreeing models (PEFT)", ("weights", "count"))  # fmt: skip
SCOPE = Param("global", "where the top-density magnitudes are counted: 'tensor', 'row' (last dim), or 'global' "
              "(the whole model, as the TIES paper); k = max(1, int(density * n)) of n (PEFT, mergekit)",
              ("tensor", "row", "global"))  # fmt: skip


def _check_density(p, key="density"):
    if not 0.0 < p[key] <= 1.0:
        raise ValueError(f"{key}={p[key]}: expected 0 < {key} <= 1")


# ---------------------------------------------------------------------------------------------------- linear


def _linear_apply(chunk: Chunk, stats: dict, p: dict):
    w = weights_of(p["weights"], chunk.n)
    if w.sum() == 0:
        raise ValueError("weights: must not sum to 0 for the linear merge")
    merged = chunk.base + weighted(chunk.tau, w).sum(0) / w.sum()
    return merged, info_of(chunk.tau)


register(
    Method(
        name="linear",
        pretty_name="Weighted average",
        reference_url="https://arxiv.org/abs/2203.05482",
        params={"weights": WEIGHTS},
        apply=_linear_apply,
        doc="sum_t w_t theta_t / sum_t w_t.",
    )
)


gta_method(
    "task_arithmetic",
    "Task arithmetic",
    "https://arxiv.org/abs/2212.04089",
    {
        "lam": Param(0.4, "scale of the summed task vectors (0.4: the TIES reference code's task-arithmetic example)"),
        "weights": WEIGHTS,
    },  # fmt: skip
    prepare=lambda p: {**p, "combine": "linear"},
    doc="theta_0 + lam * sum_t w_t tau_t.",
)


gta_method(
    "ties",
    "TIES-Merging",
    "https://arxiv.org/abs/2306.01708",
    {
        "density": Param(0.2, "kept fraction of each task vector's magnitudes (top-k, k = 20%)"),
        "lam": LAM,
        "weights": WEIGHTS,
        "scope": SCOPE,
        "sign": SIGN,
        "weighted_sign": WEIGHTED_SIGN,
        "divisor": DIVISOR,
    },
    prepare=lambda p: {**p, "combine": "ties", "trim_scope": p["scope"], "trim_rule": "floor"},
    validate=_check_density,
    doc="Trim each tau_t to its top-density magnitudes (scope: tensor / row / whole model), elect a sign per entry "
    "(zeros -> the majority elected sign of the scope), disjoint mean of the agreeing entries, scale by lam.",
)


def _validate_dare(p):
    if not 0.0 <= p["drop"] < 1.0:
        raise ValueError(f"drop={p['drop']}: expected 0 <= drop < 1")
    _check_density(p)


gta_method(
    "dare",
    "DARE (drop and rescale)",
    "https://arxiv.org/abs/2311.03099",
    {
        "drop": Param(0.1, "drop rate p of each task vector's entries (MergeLM default weight_mask_rate)"),
        "rescale": Param(
            "inverse",
            "'inverse' = 1/(1-p) (paper), 'l1' = match each tensor's L1 norm (mergekit), 'none'",
            ("inverse", "l1", "none"),
        ),  # fmt: skip
        "combine": Param(
            "linear",
            "'linear' = task arithmetic on the dropped vectors, 'ties' = TIES election and disjoint mean",
            ("linear", "ties"),
        ),  # fmt: skip
        "lam": LAM,
        "weights": WEIGHTS,
        "seed": SEED,
        "density": Param(
            1.0,
            "combine=ties: also trim to the top-density magnitudes after dropping (MergeLM "
            "DARE+TIES trims, keeping n - int(n (1 - density)) + 1 of n; mergekit dare_ties does not)",
        ),  # fmt: skip
        "scope": SCOPE,
        "sign": SIGN,
        "weighted_sign": WEIGHTED_SIGN,
        "divisor": DIVISOR,
    },
    prepare=lambda p: {**p, "trim_scope": p["scope"], "trim_rule": "mergelm"},
    drop="dare",
    validate=_validate_dare,
    doc="Drop each entry of tau_t with probability p (Bernoulli), rescale the survivors, then combine.",
)


def _validate_della(p):
    _check_density(p)
    lo, hi = p["density"] - p["epsilon"], p["density"] + p["epsilon"]
    if p["epsilon"] < 0 or lo <= 0 or hi > 1:
        raise ValueError(
            f"density={p['density']}, epsilon={p['epsilon']}: keep probabilities density -/+ epsilon must lie in (0, 1]"
        )


gta_method(
    "della",
    "DELLA-Merging (MagPrune)",
    "https://arxiv.org/abs/2406.11617",
    {
        "density": Param(0.7, "mean keep probability (DELLA README: drop 0.3)"),
        "epsilon": Param(0.07, "half window of keep probabilities: density -/+ epsilon (README window 0.14)"),
        "lam": Param(1.1, "scale of the fused task vector (DELLA README example)"),
        "weights": WEIGHTS,
        "seed": SEED,
        "rescale": Param(
            "inverse",
            "'inverse' = 1/p_keep per entry (paper), 'l1' = match each tensor's L1 norm (mergekit), 'none'",
            ("inverse", "l1", "none"),
        ),  # fmt: skip
        "combine": Param(
            "ties", "'ties' = elect (sum >= 0 -> +) and fuse (della), 'linear' = sum (della_linear)", ("ties", "linear")
        ),  # fmt: skip
        "scope": Param("row", "magnitude ranks per 'row' (paper code) or over the whole 'tensor'", ("row", "tensor")),
    },
    prepare=lambda p: {**p, "weighted_sign": True, "sign": "total"},
    drop="della",
    majority=False,
    validate=_validate_della,
    doc="MagPrune: keep each entry with probability rising linearly with its magnitude rank, rescale by 1/p, "
    "elect signs on w_t * tau_t (sum >= 0 -> +), weighted disjoint mean, scale by lam.",
)


# ---------------------------------------------------------------------------------------------- breadcrumbs


def _validate_breadcrumbs(p):
    _check_density(p)
    if not 0.0 <= p["gamma"] < 1.0:
        raise ValueError(f"gamma={p['gamma']}: expected 0 <= gamma < 1")


gta_method(
    "breadcrumbs",
    "Model Breadcrumbs",
    "https://arxiv.org/abs/2312.06795",
    {
        "density": Param(0.9, "kept fraction of each task vector (mergekit docs' example; paper: 1 - beta - gamma)"),
        "gamma": Param(0.01, "fraction of the largest magnitudes dropped (mergekit default; the paper's top tail)"),
        "lam": Param(0.4, "scale of the summed masked task vectors (official code's --alpha default)"),
        "weights": WEIGHTS,
        "scope": Param("tensor", "ranks per 'tensor' (the paper's per-layer masks, mergekit) or per 'row' (last dim, "
                       "the official code's topk)", ("tensor", "row")),  # fmt: skip
    },
    prepare=lambda p: {**p, "combine": "linear"},
    drop="breadcrumbs",
    validate=_validate_breadcrumbs,
    doc="Per layer and task, drop the top-gamma magnitudes (outliers) and the smallest ones so that int(density * n) "
    "stay, then theta_0 + lam * sum_t w_t tau_t (task arithmetic on the masked task vectors).",
)

from merging import iso, model_stock, slerp, tsv  # noqa: E402, F401  (register their methods)
