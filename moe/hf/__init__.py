"""Hugging Face causal LMs in our training (``model=hf``) and back out as Hugging Face checkpoints.

- ``moe.hf.blocks``: transformers' sparse MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) as our
  ``MoELayer`` and back, bit for bit; ``router_from_config``: the routing a checkpoint's config describes;
- ``moe.hf.model``: ``HFCausalLM``, the transformers model with our layers, built from ``model.path``;
- ``moe.hf.export``: ``save_pretrained`` of such a model, what ``AutoModelForCausalLM.from_pretrained`` loads;
- ``python -m moe.hf export CKPT OUT``: the same from a run's ``.ckpt`` or DeepSpeed checkpoint.

transformers is imported only when a model is built or exported (``pip install -e '.[hf]'``).
"""

from moe.hf.blocks import ARCHS, HFMoEBlock, from_hf_sparse_block, router_from_config, to_hf_state_dict

__all__ = ["ARCHS", "HFMoEBlock", "from_hf_sparse_block", "router_from_config", "to_hf_state_dict"]
