"""Gating score functions: router logits ``[..., E]`` -> per-expert scores ``[..., E]`` (last dim = experts).

Every entry of ``SCORE_FUNCTIONS`` is a pure function ``fn(logits, **kw) -> scores`` with the shape of ``logits``.
Math runs in fp32: fp16/bf16/fp32 inputs give fp32 scores (float64 stays float64, so ``gradcheck`` can run).
``-inf`` logits mean "masked": they score 0 and receive a zero gradient. ``+inf``/NaN logits are not supported.
Formulas, defaults and invariants follow ``gating-spec.md``; the family table (spec section 0) is::

    name                  sums to 1              >= 0              shift-invariant
    softmax               yes                    yes               yes
    sigmoid               no (each in [0, 1])    yes               no
    sparsemax, entmax15   yes (sparse)           yes               yes
    softpick              no (sum in [0, 1])     yes               no
    ssmax                 yes                    yes               yes
    self_adjust_softmax   no (sum <= 1 if normalized; signed if not)   no
    adaptive_temperature  yes                    yes               yes
    dense_to_sparse       yes                    yes               no

Shapes: T = tokens, E = experts, K = experts selected per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType

import torch
import torch.nn.functional as F

# beta(H) = max(1, poly(H)) for H > 0.5 nats, highest degree first (Velickovic et al. 2024, fit of their Fig. 5).
_ADAPTIVE_TEMPERATURE_POLY = (-0.037, 0.481, -2.3, 4.917, -1.791)
_ACTIVATIONS = MappingProxyType({"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu})


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (never downcast float64) and check the ``[..., E]`` layout."""
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., E] with E >= 1, got {tuple(logits.shape)}")
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature}: expected a finite value > 0")


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``p = softmax(z / temperature)`` over the last dim (max-subtracted). ``[..., E] -> [..., E]``, sums to 1."""
    _check_temperature(temperature)
    return torch.softmax(_fp32(logits) / temperature, dim=-1)


def sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``p = sigmoid(z)`` elementwise, in [0, 1]; does not sum to 1. ``[..., E] -> [..., E]``.

    DeepSeek-V3's load-balancing bias is deliberately not added here: it only changes *which* experts are picked
    (``select_with_bias``), never the gate values, which are gathered from these unbiased scores.
    """
    return torch.sigmoid(_fp32(logits))


