"""``model=hf``: a local Hugging Face causal LM whose sparse MoE blocks are replaced by our ``MoELayer``.

``HFCausalLM(model, router)`` is built like our own model (``model._target_``), so routers, dispatchers, expert
parallelism, DeepSpeed, routing statistics and resume apply unchanged. Its forward maps tokens ``[B, S]`` to
``(logits [B, S, V], one RoutingResult per MoE layer)``. Nothing is downloaded: ``local_files_only`` everywhere.

With ``router=from_model`` (conf/model/hf.yaml's default) the layers route as the checkpoint's config says
(``moe.hf.blocks.router_from_config``), so before any training step the logits equal transformers' own (fp32,
eval). Any other ``router=...`` replaces that routing in every layer, with the checkpoint's weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe.config import ModelConfig, RouterConfig
from moe.hf.blocks import ARCHS, HFMoEBlock, arch_of, from_hf_sparse_block, router_from_config
from moe.nn.routers import Router
from moe.nn.routing import RoutingResult

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
# config attributes that make an architecture an MoE one: refused unless ARCHS converts its blocks
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("model=hf needs transformers: pip install -e '.[hf]'") from e
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    return transformers


def source(cfg: ModelConfig) -> tuple[Path, dict[str, Any]]:
    """The checked directory ``model.path`` and the keyword arguments every ``from_pretrained`` call takes."""
    if not cfg.path:
        raise ValueError("model.path: required by model=hf (a local Hugging Face model directory)")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.path={cfg.path}: no such directory (model=hf reads local files only)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file={cfg.gguf_file}: no such file in {path}")
        kwargs["gguf_file"] = cfg.gguf_file
    elif not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={cfg.path}: no config.json (a Hugging Face model directory has one; "
                                "for a GGUF file set model.gguf_file=NAME)")  # fmt: skip
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    return path, kwargs


def load_config(cfg: ModelConfig):
    """The checkpoint's ``transformers`` config (``AutoConfig``)."""
    path, kwargs = source(cfg)
    return _transformers().AutoConfig.from_pretrained(path, **kwargs)


def check_architecture(config) -> None:
    """Refuse an MoE architecture whose blocks we do not convert (they would train without our routing)."""
    if config.model_type not in ARCHS and any(getattr(config, a, None) for a in _EXPERT_COUNTS):
        raise ValueError(f"model.path: config.model_type={config.model_type!r} is an MoE architecture whose blocks "
                         f"moe.hf does not convert; supported: {sorted(ARCHS)}")  # fmt: skip


