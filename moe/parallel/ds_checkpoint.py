"""DeepSpeed expert-parallel checkpoint directory -> single-file export (``model.safetensors`` + ``config.json``).

What ``engine.save_checkpoint(dir, tag)`` writes for a model prepared by ``moe.parallel.deepspeed`` (ZeRO-1/2),
and what is read from it::

    dir/latest                                         the tag (absent when saved with save_latest=False)
    dir/<tag>/mp_rank_00_model_states.pt               "module": every dense weight, plus rank 0's expert shard
                                                       (ignored); the client state (Lightning: "hyper_parameters")
    dir/<tag>/layer_{i}_expert_{j}_mp_rank_00_model_states.pt
                                                       MoE layer i, global expert j: {"<layer>.ds_bridge.deepspeed_moe
                                                       .experts.deepspeed_experts.<j>.<w>": [d, f] or [f, d]}
    dir/<tag>/*optim_states.pt                         optimizer partitions (not read)

The per-expert files are stacked back to ``<layer>.experts.<w>`` ``[E, ...]`` under the names of the unsharded
``MoETransformer.state_dict()``. Every file is read with ``torch.load(weights_only=True)``: no pickle is executed.
The weights are the module's own, in the training dtype (fp32 master copies of bf16/fp16 runs are not read).
ZeRO-3 directories (``*_model_states.pt`` without weights) are refused.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

from moe.config import ModelConfig, RouterConfig
from moe.export import LoadedCheckpoint, _from_dict, export_model, load_weights_into
from moe.nn.model import MoETransformer
from moe_merge_common.io import LIGHTNING_PREFIX, WEIGHTS_NAME, dense_state

BRIDGE = "ds_bridge"  # attribute of a sharded MoELayer holding its DeepSpeed bridge
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert key infix (engine.py)
MAIN_FILE = "mp_rank_00_model_states.pt"
_EXPERT_KEY = re.compile(rf"(.*)\.{BRIDGE}\.{re.escape(DS_EXPERTS)}\.(\d+)\.(w_gate|w_up|w_down)")


def _inside(path: Path, directory: Path, what: str) -> Path:
    """``path`` if it is a regular file (or, for a tag, a directory) whose real path lies inside ``directory``'s:
    a symlink or a ``latest`` naming something outside the checkpoint, a FIFO or a device is refused."""
    real, root = path.resolve(), directory.resolve()
    if real != root and root not in real.parents:
        raise ValueError(f"{path}: {what} leads outside the checkpoint directory {directory} (to {real})")
    if not (real.is_file() or (what == "tag" and real.is_dir())):
        raise ValueError(f"{path}: {what} is not a regular file" + ("" if real.exists() else " (it does not exist)"))
    return path


def _tag_dir(checkpoint_dir: Path) -> Path:
    """``checkpoint_dir`` itself, ``checkpoint_dir/<latest>``, or its only tag folder (Lightning: "checkpoint")."""
    if (checkpoint_dir / MAIN_FILE).exists():
        return checkpoint_dir
    latest = checkpoint_dir / "latest"
    if latest.exists() or latest.is_symlink():
        tag = _inside(latest, checkpoint_dir, "latest").read_text().strip()
        if not tag or Path(tag).name != tag or tag in (".", ".."):
            raise ValueError(f"{latest}: names the tag {tag!r}; expected a folder name inside {checkpoint_dir}")
        return _inside(checkpoint_dir / tag, checkpoint_dir, "tag")
    tags = [d for d in checkpoint_dir.iterdir() if (d / MAIN_FILE).exists()] if checkpoint_dir.is_dir() else []
    if len(tags) != 1:
        raise FileNotFoundError(
            f"{checkpoint_dir}: expected a DeepSpeed checkpoint (a '{MAIN_FILE}' in it, a 'latest' file or one tag "
            f"folder); found tag folders {sorted(d.name for d in tags)}"
        )
    return _inside(tags[0], checkpoint_dir, "tag")


def _load(path: Path, tag: Path) -> dict:
    """One file of the tag folder, refused unless a regular file inside it; never unpickles code."""
    data = torch.load(_inside(path, tag, "checkpoint file"), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors and entries, found {type(data).__name__}")
    return data


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint directory (what Lightning's DeepSpeedStrategy saves as a
    ``.ckpt``): a ``latest`` file or a tag folder holding ``mp_rank_00_model_states.pt``."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / MAIN_FILE).is_file() or (path / "latest").is_file() or any(
        (d / MAIN_FILE).is_file() for d in path.iterdir() if d.is_dir()
    )


def read_client_state(checkpoint_dir: str | Path) -> dict:
    """The main file's entries but the module weights: Lightning's client state (``global_step``,
    ``hyper_parameters``, callbacks' state, ...) and DeepSpeed's own (``ds_config``, ``ds_version``)."""
    tag = _tag_dir(Path(checkpoint_dir))
    return {k: v for k, v in _load(tag / MAIN_FILE, tag).items() if k != "module"}


def read_deepspeed_checkpoint(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full, unsharded weights (names as saved, e.g. with Lightning's ``model.`` prefix) and the main file's
    other entries (client state included)."""
    tag = _tag_dir(Path(checkpoint_dir))
    main = _load(tag / MAIN_FILE, tag)
    state = dict(dense_state(tag / MAIN_FILE, main.get("module") or {}))
    if not state or all(t.numel() == 0 for t in state.values()):  # ZeRO-3 saves empty placeholders
        raise ValueError(f"{tag / MAIN_FILE}: no module weights (a ZeRO-3 checkpoint? only ZeRO-1/2 is supported)")
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for path in sorted(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, t in dense_state(path, _load(path, tag)).items():
            m = _EXPERT_KEY.fullmatch(key)
            if m is None:
                raise ValueError(f"{path}: unexpected key {key!r} (not written by moe.parallel.deepspeed)")
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
    for (layer, w), by_id in experts.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{tag}: {layer}.experts.{w}: expert files {sorted(by_id)} are not 0..E-1")
        key = f"{layer}.experts.{w}"
        if key not in state:
            raise ValueError(f"{tag}: {key} has expert files but is not a weight of the saved module")
        state[key] = torch.stack([by_id[e] for e in range(len(by_id))])  # replaces rank 0's shard
    return state, {k: v for k, v in main.items() if k != "module"}


def model_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights: a LightningModule's (``model.`` names) without the prefix, else the state as saved (an
    engine made on the model itself)."""
    n = len(LIGHTNING_PREFIX)
    if not any(k.startswith(LIGHTNING_PREFIX) for k in state):
        return state
    return {k[n:]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}


def convert_deepspeed_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path,
                                 config: tuple[ModelConfig, RouterConfig] | None = None) -> Path:  # fmt: skip
    """Write ``out_dir/model.safetensors`` + ``config.json`` (``moe.export`` format) from a DeepSpeed checkpoint
    directory; returns the weights path. The architecture comes from the Lightning client state
    (``hyper_parameters.model/router``) when saved, else from ``config``; without either it is refused, as is
    a weight set that does not fit the architecture exactly (names and shapes)."""
    state, extra = read_deepspeed_checkpoint(checkpoint_dir)
    hparams = extra.get("hyper_parameters") or {}
    if "model" in hparams and "router" in hparams:
        where = f"{checkpoint_dir}:hyper_parameters"
        config = (_from_dict(ModelConfig, hparams["model"], f"{where}.model"),
                  _from_dict(RouterConfig, hparams["router"], f"{where}.router"))  # fmt: skip
    if config is None:
        raise ValueError(f"{checkpoint_dir}: no hyper_parameters saved; pass config=(ModelConfig, RouterConfig)")
    model = MoETransformer(*config)
    load_weights_into(model, LoadedCheckpoint(Path(checkpoint_dir), model_weights(state), config[0]))
    return export_model(model, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=convert_deepspeed_checkpoint.__doc__.split(";")[0])
    p.add_argument("checkpoint_dir", help="DeepSpeed checkpoint directory (Lightning: the .ckpt directory)")
    p.add_argument("out_dir", help="where model.safetensors and config.json go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in out_dir")
    args = p.parse_args(argv)
    source, out = Path(args.checkpoint_dir).resolve(), Path(args.out_dir).resolve()
    try:
        if not args.out_dir.strip():
            raise ValueError("out_dir: empty; name the directory to write the export into")
        if out == source or source in out.parents or out in source.parents:
            raise ValueError(f"out_dir={args.out_dir}: inside the checkpoint or holding it; write the export elsewhere")
        if (out / WEIGHTS_NAME).exists() and not args.overwrite:
            raise FileExistsError(f"{out / WEIGHTS_NAME} exists; pass --overwrite to replace it")
        print(convert_deepspeed_checkpoint(args.checkpoint_dir, args.out_dir))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        sys.exit(f"Error: {e}\nHint: python -m moe.parallel.ds_checkpoint CHECKPOINT_DIR OUT_DIR, CHECKPOINT_DIR a "
                 "trainer=deepspeed .ckpt directory")  # fmt: skip


if __name__ == "__main__":
    main()
