"""Hugging Face sparse MoE blocks as our ``MoELayer``, and back (transformers >= 5 in-memory layouts).

``ARCHS`` names, per ``config.model_type``, the block class and how it routes. ``from_hf_sparse_block(block,
config)`` builds our layer holding the block's tensors; ``to_hf_state_dict(layer, model_type)`` gives them back,
bit for bit. Weight layouts:

    gate.weight [E, d]                      <-> router.weight
    gate.e_score_correction_bias [E]        <-> router.expert_bias (DeepSeek-V3: selection only)
    experts.gate_up_proj [E, 2f, d]         <-> cat(w_gate, w_up) transposed ([E, d, f] each; gate rows first)
    experts.down_proj [E, d, f]             <-> w_down transposed ([E, f, d])
    shared_expert.{gate,up,down}_proj       <-> shared (Qwen2-MoE), shared_expert_gate.weight <-> shared_gate.weight
    shared_experts.{gate,up,down}_proj      <-> shared (DeepSeek-V3, ungated)

transformers itself is not imported here: the functions read the block's tensors and the config's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from moe.config import MoEConfig, RouterConfig
from moe.nn.layers import MoELayer
from moe.nn.routers import build_router
from moe.nn.routing import RoutingResult


@dataclass(frozen=True)
class Arch:
    """How one transformers MoE architecture routes. ``shared``: the attribute of its shared expert (or None);
    ``always_renormalize``: the top-k weights are renormalised whatever ``norm_topk_prob`` says (Mixtral)."""

    block: str
    score: str = "softmax"
    shared: str | None = None
    always_renormalize: bool = False


ARCHS = {
    "mixtral": Arch("MixtralSparseMoeBlock", always_renormalize=True),
    "qwen2_moe": Arch("Qwen2MoeSparseMoeBlock", shared="shared_expert"),
    "qwen3_moe": Arch("Qwen3MoeSparseMoeBlock"),
    "olmoe": Arch("OlmoeSparseMoeBlock"),
    "deepseek_v3": Arch("DeepseekV3MoE", score="sigmoid", shared="shared_experts"),
}


def arch_of(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"config.model_type={model_type!r}: no sparse MoE block we convert; supported: "
                         f"{sorted(ARCHS)} (a dense model has no MoE layer to route)")  # fmt: skip
    return ARCHS[model_type]


def num_experts(config) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError("config: expected num_local_experts (Mixtral), num_experts (Qwen-MoE, OLMoE) or n_routed_experts")


def expert_width(config) -> int:
    """d_ff of one routed expert: ``moe_intermediate_size`` (Qwen-MoE, DeepSeek), else ``intermediate_size``."""
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def router_from_config(config, base: RouterConfig | None = None) -> RouterConfig:
    """The routing ``config`` describes, on top of ``base`` (its losses, ``impl``, ...): score, k, renormalisation,
    scaling, groups and the selection bias. With it our layer computes what the transformers block computes."""
    arch, base = arch_of(config), base or RouterConfig()
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act={act!r}: our experts are SwiGLU, which needs 'silu'")
    k = int(config.num_experts_per_tok)
    renormalize = arch.always_renormalize or bool(getattr(config, "norm_topk_prob", False))
    jitter = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
    fields = dict(kind="topk", score=arch.score, score_kwargs={}, k=k, renormalize=renormalize,
                  order="score_then_topk", jitter=jitter)  # fmt: skip
    if arch.score == "sigmoid":  # DeepSeek-V3: groups, routed_scaling_factor, e_score_correction_bias
        fields |= dict(scaling=float(config.routed_scaling_factor), n_group=int(config.n_group),
                       topk_group=int(config.topk_group), select_bias=True)  # fmt: skip
    return replace(base, **fields)


def moe_config(block: nn.Module, config) -> MoEConfig:
    arch = arch_of(config)
    shared = getattr(block, arch.shared, None) if arch.shared else None
    return MoEConfig(
        n_shared=1 if shared is not None else 0,
        shared_d_ff=shared.gate_proj.weight.shape[0] if shared is not None else 0,
        shared_gate=getattr(block, "shared_expert_gate", None) is not None,
    )


def from_hf_sparse_block(block: nn.Module, config, router: RouterConfig | None = None) -> MoELayer:
    """Our MoELayer holding the weights of a transformers sparse MoE block, in the block's dtype. With ``router``
    None (or ``router_from_config(config)``), its outputs match the block's."""
    arch = arch_of(config)
    router = router if router is not None else router_from_config(config)
    d_ff, E = expert_width(config), num_experts(config)
    if not 1 <= router.k <= E:
        raise ValueError(f"router.k={router.k}: expected 1 <= k <= {E} (the checkpoint's experts)")
    sd = block.state_dict()
    gate_up = sd["experts.gate_up_proj"]
    ours = {
        "router.weight": sd["gate.weight"],
        "experts.w_gate": gate_up[:, :d_ff].transpose(1, 2),
        "experts.w_up": gate_up[:, d_ff:].transpose(1, 2),
        "experts.w_down": sd["experts.down_proj"].transpose(1, 2),
    }
    if "gate.e_score_correction_bias" in sd:
        ours["router.expert_bias"] = sd["gate.e_score_correction_bias"]  # kept fp32, as DeepSeek-V3 does
    moe = moe_config(block, config)
    if arch.shared and moe.n_shared:
        p = arch.shared
        ours["shared.gate_up.weight"] = torch.cat([sd[f"{p}.gate_proj.weight"], sd[f"{p}.up_proj.weight"]])
        ours["shared.down.weight"] = sd[f"{p}.down_proj.weight"]
        if moe.shared_gate:
            ours["shared_gate.weight"] = sd["shared_expert_gate.weight"]
    return layer_from_tensors(config.hidden_size, d_ff, E, router, moe, ours, gate_up.dtype, type(block).__name__)


