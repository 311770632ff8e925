"""Mixture-of-Experts routing, layers, training, expert parallelism and routing reports.

Subpackages, by concern:

- ``moe.nn``: the single-device model code: gating functions, routing, routers, losses, experts, the MoE layer,
  SMEAR and Soft MoE, our transformer;
- ``moe.hf``: Hugging Face causal LMs (``model=hf``): their sparse MoE blocks as our layer, tokenizers, and the
  export back to a Hugging Face checkpoint (``python -m moe.hf export``);
- ``moe.dispatch``: single-device dispatchers (dropless, capacity, expert choice) and the ``Dispatcher`` protocol;
- ``moe.parallel``: expert parallelism applied from outside (process groups and collectives in ``comm``, the
  all-to-all dispatcher, Lightning's DDP and DeepSpeed strategies, DeepSpeed checkpoints);
- ``moe.kernels``: the fused Triton router and permutes beside their PyTorch references;
- ``moe.train``: the LightningModule, the training run, its checks and task evaluation;
- ``moe.data``: the embedded tasks, text corpora (``data=text``) and the stdlib source corpus built on them;
- ``moe.callbacks``: Lightning callbacks (routing statistics, router schedules, the run's loop control);
- ``moe.report``: routing statistics, pictures and the offline run report (``python -m moe.report``);
- ``moe.adapters``: what ``merging`` needs from our model (``MoEAdapter``) and the train-then-merge pipeline; the
  only modules of ``moe`` that import ``merging``.

``moe.config`` holds the typed configs, ``moe.export`` our checkpoints' export and loading. Modules that moved keep
their old import paths (``moe.routing``, ``moe.layers``, ``moe.nn.hf``, ...: ``MOVED``).
"""

from moe.nn.losses import load_balancing_loss, router_z_loss
from moe.nn.routing import RouterAux, RoutingPlan, RoutingResult, route, route_fused
from moe_merge_common.aliases import install

MOVED = {  # old module path -> where it lives now
    **{f"moe.{m}": f"moe.nn.{m}" for m in ("gating", "routing", "routers", "losses", "layers", "experts", "smear",
                                            "soft_moe", "model")},  # fmt: skip
    "moe.nn.hf": "moe.hf.blocks",
    "moe.lightning": "moe.train.module",
    "moe.training": "moe.train.run",
    "moe.checks": "moe.train.checks",
    "moe.evaluate": "moe.train.evaluate",
    "moe.pycode": "moe.data.pycode",
    "moe.stats": "moe.report.stats",
    "moe.plots": "moe.report.plots",
    "moe.merge_adapter": "moe.adapters.moe_adapter",
    "moe.pycode_adapter": "moe.adapters.pycode_adapter",
    "moe.pipeline": "moe.adapters.pipeline",
    "moe.dispatch.all_to_all": "moe.parallel.all_to_all",
}
install(MOVED)

__all__ = ["RouterAux", "RoutingPlan", "RoutingResult", "load_balancing_loss", "route", "route_fused", "router_z_loss"]