class HFCausalLM(nn.Module):
    """A transformers ``AutoModelForCausalLM`` (``self.hf``) with our ``MoELayer`` in each sparse MoE block.

    ``router_cfg``: the routing the layers use (``router=from_model`` resolved against the checkpoint's config).
    Dense architectures (Llama, Qwen2, SmolLM2, ...) load too, with no MoE layer (``routings`` is empty).
    """

    def __init__(self, cfg: ModelConfig, router: RouterConfig):
        super().__init__()
        path, kwargs = source(cfg)
        tf = _transformers()
        config = tf.AutoConfig.from_pretrained(path, **kwargs)
        check_architecture(config)
        self.cfg, self.config = cfg, config
        self.source_dtype = getattr(config, "dtype", None) or torch.float32  # the export casts back to it
        if isinstance(self.source_dtype, str):
            self.source_dtype = getattr(torch, self.source_dtype)
        is_moe = config.model_type in ARCHS
        if router.kind == "from_model":
            router = router_from_config(config, router) if is_moe else router
        self.router_cfg = router
        self.hf = tf.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[cfg.dtype], **kwargs)
        self.hf.config.use_cache = False
        if is_moe:
            block_name = arch_of(config).block
            names = [name for name, m in self.hf.named_modules() if type(m).__name__ == block_name]
            for name in names:  # one block at a time: its tensors are freed as soon as our layer replaces it
                parent, _, attr = name.rpartition(".")
                owner = self.hf.get_submodule(parent)
                setattr(owner, attr, HFMoEBlock(from_hf_sparse_block(getattr(owner, attr), config, router)))
        self.upcycled = cfg.upcycle.num_experts > 0
        if self.upcycled:
            self.router_cfg = router = self._upcycle(cfg, router, is_moe)
        if cfg.lora.r > 0:
            self.hf = self._lora(cfg.lora)
        self.hf.train()  # from_pretrained leaves it in eval mode; a module starts in training mode
        self.moe_blocks = [m for m in self.hf.modules() if isinstance(m, HFMoEBlock)]
        for name, m in self.named_modules():
            if isinstance(m, Router):  # routers name their layer in errors
                m.layer_name = name
        if cfg.vocab_size > self.hf.config.vocab_size:
            raise ValueError(f"model.path: the data's vocabulary ({cfg.vocab_size}) exceeds the model's "
                             f"({self.hf.config.vocab_size})")  # fmt: skip

    def _upcycle(self, cfg: ModelConfig, router: RouterConfig, is_moe: bool) -> RouterConfig:
        """``model.upcycle``: the dense MLPs become our layers (``moe.upcycle.upcycle``); returns their routing."""
        from moe.upcycle import upcycle

        if is_moe:
            raise ValueError(f"model.upcycle.num_experts={cfg.upcycle.num_experts}: model.path is already an MoE "
                             f"({self.config.model_type}); upcycling converts dense models")  # fmt: skip
        if router.kind == "from_model":  # a dense checkpoint describes no routing: renormalised softmax top-k
            router = replace(router, kind="topk", score="softmax", score_kwargs={}, renormalize=True,
                             order="score_then_topk")  # fmt: skip
        up = cfg.upcycle
        needs_data = up.router_init == "hidden" or (up.method == "split" and up.split == "cluster")
        return upcycle(self.hf, up.num_experts, up.k, method=up.method, layers=up.layers, drop_ratio=up.drop_ratio,
                       split=up.split, granularity=up.granularity, router_init=up.router_init,
                       router_std=up.router_std, prompts=up.prompts, seed=up.seed, exact=up.exact, router=router,
                       moe=cfg.moe, tokenizer=self.tokenizer(cfg) if needs_data else None)  # fmt: skip

    def _lora(self, lora):
        """The model under PEFT LoRA adapters (``model.lora``): the base frozen, the adapters trained."""
        try:
            import peft
        except ImportError as e:
            raise ImportError("model.lora needs peft: pip install peft") from e
        if lora.target_parameters and lora.dropout:
            raise ValueError("model.lora.dropout: must be 0 with model.lora.target_parameters (PEFT's ParamWrapper)")
        if not lora.target and not lora.target_parameters:
            raise ValueError("model.lora: r > 0 needs model.lora.target or model.lora.target_parameters")
        config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                                 target_modules=list(lora.target),
                                 target_parameters=list(lora.target_parameters) or None)  # fmt: skip
        return peft.get_peft_model(self.hf, config)

    @classmethod
    def tokenizer(cls, cfg: ModelConfig):
        """The checkpoint's own tokenizer (``AutoTokenizer`` from ``model.path``, or from the GGUF file)."""
        path, kwargs = source(cfg)
        return _transformers().AutoTokenizer.from_pretrained(path, **kwargs)

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[RoutingResult]]:
        for block in self.moe_blocks:
            block.routing = None
        logits = self.hf(input_ids=tokens_BS, use_cache=False).logits
        return logits, [b.routing for b in self.moe_blocks if b.routing is not None]

    def export(self, out_dir, tokenizer=None, adapter_dir=None) -> Path:
        """Write a Hugging Face checkpoint directory (``moe.hf.export.save_pretrained``); returns its path. A
        routing the architecture cannot express (``export_problems``) is written in our own format instead
        (``model.safetensors`` + ``config.json``, ``moe.export.load_model`` reads it), with a warning. ``tokenizer``:
        default the source's own. With ``model.lora``: the merged model, and the PEFT adapter directory in
        ``adapter_dir`` (default ``<out_dir>_adapter`` beside it: what ``python -m merging`` reads)."""
        from moe.export import export_weights
        from moe.hf.export import save_adapter, save_pretrained

        if self.cfg.lora.r > 0:  # the adapter beside the export, then the merged model (on a copy)
            out_dir = Path(out_dir)
            save_adapter(self.hf, adapter_dir or out_dir.parent / f"{out_dir.name}_adapter")
            merged = copy.deepcopy(self)
            merged.hf = merged.hf.merge_and_unload()
            merged.cfg = replace(self.cfg, lora=replace(self.cfg.lora, r=0))
            return merged.export(out_dir, tokenizer)
        if self.export_problems:
            log.warning("export: the %s architecture cannot express this routing (%s): writing our own format",
                        self.config.model_type, "; ".join(self.export_problems))
            return export_weights(self, out_dir).parent
        if tokenizer is None:
            try:
                tokenizer = self.tokenizer(self.cfg)
            except (OSError, ValueError) as e:  # a source without tokenizer files: the export has none either
                log.warning("export: no tokenizer written (%s: %s)", self.cfg.path, e)
        return save_pretrained(self, out_dir, tokenizer)

    @property
    def export_problems(self) -> list[str]:
        """What of the routing a Hugging Face config of this architecture cannot express (empty: none)."""
        from moe.hf.export import export_problems

        return export_problems(self)
