"""Typed merge configuration, mirrored by ``conf/merge.yaml`` and ``conf/method/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

DATA_AWARE = ("divmerge", "pleas")  # merged by merging.divmerge / merging.pleas through the adapter, not the engine


@dataclass
class MethodConfig:
    """``name`` selects ``merging.METHODS[name]``; a parameter left at None takes the method's own default.

    Setting a parameter the method does not take is an error naming it. The names are those of the Python API.
    """

    name: str = "ties"
    lam: float | None = None  # scale of the merged task vector
    weights: list[float] | None = None  # one per fine-tuned model (PCB: per-task lambdas)
    density: float | None = None  # kept fraction (TIES trim; DELLA mean keep probability; DARE+TIES trim)
    scope: str | None = None  # where magnitudes are ranked: tensor | row | global (DELLA: row | tensor)
    sign: str | None = None  # sign election: total (mass) | frequency (vote count)
    weighted_sign: bool | None = None  # elect on w_t * tau_t (mergekit) instead of tau_t (TIES paper, PEFT)
    divisor: str | None = None  # disjoint mean divisor: weights | count
    seed: int | None = None  # random methods: with tensor name and model index, seeds each generator
    drop: float | None = None  # DARE drop rate p
    rescale: str | None = None  # DARE/DELLA: inverse | l1 | none
    combine: str | None = None  # DARE/DELLA: linear | ties
    epsilon: float | None = None  # DELLA half window of keep probabilities
    ratio: float | None = None  # PCB kept ratio r
    clamp_q: float | None = None  # PCB outlier clamp quantile
    eta: float | None = None  # STAR: percent of the nuclear norm kept
    svd: str | None = None  # STAR: exact | randomized
    rank: int | None = None  # STAR randomized SVD rank
    one_d: str | None = None  # STAR 1-D tensors: base | mean
    t: float | None = None  # SLERP interpolation factor (0 = the base, or models[0] of two; 1 = the last model)
    filter_wise: bool | None = None  # Model Stock: one ratio per row instead of per tensor
    gamma: float | None = None  # Breadcrumbs: fraction of the largest magnitudes dropped
    common_fraction: float | None = None  # Iso-CTS: share of the rank for the common subspace
    granularity: str | None = None  # DivMerge: layer | task (coefficients per layer or per task)
    divergence: str | None = None  # DivMerge: js | kl
    lr: float | None = None  # DivMerge: Adam learning rate
    epochs: int | None = None  # DivMerge: passes over the prompts
    batch_size: int | None = None  # DivMerge: prompts per step (None: 4 per task)
    init: float | None = None  # DivMerge: initial coefficients (None: 1/T)
    least_squares: bool | None = None  # PLeaS: refit the linear maps by least squares
    ridge: float | None = None  # PLeaS: relative ridge of the least-squares fits
    max_batches: int | None = None  # PLeaS: input batches per pass

    def params(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if k != "name" and v is not None}


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
    search: bool = False  # per-task lambdas (method.weights) by coordinate search on a validation split; needs tasks
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
    ConfigStore.instance().store(name="merge_schema", node=MergeConfig)
