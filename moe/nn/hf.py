"""Interop with Hugging Face transformers sparse MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE).

``from_hf_sparse_block(block, config)`` builds our ``MoELayer`` from a transformers ``*SparseMoeBlock`` and its
model config; ``to_hf_state_dict(layer)`` gives the block's state dict back. Weight layouts (transformers >= 5):

    gate.weight [E, d]                  <-> router.weight
    experts.gate_up_proj [E, 2f, d]     <-> cat(w_gate, w_up) transposed ([E, d, f] each)
    experts.down_proj [E, d, f]         <-> w_down transposed ([E, f, d])
    shared_expert.{gate,up,down}_proj   <-> shared (Qwen2-MoE), shared_expert_gate.weight <-> shared_gate.weight

transformers itself is not imported here: the functions read the block's tensors and the config's attributes.
"""

from __future__ import annotations

import torch

from moe.config import MoEConfig, RouterConfig
from moe.nn.layers import MoELayer


def _config_fields(config) -> dict:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act={act!r}: our experts are SwiGLU, which needs 'silu'")
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not num_experts:
        raise ValueError("config: expected num_local_experts (Mixtral) or num_experts (Qwen-MoE)")
    d_ff = getattr(config, "moe_intermediate_size", None) or config.intermediate_size  # Qwen-MoE, else Mixtral
    return {
        "d_model": config.hidden_size,
        "num_experts": num_experts,
        "k": config.num_experts_per_tok,
        "d_ff": d_ff,
        "renormalize": bool(getattr(config, "norm_topk_prob", True)),  # Mixtral always renormalises
        "jitter": float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
    }


def from_hf_sparse_block(block: torch.nn.Module, config) -> MoELayer:
    """Our MoELayer holding the weights of a transformers sparse MoE block; outputs match the block's."""
    f = _config_fields(config)
    shared = getattr(block, "shared_expert", None)
    moe = MoEConfig(
        n_shared=1 if shared is not None else 0,
        shared_d_ff=shared.gate_proj.weight.shape[0] if shared is not None else 0,
        shared_gate=getattr(block, "shared_expert_gate", None) is not None,
    )
    router = RouterConfig(k=f["k"], renormalize=f["renormalize"], jitter=f["jitter"])
    layer = MoELayer(f["d_model"], f["d_ff"], f["num_experts"], router, moe, causal=False)
    sd = block.state_dict()
    gate_up = sd["experts.gate_up_proj"]
    ours = {
        "router.weight": sd["gate.weight"],
        "experts.w_gate": gate_up[:, : f["d_ff"]].transpose(1, 2),
        "experts.w_up": gate_up[:, f["d_ff"] :].transpose(1, 2),
        "experts.w_down": sd["experts.down_proj"].transpose(1, 2),
    }
    if shared is not None:
        ours["shared.gate_up.weight"] = torch.cat(
            [sd["shared_expert.gate_proj.weight"], sd["shared_expert.up_proj.weight"]]
        )
        ours["shared.down.weight"] = sd["shared_expert.down_proj.weight"]
        if moe.shared_gate:
            ours["shared_gate.weight"] = sd["shared_expert_gate.weight"]
    state = layer.state_dict()
    state.update({k: v.to(state[k].dtype).contiguous() for k, v in ours.items()})
    layer.load_state_dict(state)
    return layer.to(gate_up.dtype)


def to_hf_state_dict(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The transformers block state dict (keys as in ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``)."""
    sd = layer.state_dict()
    out = {
        "gate.weight": sd["router.weight"],
        "experts.gate_up_proj": torch.cat([sd["experts.w_gate"], sd["experts.w_up"]], dim=2).transpose(1, 2),
        "experts.down_proj": sd["experts.w_down"].transpose(1, 2),
    }
    if layer.shared is not None:
        gate, up = sd["shared.gate_up.weight"].chunk(2, dim=0)
        out |= {"shared_expert.gate_proj.weight": gate, "shared_expert.up_proj.weight": up,
                "shared_expert.down_proj.weight": sd["shared.down.weight"]}  # fmt: skip
        if layer.shared_gate is not None:
            out["shared_expert_gate.weight"] = sd["shared_gate.weight"]
    return {k: v.contiguous() for k, v in out.items()}
