"""Model weights as ``model.safetensors`` + ``config.json``; loading from exports and Lightning checkpoints.

Checkpoints are read with ``weights_only=True``: a pickle smuggled into a ``.ckpt`` is never executed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from hydra.utils import get_class
from safetensors.torch import save_file
from torch import nn

from moe.config import (
    ExpertChoiceConfig,
    GumbelConfig,
    LoraConfig,
    ModelConfig,
    MoEConfig,
    NoisyTopKConfig,
    RouterConfig,
    UpcycleConfig,
    upgrade_saved,
)
from moe.nn.model import MoETransformer
from moe_merge_common.io import WEIGHTS_NAME

CONFIG_NAME = "config.json"


def atomic_write(path: Path, write) -> None:
    """Run ``write(tmp_path)`` then rename over ``path``, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@runtime_checkable
class PretrainedExport(Protocol):
    """A model that writes its own export (``moe.hf.model.HFCausalLM``: a Hugging Face checkpoint directory)."""

    def export(self, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path: ...


def export_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """The model's export in ``out_dir``: its own (``PretrainedExport``), else ``model.safetensors`` +
    ``config.json``; returns the weights path, or the directory of a model's own export."""
    if isinstance(model, PretrainedExport):
        return model.export(out_dir, tokenizer)
    return export_weights(model, out_dir)


def export_weights(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (``model.cfg``, ``model.router_cfg``);
    returns the weights path."""
    out = Path(out_dir)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    config = {"model": asdict(model.cfg), "router": asdict(model.router_cfg)}
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    return out / WEIGHTS_NAME


def _from_dict(cls, data: dict, where: str):
    """Rebuild a (possibly nested) config dataclass from its ``asdict`` form, naming unknown keys."""
    if cls is RouterConfig:
        data = upgrade_saved("router", data)  # saved before the router knobs were nested by kind
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    nested = {"moe": MoEConfig, "noisy_topk": NoisyTopKConfig, "gumbel": GumbelConfig,
              "expert_choice": ExpertChoiceConfig, "upcycle": UpcycleConfig, "lora": LoraConfig}  # fmt: skip
    return cls(**{k: _from_dict(nested[k], v, f"{where}.{k}") if k in nested and isinstance(v, dict) else v
                  for k, v in data.items()})  # fmt: skip


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, RouterConfig]:
    """Parse an exported ``config.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "model" not in data and ("model_type" in data or "architectures" in data):
            raise ValueError(f"{path}: a Hugging Face model config ({data.get('model_type')!r}), not one of our "
                             f"exports: train it with model=hf model.path={path.parent}")  # fmt: skip
        return _from_dict(ModelConfig, data["model"], f"{path}:model"), _from_dict(
            RouterConfig, data["router"], f"{path}:router"
        )
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not an exported model config ({e})") from e


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Weights (without the Lightning ``model.`` prefix) and, when the file records it, the architecture."""

    path: Path
    state: dict[str, torch.Tensor]
    model: ModelConfig | None
    router: RouterConfig | None = None


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a ``.safetensors`` file, an export (or HF-sharded) directory, or a Lightning ``.ckpt``
    (``weights_only=True``), through ``moe_merge_common.io.Checkpoint``: the one checkpoint reader of both packages;
    or a
    DeepSpeed checkpoint directory (``trainer=deepspeed``'s ``.ckpt``), every expert gathered
    (``moe.parallel.ds_checkpoint``)."""
    from moe.parallel.ds_checkpoint import is_deepspeed_checkpoint, model_weights, read_deepspeed_checkpoint
    from moe_merge_common.io import Checkpoint, StateDictFile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if is_deepspeed_checkpoint(path):  # Lightning's DeepSpeedStrategy saves a .ckpt as such a directory
        state, extra = read_deepspeed_checkpoint(path)
        model, router = _hparams_configs(extra.get("hyper_parameters") or {}, path)
        return LoadedCheckpoint(path, model_weights(state), model, router)
    if path.is_file() and path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{path}: expected a .safetensors file, a .ckpt file or an export directory")
    try:
        ck = Checkpoint(path)
    except FileNotFoundError as e:  # a directory without weights
        raise FileNotFoundError(f"{path / WEIGHTS_NAME}: no such checkpoint") from e
    if path.suffix == ".ckpt":
        f = ck.files[path.name]
        if not (isinstance(f, StateDictFile) and f.lightning):
            raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        model, router = _hparams_configs(ck.hparams, path)
    else:
        config = ck.folder / CONFIG_NAME
        model, router = read_config(config) if config.exists() else (None, None)
    where = path / WEIGHTS_NAME if path.is_dir() and (path / WEIGHTS_NAME).is_file() else path
    return LoadedCheckpoint(where, {name: ck.read(name) for name in ck.names}, model, router)


def _hparams_configs(hparams: dict, path: Path) -> tuple[ModelConfig | None, RouterConfig | None]:
    """The model and router configs a checkpoint's ``hyper_parameters`` record (None where absent)."""
    model, router = hparams.get("model"), hparams.get("router")
    return (_from_dict(ModelConfig, dict(model), f"{path}:hyper_parameters.model") if model else None,
            _from_dict(RouterConfig, dict(router), f"{path}:hyper_parameters.router") if router else None)


def load_weights_into(model: MoETransformer, ckpt: LoadedCheckpoint) -> None:
    """Copy ``ckpt``'s weights into ``model``; names and shapes must match exactly."""
    state, own = ckpt.state, model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shape = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{ckpt.path}: does not fit the model: missing={missing} unexpected={unexpected} "
            f"shape mismatches={bad_shape}"
        )
    model.load_state_dict(state)


def load_model(export_dir: str | os.PathLike, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build the model ``export_dir/config.json`` records (its ``model._target_``) and load ``weights`` (default:
    the export's own)."""
    model_cfg, router_cfg = read_config(Path(export_dir) / CONFIG_NAME)
    model = get_class(model_cfg._target_)(model_cfg, router_cfg)
    load_weights_into(model, load_checkpoint(weights or export_dir))
    return model
