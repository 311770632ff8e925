"""Checks a training configuration passes before any work: values, the parallel layout, a resumed run's settings
and ``init_from``'s architecture; each refusal names the key (or file) and what was expected."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from moe.config import ModelConfig, TrainConfig, TrainerConfig, upgrade_saved
from moe.data import data_class
from moe.train.module import OPTIM_IMPLS, model_class
from moe_merge_common.cli import unknown_keys

# Keys of a resumed run's config that must equal the checkpoint's: they shape the weights. (The trainer, the
# parallel layout, the logger and the callbacks may change: a run saved at EP=2 resumes at EP=1.)
RESUME_FIXED = ("model", "router", "data", "optim", "seed")
# ... and for a DeepSpeed checkpoint, whose optimizer partitions and experts are saved per rank, the process
# layout too (DeepSpeed loads MoE checkpoints only at the layout that saved them: #6589, #5716)
RESUME_FIXED_DEEPSPEED = ("parallel.ep_size", "trainer.devices", "trainer.num_nodes", "trainer.precision",
                          "trainer.strategy._target_", "trainer.strategy.stage")  # fmt: skip
RESUME_FREE = ("data.num_workers", "optim.impl")  # ... except these: how the work runs, not what it computes


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse, before any work, a configuration that cannot train as asked, naming the key."""
    unknown = list(unknown_keys(cfg))
    if unknown:
        raise ValueError(
            f"unknown config key(s): {', '.join(unknown)}; a key added with + must be one the schema "
            "(moe.config.TrainConfig) declares"
        )
    if cfg.ckpt_path and cfg.init_from:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} and init_from={cfg.init_from}: give one. ckpt_path resumes a run (weights, "
            "optimizer, LR schedule, step, data position); init_from starts a new run from weights only"
        )
    t, o, m, r, d = cfg.trainer, cfg.optim, cfg.model, cfg.router, cfg.data
    for key in ("d_model", "n_layer", "n_head", "num_experts", "d_ff"):
        if getattr(m, key) < 1:
            raise ValueError(f"model.{key}={getattr(m, key)}: expected >= 1")
    token_choice = m.moe.kind == "sparse" and r.kind != "expert_choice"
    for ok, message in (
        (m.d_model % m.n_head == 0, f"model.d_model={m.d_model}: expected a multiple of model.n_head ({m.n_head})"),
        (
            not token_choice or 1 <= r.k <= m.num_experts,
            f"router.k={r.k}: expected 1 <= router.k <= model.num_experts ({m.num_experts})",
        ),
        (t.max_steps >= 1, f"trainer.max_steps={t.max_steps}: expected >= 1 (training is counted in steps)"),
        (t.val_check_interval >= 1, f"trainer.val_check_interval={t.val_check_interval}: expected >= 1 (steps)"),
        (t.log_every_n_steps >= 1, f"trainer.log_every_n_steps={t.log_every_n_steps}: expected >= 1"),
        (o.lr > 0, f"optim.lr={o.lr}: expected > 0"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: expected >= 0"),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)}: expected two values in [0, 1)"),
        (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps}: expected >= 0"),
        (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: expected in [0, 1] (final LR = lr * it)"),
        (o.impl in OPTIM_IMPLS, f"optim.impl={o.impl!r}: expected one of {OPTIM_IMPLS}"),
        # values that would fail only later: mid-run, or after training when the final evaluation starts
        (0 <= m.dropout < 1, f"model.dropout={m.dropout}: expected in [0, 1)"),
        (t.gradient_clip_val is None or math.isfinite(t.gradient_clip_val) and t.gradient_clip_val >= 0,
         f"trainer.gradient_clip_val={t.gradient_clip_val}: expected a finite value >= 0 (0 or null: no clipping)"),
    ):
        if not ok:
            raise ValueError(message)
    data_class(d).check_config(d)  # the data module's own values (data._target_ names it)
    model_class(m)  # model._target_ names an importable model class


def strategy_target(tc: TrainerConfig) -> str:
    """The strategy's class path (a ``_target_`` node) or name (``"auto"``, ``"ddp"``)."""
    return tc.strategy.get("_target_", "") if isinstance(tc.strategy, dict) else str(tc.strategy)


def check_parallel(cfg: TrainConfig) -> None:
    """Refuse, before any work, a parallel setup that cannot run here."""
    ep, target = cfg.parallel.ep_size, strategy_target(cfg.trainer)
    if ep < 1:
        raise ValueError(f"parallel.ep_size={ep}: expected >= 1")
    if ep > 1 and "ExpertParallel" not in target:
        raise ValueError(
            f"parallel.ep_size={ep} needs an expert-parallel strategy: add trainer=ddp (CPU or GPU) or "
            "trainer=deepspeed"
        )
    if ep > 1 and cfg.model.lora.r > 0 and cfg.model.lora.target_parameters:
        raise ValueError(f"model.lora.target_parameters with parallel.ep_size={ep}: the expert adapters are not "
                         "sharded with the experts; use parallel.ep_size=1 or LoRA on modules only (model.lora.target)")
    accelerator = cfg.trainer.accelerator
    if "deepspeed" in target.lower() and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer=deepspeed with trainer.accelerator={accelerator}: no CUDA GPU is visible; to run DeepSpeed on "
            "the CPU add trainer.accelerator=cpu trainer.precision=32-true (gloo, one process per "
            "trainer.devices)"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any] | None, path: Path, deepspeed: bool = False) -> None:
    """Refuse to resume a run with settings that shape the weights (RESUME_FIXED) other than its own; a DeepSpeed
    checkpoint (``deepspeed``), sharded per rank, also with another process layout (RESUME_FIXED_DEEPSPEED)."""
    if not saved:
        return  # a checkpoint written before the configuration was saved in it
    config = asdict(cfg)
    saved = {k: upgrade_saved(k, v) if isinstance(v, dict) else v for k, v in saved.items()}  # an earlier version's
    saved["model"] = {"_target_": config["model"]["_target_"], **(saved.get("model") or {})}  # (before model._target_)
    here = _flat({k: config[k] for k in RESUME_FIXED})
    there = _flat({k: saved.get(k) for k in RESUME_FIXED})
    if deepspeed:
        layout_here, layout_there = (_flat({k: c.get(k) for k in ("parallel", "trainer")}) for c in (config, saved))
        here.update({k: layout_here.get(k) for k in RESUME_FIXED_DEEPSPEED})
        there.update({k: layout_there.get(k) for k in RESUME_FIXED_DEEPSPEED})
    differ = [f"{k}={there.get(k)} there, {v} here" for k, v in here.items() if k not in RESUME_FREE
              and there.get(k) != v]  # fmt: skip
    if differ:
        raise ValueError(
            f"ckpt_path={path}: this configuration differs from the checkpoint's run: {'; '.join(differ)}. Resume "
            "with the run's own overrides plus ckpt_path=... hydra.run.dir=<its run directory>"
        )