def select_with_bias(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """Auxiliary-loss-free selection (DeepSeek-V3): ``ids_TK = topk(scores_TE + bias_E, k)``, int64.

    The bias only ranks experts; gather the gate values from the unbiased scores with
    ``scores_TE.gather(-1, ids_TK)``. Ties go to the lower expert id (stable descending sort).
    """
    E = scores_TE.shape[-1]
    if bias_E.shape != (E,):
        raise ValueError(f"bias_E: expected shape ({E},), got {tuple(bias_E.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"k={k}: expected 1 <= k <= num_experts ({E})")
    biased_TE = scores_TE.detach().float() + bias_E.detach().float()
    return torch.sort(biased_TE, dim=-1, descending=True, stable=True).indices[..., :k]


def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Sign rule of DeepSeek-V3: ``new_bias_e = bias_e + rate * sign(mean(counts) - counts_e)``. Returns a new tensor.

    Overloaded experts (load above the mean) are pushed down, underloaded ones up, balanced ones stay put.
    ``counts_E`` is the number of tokens routed to each expert in the last step (any numeric dtype).
    """
    if counts_E.shape != bias_E.shape or bias_E.dim() != 1:
        raise ValueError(f"counts_E: expected shape {tuple(bias_E.shape)} like bias_E, got {tuple(counts_E.shape)}")
    if not 0 <= rate < math.inf:
        raise ValueError(f"rate={rate}: expected a finite value >= 0")
    load_E = counts_E.detach().float()
    step_E = rate * torch.sign(load_E.mean() - load_E)
    return bias_E.detach() + step_E.to(bias_E.dtype)


class SparsemaxFunction(torch.autograd.Function):
    """Euclidean projection onto the simplex (Martins & Astudillo 2016), exact sort-based forward.

    Forward: sort ``z`` descending, ``k = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}``,
    ``tau = (sum_{j<=k} z_(j) - 1) / k``, ``p = max(z - tau, 0)``. One-hot iff the top gap is >= 1.
    Backward: ``dz_i = s_i (g_i - sum_{j in S} g_j / |S|)`` with ``s = 1[p > 0]``; zero off the support.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        z = logits - logits.amax(dim=-1, keepdim=True)  # shift-invariant; -inf stays -inf
        z_sorted = torch.sort(z, dim=-1, descending=True).values
        rho = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
        cumsum_minus_one = z_sorted.cumsum(dim=-1) - 1
        support_size = (rho * z_sorted > cumsum_minus_one).sum(
            dim=-1, keepdim=True
        ).clamp_min(1)  # -inf entries: -inf > -inf is False; a NaN row (no support) stays NaN instead of failing
        tau = cumsum_minus_one.gather(-1, support_size - 1) / support_size
        p = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        support = (p > 0).to(grad_p.dtype)
        mean_on_support = (grad_p * support).sum(dim=-1, keepdim=True) / support.sum(dim=-1, keepdim=True)
        return support * (grad_p - mean_on_support)


class Entmax15Function(torch.autograd.Function):
    """1.5-entmax (Peters et al. 2019): ``p_i = [z_i / 2 - tau]_+^2`` with tau chosen so that ``sum p = 1``.

    Forward (exact, sort-based): ``x = (z - max z) / 2`` sorted descending; for each prefix size rho,
    ``tau_rho = mean_rho - sqrt(max((1 - rho (meansq_rho - mean_rho^2)) / rho, 0))``; the support size is
    ``k = #{rho : tau_rho <= x_(rho)}`` and ``tau = tau_k``. One-hot iff the top gap is >= 2.
    Backward: with ``g = sqrt(p)``, ``dz = grad * g - (sum(grad * g) / sum(g)) * g`` (the 1/2 is folded in).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        x = (logits - logits.amax(dim=-1, keepdim=True)) / 2
        x_sorted = torch.sort(x, dim=-1, descending=True).values
        x_sorted_finite = x_sorted.masked_fill(x_sorted == -math.inf, 0.0)  # keeps the cumsums free of inf - inf
        rho = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
        mean = x_sorted_finite.cumsum(dim=-1) / rho
        mean_sq = (x_sorted_finite**2).cumsum(dim=-1) / rho
        delta = (1 - rho * (mean_sq - mean**2)) / rho
        tau_rho = mean - delta.clamp(min=0).sqrt()
        support_size = (tau_rho <= x_sorted).sum(dim=-1, keepdim=True).clamp_min(1)  # -inf never counts; NaN rows
        tau = tau_rho.gather(-1, support_size - 1)
        p = torch.clamp(x - tau, min=0) ** 2
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        sqrt_p = p.sqrt()
        weighted = grad_p * sqrt_p
        return weighted - (weighted.sum(dim=-1, keepdim=True) / sqrt_p.sum(dim=-1, keepdim=True)) * sqrt_p


def sparsemax(logits: torch.Tensor) -> torch.Tensor:
    """``argmin_{p in simplex} ||p - z||^2``. ``[..., E] -> [..., E]``, sparse, sums to 1. See ``SparsemaxFunction``."""
    return SparsemaxFunction.apply(_fp32(logits))


def entmax15(logits: torch.Tensor) -> torch.Tensor:
    """1.5-entmax ``p = [z/2 - tau]_+^2``. ``[..., E] -> [..., E]``, sparse, sums to 1. See ``Entmax15Function``."""
    return Entmax15Function.apply(_fp32(logits))


def softpick(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rectified softmax (Zuhri et al. 2025): ``p_i = relu(e^{z_i} - 1) / (sum_j |e^{z_j} - 1| + eps)``.

    ``[..., E] -> [..., E]``. Sum in [0, 1]; not shift-invariant (never max-normalize the logits before it).
    Stable form: numerator and denominator are both multiplied by ``e^{-m}``, ``m = max(max_j z_j, 0)``, so
    ``e_i = e^{z_i - m} - e^{-m}`` never overflows. For ``max z >= 0`` this is exactly the official code; a row with
    all ``z <= 0`` (including all ``-inf``) scores all zeros ("attend to nothing"), where clamping m at 0 avoids the
    ``e^{-m}`` overflow of the official form. ``-inf`` entries are excluded from the denominator.
    """
    if not 0 < eps < math.inf:
        raise ValueError(f"eps={eps}: expected a finite value > 0")
    z = _fp32(logits)
    m = z.amax(dim=-1, keepdim=True).clamp(min=0).detach()  # a rescaling: only moves eps, which is negligible
    e = torch.exp(z - m) - torch.exp(-m)
    denominator = torch.where(z == -math.inf, 0.0, e.abs()).sum(dim=-1, keepdim=True)
    return torch.relu(e) / (denominator + eps)


def ssmax(logits: torch.Tensor, s: float | torch.Tensor = 0.43, n: float | None = None) -> torch.Tensor:
    """Scalable-Softmax (Nakanishi 2025): ``p = softmax(s * log(n) * z)``, i.e. softmax at inverse temperature s log n.

    ``[..., E] -> [..., E]``, sums to 1. ``n`` defaults to E (the number of experts); ``n = 1`` gives uniform scores.
    ``s`` is a float > 0 or a 0-dim tensor (e.g. a learnable ``nn.Parameter``; it receives gradients, and its value is
    not checked, to avoid a device sync). 0.43 is the value of the paper's Fig. 1.
    """
    z = _fp32(logits)
    if isinstance(s, torch.Tensor):
        if s.dim() != 0:
            raise ValueError(f"s: expected a float or a 0-dim tensor, got shape {tuple(s.shape)}")
    elif not 0 < s < math.inf:
        raise ValueError(f"s={s}: expected a finite value > 0")
    n = z.shape[-1] if n is None else n
    if not 1 <= n < math.inf:
        raise ValueError(f"n={n}: expected a finite value >= 1")
    masked = z == -math.inf
    scaled = (z.masked_fill(masked, 0.0) * (s * math.log(n))).masked_fill(masked, -math.inf)  # avoids -inf * 0
    return torch.softmax(scaled, dim=-1)


def self_adjust_softmax(logits: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Self-Adjust Softmax (Zheng et al. 2025). ``[..., E] -> [..., E]``; neither form sums to 1 or is shift-invariant.

    ``normalized=False``: ``p = z * softmax(z)`` (can be negative).
    ``normalized=True``: ``p = (z - lo) / (hi - lo) * softmax(z)`` with ``lo = min(min z, 0)``, ``hi = max(max z, 0)``
    per row over unmasked entries, so ``0 <= p <= softmax(z)`` and ``sum p <= 1``; a row of zeros scores 0.
    Gradients flow through lo and hi as well (the formula, differentiated as written).
    """
    z = _fp32(logits)
    masked = z == -math.inf
    z_unmasked = z.masked_fill(masked, 0.0)  # masked entries have softmax 0; this avoids -inf * 0
    probs = torch.softmax(z, dim=-1)
    if not normalized:
        return z_unmasked * probs
    lo = z.masked_fill(masked, math.inf).amin(dim=-1, keepdim=True).clamp(max=0)
    hi = z.amax(dim=-1, keepdim=True).clamp(min=0)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))  # span == 0 only for an all-zero row: numerator is 0
    return (z_unmasked - lo) / span * probs  # masked entries: probs == 0


def adaptive_temperature(logits: torch.Tensor) -> torch.Tensor:
    """Adaptive temperature (Velickovic et al. 2024): ``p = softmax(beta(H) * z)`` with H the entropy of softmax(z).

    ``beta(H) = max(1, -0.037 H^4 + 0.481 H^3 - 2.3 H^2 + 4.917 H - 1.791)`` if H > 0.5 nats, else 1. ``beta >= 1``,
    so rows only sharpen; argmax and shift invariance are kept. ``[..., E] -> [..., E]``, sums to 1.
    The paper applies this at inference only; beta is computed without gradient (a per-row constant), so a training
    gradient is the softmax gradient at the sharpened logits.
    """
    z = _fp32(logits)
    with torch.no_grad():
        entropy = torch.special.entr(torch.softmax(z, dim=-1)).sum(dim=-1, keepdim=True)  # 0 log 0 = 0
        poly = torch.zeros_like(entropy)
        for coefficient in _ADAPTIVE_TEMPERATURE_POLY:  # Horner
            poly = poly * entropy + coefficient
        beta = torch.where(entropy > 0.5, poly.clamp(min=1.0), torch.ones_like(poly))
    return torch.softmax(z * beta, dim=-1)  # beta >= 1, so -inf * beta stays -inf


def dense_to_sparse(logits: torch.Tensor, activation: str = "tanh", temperature: float = 1.0) -> torch.Tensor:
    """Activation dense-to-sparse gate (Nguyen et al. 2024): ``p = softmax(activation(z) / temperature)``.

    The router's linear output goes through a nonlinearity before a tempered softmax; lowering the temperature
    anneals the gate from dense to sparse. ``activation`` is one of "tanh", "sigmoid", "gelu" (the paper only
    constrains it by linear-independence conditions). ``-inf`` logits stay masked. ``[..., E] -> [..., E]``, sums to 1.
    """
    _check_temperature(temperature)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {sorted(_ACTIVATIONS)}")
    z = _fp32(logits)
    masked = z == -math.inf
    activated = _ACTIVATIONS[activation](z.masked_fill(masked, 0.0)) / temperature
    return torch.softmax(activated.masked_fill(masked, -math.inf), dim=-1)


SCORE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": softmax,
    "sigmoid": sigmoid,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "softpick": softpick,
    "ssmax": ssmax,
    "self_adjust_softmax": self_adjust_softmax,
    "adaptive_temperature": adaptive_temperature,
    "dense_to_sparse": dense_to_sparse,
}


def score(logits: torch.Tensor, name: str, **kw) -> torch.Tensor:
    """Look up ``name`` in ``SCORE_FUNCTIONS`` and apply it: ``[..., E] -> [..., E]`` fp32 scores."""
    if name not in SCORE_FUNCTIONS:
        raise ValueError(f"score={name!r}: expected one of {sorted(SCORE_FUNCTIONS)}")
    return SCORE_FUNCTIONS[name](logits, **kw)
