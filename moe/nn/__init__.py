"""The single-device model code: gating functions (``gating``), routing a batch of logits (``routing``), the
router modules (``routers``), auxiliary losses (``losses``), expert MLPs (``experts``), the MoE layer
(``layers``), SMEAR and Soft MoE (``smear``, ``soft_moe``) and our transformer (``model``); Hugging Face models
are wrapped around our layer in ``moe.hf``. Nothing here imports ``torch.distributed``: parallelism is applied from
outside (``moe.parallel``)."""