def command_line_keys() -> set[str]:
    """The keys (``model.d_model``) and groups (``model``) set on this Hydra command line; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def check_init_architecture(mine: ModelConfig, theirs: ModelConfig, source: str, explicit: set[str]) -> None:
    """``init_from``'s architecture replaces ``model.*``. A differing key set on the command line (or ``model=``)
    is a conflict and refused; a differing default or experiment value is replaced, saying so on stderr."""
    here, there = _flat({"model": asdict(mine)}), _flat({"model": asdict(theirs)})
    differ = {k: (v, there.get(k)) for k, v in here.items()
              if there.get(k) != v and not (k in ("model.vocab_size", "model.max_seq_len") and not v)}  # fmt: skip
    if not differ:
        return
    told = sorted(k for k in differ if "model" in explicit or any(k == e or k.startswith(e + ".") for e in explicit))
    if told:
        raise ValueError(
            f"init_from={source}: its architecture has {', '.join(f'{k}={differ[k][1]}' for k in told)}, but the "
            f"command line sets {', '.join(f'{k}={differ[k][0]}' for k in told)}: the weights fix the architecture; "
            "drop those overrides (or train from scratch without init_from)"
        )
    if rank_zero_only.rank == 0:
        changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in differ.items())
        print(f"init_from={source}: the checkpoint's architecture replaces the configured one ({changes})",
              file=sys.stderr)  # fmt: skip


def first_process() -> bool:
    """Not one of the ranks Lightning's or DeepSpeed's launcher starts with the same command line."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


def run_dir_holding_a_run(argv: list[str]) -> str | None:
    """A refusal message when this command line starts a new run (no ``ckpt_path``) in a ``hydra.run.dir`` that
    holds a run (its ``results.json`` or checkpoints) or files no run wrote: Hydra would replace its config, and the
    run its checkpoints, export and results, or mix its files with the user's. Hydra's own files (``.hydra/``, a
    top-level ``.log``) are left from a refused run and may be replaced. Checked before Hydra writes anything; None
    when the command may go on. (Lightning's launcher starts the other ranks with the same command line: only the
    first process checks.)"""
    from moe_merge_common.outputs import LOCK

    if not first_process():
        return None
    args = dict(a.lstrip("+").split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    if args.get("ckpt_path") not in (None, "", "null") or "hydra.run.dir" not in args:
        return None
    run_dir = Path(args["hydra.run.dir"].strip("'\""))
    if run_dir.exists() and not run_dir.is_dir():
        return f"hydra.run.dir={run_dir}: a file, not a directory"
    checkpoints = run_dir / "checkpoints"
    if (run_dir / "results.json").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return (f"hydra.run.dir={run_dir} holds a run (results.json or checkpoints/); a new run there would replace "
                "them. Continue it with ckpt_path=last, or train into a new directory\nHint: python train.py "
                "<the run's overrides> ckpt_path=last hydra.run.dir=<its directory> resumes an interrupted "
                "run")  # fmt: skip
    hydra_subdir = args.get("hydra.output_subdir", ".hydra")
    entries = run_dir.iterdir() if run_dir.is_dir() else ()
    foreign = sorted(p.name for p in entries if p.name not in (hydra_subdir, LOCK)
                     and not (p.suffix == ".log" and p.is_file()) and not (p.is_dir() and not any(p.iterdir())))
    if foreign:
        listing = ", ".join(foreign[:5]) + ", ..." * (len(foreign) > 5)
        return (f"hydra.run.dir={run_dir}: holds files no run of this command wrote ({listing}); a new run there "
                "would mix its files with them\nHint: train into a new or empty directory")  # fmt: skip
    return None
