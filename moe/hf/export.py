"""Export a ``model=hf`` model as a Hugging Face checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

Our layers' tensors go back under transformers' own names (``moe.hf.blocks.to_hf_state_dict``), into the
architecture's own model class built on the meta device (no second copy of the weights), cast back to the
checkpoint's dtype, and transformers writes the directory itself (``save_pretrained``: config.json,
generation_config.json, safetensors in its on-disk layout, e.g. Mixtral's per-expert ``w1/w2/w3``), with the
tokenizer's files. Casting fp32 -> bf16 of weights read from bf16 is exact, so an untrained round trip
HF -> ours -> HF gives every tensor back bit for bit.

A routing the architecture's config cannot express (``router=gumbel``, a sigmoid score on Mixtral, ...) is
refused (``routing_mismatch``): the export would not compute what was trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe.config import RouterConfig
from moe.hf.blocks import ARCHS, HFMoEBlock, arch_of, router_from_config, to_hf_state_dict
from moe_merge_common.outputs import output_lock, write_staged


def routing_mismatch(router: RouterConfig, config) -> list[str]:
    """What of ``router`` the architecture's config cannot express (empty: it can, after ``export_config``)."""
    if config.model_type not in ARCHS:
        return []
    native = router_from_config(config, router)
    bad = [f"router.{f}={getattr(router, f)!r} (the architecture has {getattr(native, f)!r})"
           for f in ("kind", "score", "order", "scaling", "n_group", "topk_group", "select_bias")
           if getattr(router, f) != getattr(native, f)]  # fmt: skip
    if router.score_kwargs:
        bad.append(f"router.score_kwargs={router.score_kwargs}")
    if arch_of(config).always_renormalize and not router.renormalize:
        bad.append("router.renormalize=false (the architecture always renormalises)")
    return bad


def export_problems(model) -> list[str]:
    """Why ``model`` cannot be written as a Hugging Face checkpoint of its (or, upcycled, its MoE) architecture."""
    if model.upcycled:
        from moe.hf import upcycled

        bad = upcycled.problems(model)
        return bad or routing_mismatch(upcycled.export_router(model), upcycled.export_config(model))
    return routing_mismatch(model.router_cfg, model.config)


def export_config(model):
    """The checkpoint's config with what training may change (k, renormalisation, dtype); an upcycled model's
    MoE architecture (``moe.hf.upcycled``)."""
    if model.upcycled:
        from moe.hf.upcycled import export_config as upcycled_config

        config = upcycled_config(model)
        config.dtype, config.use_cache = model.source_dtype, True
        return config
    config = model.config.__class__.from_dict(model.config.to_dict())
    if config.model_type in ARCHS:
        config.num_experts_per_tok = model.router_cfg.k
        if not arch_of(config).always_renormalize:  # Mixtral has no norm_topk_prob
            config.norm_topk_prob = model.router_cfg.renormalize
    config.dtype = model.source_dtype
    config.use_cache = True
    return config


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' in-memory names, our MoE layers converted back."""
    if model.upcycled:
        from moe.hf.upcycled import state_dict

        return state_dict(model)
    out: dict[str, torch.Tensor] = {}
    blocks = [(name, m) for name, m in model.hf.named_modules() if isinstance(m, HFMoEBlock)]
    for name, block in blocks:
        out |= {f"{name}.{k}": v for k, v in to_hf_state_dict(block.moe, model.config.model_type).items()}
    prefixes = tuple(f"{name}." for name, _ in blocks)
    out |= {k: v for k, v in model.hf.state_dict().items() if not k.startswith(prefixes)}
    return out


def native_model(model):
    """The architecture's own transformers model holding our weights (shared where the dtype already matches)."""
    from transformers import AutoModelForCausalLM

    bad = export_problems(model)
    if bad:
        raise ValueError(f"the {model.config.model_type} architecture cannot express this run's routing: "
                         f"{'; '.join(bad)}")  # fmt: skip
    config = export_config(model)
    with torch.device("meta"):
        native = AutoModelForCausalLM.from_config(config, dtype=model.source_dtype)
    state = {k: v.detach().to("cpu", model.source_dtype) for k, v in hf_state_dict(model).items()}
    own = native.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:  # never a silently re-initialised expert
        raise ValueError(f"export: the {config.model_type} model's tensors and ours differ: missing={missing[:8]} "
                         f"unexpected={unexpected[:8]}")  # fmt: skip
    native.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(native.named_buffers()):  # non-persistent buffers (rotary tables): rebuilt on load
        if buf.is_meta:
            parent, _, attr = name.rpartition(".")
            native.get_submodule(parent)._buffers[attr] = torch.empty_like(buf, device="cpu")
    native.tie_weights()
    return native


def save_pretrained(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``out_dir`` as a Hugging Face checkpoint (staged: a failure leaves it as it was); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = native_model(model)

    def write(stage: Path) -> Path:
        native.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        umask = os.umask(0)
        os.umask(umask)
        for f in stage.iterdir():  # transformers writes its shards through private temporary files (mode 600)
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        return stage / "config.json"

    with output_lock(out, "export"):
        write_staged(out, write)
    return out


def save_adapter(peft_model, out_dir: str | os.PathLike) -> Path:
    """Write the PEFT adapter directory (adapter_config.json, adapter_model.safetensors), staged; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(stage: Path) -> Path:
        peft_model.save_pretrained(stage, safe_serialization=True)
        return stage / "adapter_config.json"

    with output_lock(out, "export"):
        write_staged(out, write)
    return out
