"""Typed merge configuration, mirrored by ``conf/merge.yaml``; the ``method`` group is generated (``method_nodes``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

DATA_AWARE = ("divmerge", "pleas")  # merged by merging.divmerge / merging.pleas through the adapter, not the engine


@dataclass
class MethodConfig:
    """``name`` selects the method (``merging.METHODS[name]``, or the data-aware ``divmerge`` / ``pleas``);
    ``params`` holds its parameters by their Python names (``method.params.density=0.2``).

    Each ``method=<name>`` option is generated from the methods themselves (``method_nodes``: the registry's
    ``Param`` defaults, the data-aware functions' signatures), the only source of defaults; a name the method does
    not take, or a bad value, is refused naming it. ``None``: the method's own default."""

    name: str = "ties"
    params: dict[str, Any] = field(default_factory=dict)

    def arguments(self) -> dict[str, object]:
        """The parameters to pass: those set to a value (None leaves the method's default)."""
        return {k: v for k, v in self.params.items() if v is not None}


# the keyword parameters of the data-aware methods a config may set (the others are wired by the CLI)
DATA_AWARE_PARAMS = {
    "divmerge": ("granularity", "divergence", "lr", "epochs", "batch_size", "init", "seed"),
    "pleas": ("ratio", "least_squares", "ridge", "max_batches"),
}


def method_nodes() -> dict[str, dict[str, Any]]:
    """``{name: {"name": name, "params": {param: default}}}`` for every method, from the registry and the
    data-aware functions' signatures: the ``method`` config group (``register_configs``)."""
    import inspect

    from merging import METHODS
    from merging.divmerge import divmerge
    from merging.pleas import pleas

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    nodes = {name: {"name": name, "params": {k: plain(spec.default) for k, spec in m.params.items()}}
             for name, m in METHODS.items()}  # fmt: skip
    for name, fn in (("divmerge", divmerge), ("pleas", pleas)):
        sig = inspect.signature(fn)
        nodes[name] = {"name": name, "params": {k: plain(sig.parameters[k].default) for k in DATA_AWARE_PARAMS[name]}}
    return nodes


# Keys that were renamed: python -m merging names the replacement when an old spelling is given
RENAMED_PARAMS = ("lam", "weights", "density", "scope", "sign", "weighted_sign", "divisor", "seed", "drop", "rescale",
                  "combine", "epsilon", "ratio", "clamp_q", "eta", "svd", "rank", "one_d", "t", "filter_wise", "gamma",
                  "common_fraction", "granularity", "divergence", "lr", "epochs", "batch_size", "init",
                  "least_squares", "ridge", "max_batches")  # fmt: skip
RENAMED = {f"method.{k}": f"method.params.{k}" for k in RENAMED_PARAMS}


@dataclass
class AssembleConfig:
    """Build an MoE from N fine-tuned checkpoints: each model's experts become experts of the output."""

    enabled: bool = False
    router_init: str = "zero"  # zero | stats (mean MoE input of each model's tasks, needs tasks)
    k: int = 2  # top-k of the assembled router (capped at the number of experts)
    scale: float = 1.0  # router_init=stats: norm of each router row


@dataclass
class MergeConfig:
    base: str | None = None  # the pre-trained checkpoint the task vectors are taken against (PLeaS: none)
    models: list[str] = MISSING  # fine-tuned checkpoints (safetensors, HF-style or export dirs, .ckpt)
    out: str = MISSING  # output directory (weights, the base's config.json and tokenizer files, merge_report.json)
    method: MethodConfig = field(default_factory=MethodConfig)
    out_dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None = the base tensor's dtype
    overwrite: bool = False  # replace existing merged weights in out
    progress: bool = True
    exclude: list[str] = field(default_factory=list)  # regexes of tensor names copied from the base
    vectors: str = "method"  # 1-D tensors: method | mean | base
    vocab: str = "crop"  # embedding / head with another row count: crop | base
    experts: bool = True  # merge each expert of batched [E, ...] expert tensors as its own tensor
    router_source: str = "merge"  # router weights: merge | base | a model index "0".."N-1"
    shard_size: str = "5GB"  # largest output shard
    workers: int | None = None  # tensors merged at once, one thread each (None: torch's thread count)
    report: bool = True  # write merge_report.json beside the weights
    # NaN/inf in an input tensor, or a result overflowing out_dtype, is an error naming the tensor and the model;
    # true merges them anyway and counts them in merge_report.json
    allow_nonfinite: bool = False
    eval: bool = False  # evaluate the merged model (and the inputs) on every task of the embedded data
    # The task(s) each model was fine-tuned on ("sort", or "copy+add"), one entry per model: the normalized accuracy
    # of a task divides by its own fine-tune (None: by the best model on that task); assemble's router_init=stats.
    tasks: list[str] | None = None
    # per-task lambdas (method.params.weights) by coordinate search on a validation split; needs tasks
    search: bool = False
    # The model-specific side (evaluation, search, router stats, task data, writing divmerge/pleas outputs): a
    # merging.protocols.TaskAdapter built by hydra.utils.instantiate. `data` is opaque here: the adapter reads it.
    adapter: Any = field(default_factory=lambda: {"_target_": "moe.adapters.moe_adapter.MoEAdapter"})
    data: Any = field(default_factory=dict)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)


def register_configs() -> None:
    """The merge schema in Hydra's ConfigStore and the resolver conf/merge.yaml's help uses (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from moe_merge_common.cli import config_groups_listing, register_resolver

    register_resolver("config_groups", config_groups_listing)
    cs = ConfigStore.instance()
    cs.store(name="merge_schema", node=MergeConfig)
    for name, node in method_nodes().items():  # method=<name>: generated, so the registry is the only default
        cs.store(group="method", name=name, node=node)
