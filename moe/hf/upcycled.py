"""The Hugging Face MoE architecture of an upcycled dense model (``model.upcycle``), for the export.

- Llama / Mistral -> ``MixtralForCausalLM``. Mixtral has no dense layer: a layer left dense is written as E
  copies of its MLP with a zero router, which renormalised top-k makes exact (it needs f_e = d_ff, so a partially
  upcycled ``split`` is refused). Mixtral has no routed scaling: ``split``'s factor is folded into ``w2``.
- Qwen2 -> ``Qwen2MoeForCausalLM``: dense layers stay dense (``mlp_only_layers``), ``norm_topk_prob`` follows
  ``router.renormalize``, and its always-present shared expert has width 0 (it adds exactly 0).

Everything else (attention, norms, embeddings, RoPE) maps one to one, so the export loads with our logits.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moe.hf.blocks import HFMoEBlock, to_hf_state_dict

TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}
_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
           "initializer_range")  # fmt: skip


def moe_blocks(model) -> dict[int, HFMoEBlock]:
    return {i: layer.mlp for i, layer in enumerate(model.hf.model.layers) if isinstance(layer.mlp, HFMoEBlock)}


def problems(model) -> list[str]:
    """Why this upcycled model cannot be written as its target architecture (empty: it can)."""
    c, blocks = model.config, moe_blocks(model)
    if c.model_type not in TARGETS:
        return [f"an upcycled {c.model_type!r} has no Hugging Face MoE architecture here (llama, mistral -> mixtral; "
                "qwen2 -> qwen2_moe)"]  # fmt: skip
    out = []
    r = model.router_cfg
    if r.kind != "topk" or r.score != "softmax" or r.order != "score_then_topk" or r.score_kwargs:
        out.append(f"router {r.kind}/{r.score}/{r.order}: the architecture routes by softmax top-k")
    if TARGETS[c.model_type] == "mixtral":
        if not r.renormalize:
            out.append("router.renormalize=false (Mixtral always renormalises)")
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            out.append("attention or MLP biases (Mixtral has none)")
        f_e = next(iter(blocks.values())).moe.experts.w_gate.shape[2]
        if len(blocks) < c.num_hidden_layers and f_e != c.intermediate_size:
            out.append("a split upcycle of some layers only: Mixtral writes dense layers as copies of width d_ff")
    return out


def export_config(model):
    import transformers as tf

    c, blocks = model.config, moe_blocks(model)
    first = next(iter(blocks.values())).moe
    E, f_e = first.num_experts, first.experts.w_gate.shape[2]
    common = {k: getattr(c, k) for k in _COMMON if getattr(c, k, None) is not None}
    if TARGETS[c.model_type] == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=f_e, num_local_experts=E,
                                  num_experts_per_tok=model.router_cfg.k, sliding_window=getattr(c, "sliding_window",
                                                                                                 None))  # fmt: skip
    else:
        dense = [i for i in range(c.num_hidden_layers) if i not in blocks]
        config = tf.Qwen2MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=f_e,
                                   shared_expert_intermediate_size=0, num_experts=E,
                                   num_experts_per_tok=model.router_cfg.k, norm_topk_prob=model.router_cfg.renormalize,
                                   mlp_only_layers=dense, decoder_sparse_step=1, use_sliding_window=False)  # fmt: skip
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    return config


def export_router(model):
    """The routing as the target writes it: ``split``'s scaling folded into the experts' down projections."""
    return replace(model.router_cfg, scaling=1.0)


def state_dict(model) -> dict[str, torch.Tensor]:
    """The target architecture's tensors (in-memory names) from the upcycled model's."""
    target, blocks = TARGETS[model.config.model_type], moe_blocks(model)
    prefixes = tuple(f"model.layers.{i}.mlp." for i in blocks)
    out = {k: v for k, v in model.hf.state_dict().items() if not k.startswith(prefixes)}
    scaling = model.router_cfg.scaling
    E = next(iter(blocks.values())).moe.num_experts
    for i, block in blocks.items():
        sd = to_hf_state_dict(block.moe, target)
        sd["experts.down_proj"] = sd["experts.down_proj"] * scaling if scaling != 1.0 else sd["experts.down_proj"]
        d = sd["gate.weight"].shape[1]
        if target == "qwen2_moe":  # the shared expert every Qwen2-MoE block has: width 0, gate 0
            z = sd["gate.weight"].new_zeros
            sd |= {"shared_expert.gate_proj.weight": z(0, d), "shared_expert.up_proj.weight": z(0, d),
                   "shared_expert.down_proj.weight": z(d, 0), "shared_expert_gate.weight": z(1, d)}  # fmt: skip
        out |= {f"model.layers.{i}.mlp.{k}": v for k, v in sd.items()}
    if target == "mixtral":  # dense layers as E copies and a zero router
        for i in range(model.config.num_hidden_layers):
            if i in blocks:
                continue
            p = f"model.layers.{i}.mlp."
            gate, up, down = (out.pop(f"{p}{n}_proj.weight") for n in ("gate", "up", "down"))
            out[f"{p}gate.weight"] = gate.new_zeros(E, gate.shape[1])
            out[f"{p}experts.gate_up_proj"] = torch.cat([gate, up]).unsqueeze(0).expand(E, -1, -1).contiguous()
            out[f"{p}experts.down_proj"] = down.unsqueeze(0).expand(E, -1, -1).contiguous()
    return out
