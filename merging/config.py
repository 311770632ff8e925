"""Typed merge configuration, mirrored by ``conf/merge.yaml`` and ``conf/method/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from moe.config import DataConfig


@dataclass
class MethodConfig:
    """``name`` selects ``merging.METHODS[name]``; a parameter left at None takes the method's own default."""

    name: str = "ties"
    lam: float | None = None  # scale of the merged task vector
    weights: list[float] | None = None  # one per fine-tuned model
    density: float | None = None  # kept fraction when trimming (TIES)

    def params(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if k != "name" and v is not None}


@dataclass
class MergeConfig:
    base: str = MISSING  # the pre-trained checkpoint the task vectors are taken against
    models: list[str] = MISSING  # fine-tuned checkpoints
    out: str = MISSING  # output directory (model.safetensors + the base's config.json)
    method: MethodConfig = field(default_factory=MethodConfig)
    out_dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None = the base tensor's dtype
    overwrite: bool = False  # replace an existing model.safetensors in out
    progress: bool = True
    eval: bool = False  # evaluate the merged model (and the inputs) on every task of the embedded data
    data: DataConfig = field(default_factory=DataConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="merge_schema", node=MergeConfig)