def layer_from_tensors(d_model: int, d_ff: int, num_experts: int, router: RouterConfig, moe: MoEConfig,
                       tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> MoELayer:  # fmt: skip
    """Our MoELayer holding ``tensors`` (its state-dict names), in ``dtype`` (an ``expert_bias`` stays fp32).

    The layer is built on the meta device and the tensors assigned: no random init of experts about to be
    replaced, no second copy. What ``tensors`` lacks (the router's buffers, a noisy router's noise weights, ...)
    comes from a router built the usual way, which is small (E x d); anything else missing is an error."""
    with torch.device("meta"):
        layer = MoELayer(d_model, d_ff, num_experts, router, moe, causal=True)
    fresh = build_router(d_model, num_experts, router).to(dtype)
    extra = {f"router.{k}": v.detach() for k, v in fresh.state_dict(keep_vars=True).items()}
    missing = [k for k in layer.state_dict() if k not in tensors and k not in extra]
    if missing:
        raise ValueError(f"{where}: our layer has tensors it does not provide: {missing}")
    state = {k: tensors[k].to(torch.float32 if k == "router.expert_bias" else dtype).contiguous() if k in tensors
             else extra[k] for k in layer.state_dict()}  # fmt: skip
    layer.load_state_dict(state, assign=True)
    for name, buf in fresh.named_buffers():  # the non-persistent ones (counts) are in no state dict
        if layer.router.get_buffer(name).is_meta:
            owner, _, attr = name.rpartition(".")
            layer.router.get_submodule(owner)._buffers[attr] = buf
    return layer


def to_hf_state_dict(layer: MoELayer, model_type: str = "mixtral") -> dict[str, torch.Tensor]:
    """The transformers block's state dict (keys as in ``ARCHS[model_type].block``), from our layer's tensors."""
    arch = ARCHS[model_type]
    sd = layer.state_dict()
    out = {
        "gate.weight": sd["router.weight"],
        "experts.gate_up_proj": torch.cat([sd["experts.w_gate"], sd["experts.w_up"]], dim=2).transpose(1, 2),
        "experts.down_proj": sd["experts.w_down"].transpose(1, 2),
    }
    if arch.score == "sigmoid":
        out["gate.e_score_correction_bias"] = sd["router.expert_bias"]
    if layer.shared is not None:
        p = arch.shared or "shared_expert"
        gate, up = sd["shared.gate_up.weight"].chunk(2, dim=0)
        out |= {f"{p}.gate_proj.weight": gate, f"{p}.up_proj.weight": up,
                f"{p}.down_proj.weight": sd["shared.down.weight"]}  # fmt: skip
        if layer.shared_gate is not None:
            out["shared_expert_gate.weight"] = sd["shared_gate.weight"]
    return {k: v.contiguous() for k, v in out.items()}


class HFMoEBlock(nn.Module):
    """Our ``MoELayer`` in the place of a transformers sparse MoE block: ``hidden [B, S, d] -> [B, S, d]``, as the
    decoder layer calls it; the routing result of the last call is kept in ``routing`` (``moe.hf.HFCausalLM``
    returns them with the logits)."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.routing: RoutingResult | None = None

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD, self.routing = self.moe(hidden_BSD)
        return y_BSD
