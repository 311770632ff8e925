"""``python -m moe.hf export CKPT OUT [--source DIR]``: a ``model=hf`` run's checkpoint as a Hugging Face checkpoint.

CKPT: a ``.ckpt`` (``checkpoints/last.ckpt``, ``final.ckpt``, any EP size: experts are saved gathered) or a
DeepSpeed checkpoint directory. The architecture, tokenizer and generation settings come from the run's
``model.path``, or ``--source`` when that directory moved. OUT receives config.json, the safetensors and the
tokenizer files, staged (a failure leaves OUT as it was); it must not be the source.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from moe_merge_common.cli import USER_ERRORS, one_line


def export_checkpoint(ckpt: str, out: str, source: str | None = None) -> Path:
    """Write ``out`` from ``ckpt`` (see the module docstring); returns ``out``."""
    from moe.config import RouterConfig
    from moe.export import load_checkpoint
    from moe.hf.model import HFCausalLM
    from moe_merge_common.outputs import check_output

    loaded = load_checkpoint(ckpt)
    model_cfg = loaded.model
    if model_cfg is None or model_cfg._target_ != "moe.hf.model.HFCausalLM":
        target = model_cfg._target_ if model_cfg else None
        raise ValueError(f"{ckpt}: not a model=hf run's checkpoint (model._target_={target!r}); our own model's "
                         "export is python train.py's export/ or python -m moe.parallel.ds_checkpoint")  # fmt: skip
    if source:
        model_cfg = replace(model_cfg, path=source)
    check_output(out, [model_cfg.path, ckpt], overwrite=True, key="OUT")
    model = HFCausalLM(model_cfg, loaded.router or RouterConfig(kind="from_model"))
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(loaded.state)), sorted(set(loaded.state) - own)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: its weights do not fit {model_cfg.path}'s architecture: missing={missing[:6]} "
                         f"unexpected={unexpected[:6]}")  # fmt: skip
    model.load_state_dict(loaded.state)
    return model.export(out, HFCausalLM.tokenizer(model_cfg))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="a model=hf run's checkpoint -> a Hugging Face checkpoint directory")
    export.add_argument("ckpt", help="a .ckpt file or a DeepSpeed checkpoint directory of a model=hf run")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--source", default=None, help="the original model directory, if model.path moved")
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.ckpt, args.out, args.source))
    except USER_ERRORS as e:
        print(f"Error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
