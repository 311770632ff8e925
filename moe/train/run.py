"""One training run from a TrainConfig: data, model, Lightning Trainer (logger and callbacks from their config
nodes), final evaluation, exports, results.json; ``ckpt_path`` resumes an interrupted run exactly."""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.utils import JobStatus
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.table import Table

from moe.callbacks.run import RunState, ValidateAtLastStep
from moe.config import TrainConfig, TrainerConfig
from moe.data import build_datamodule
from moe.export import atomic_write, export_model, load_checkpoint, load_weights_into
from moe.parallel.ds_checkpoint import is_deepspeed_checkpoint, read_client_state
from moe.train.checks import (
    check_init_architecture,
    check_parallel,
    check_resume_config,
    check_train_config,
    command_line_keys,
    first_process,
    strategy_target,
)
from moe.train.module import MoELitModule, build_model, model_class
from moe_merge_common.cli import CleanErrors, table_console
from moe_merge_common.io import LIGHTNING_PREFIX


class _NoTips(logging.Filter):
    """Lightning logs a litlogger advertisement ("💡 Tip: ...") at every Trainer start; no flag turns it off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence, at their source, the messages every run would print for nothing (idempotent)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
    # Lightning's CombinedLoader still builds torch's deprecated LeafSpec() (torch: use treespec_leaf()).
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def instantiation_error(e: Exception) -> str:
    """What went wrong in ``hydra.utils.instantiate``, in one line: the target's own error (Hydra 1.3 and 1.4 wrap
    it in an InstantiationException whose text differs between versions and spans lines)."""
    cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
    return " ".join(f"{type(cause).__name__}: {cause}".split())


def build_logger(node: dict[str, Any] | None, version: Any = None) -> Logger | None:
    """The Lightning logger of a ``_target_`` node (None: no logger). ``version``: the version a resumed run logs
    into (its CSV version directory, its wandb run id), unless the node sets one."""
    if not node:
        return None
    kwargs = {}
    if version is not None and node.get("version") is None:
        if "version" in inspect.signature(get_class(node["_target_"])).parameters:
            kwargs["version"] = version
    try:
        logger = instantiate(node, **kwargs)
    except Exception as e:
        raise ValueError(f"logger ({node.get('_target_')}): {instantiation_error(e)}") from e
    if not isinstance(logger, Logger):
        raise TypeError(f"logger: {node.get('_target_')} is not a Lightning logger")
    if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
        # Lightning always hands wandb.init anonymous=None, which wandb >= 0.23 warns has no effect.
        logger._wandb_init.pop("anonymous")
    return logger


def build_callbacks(nodes: dict[str, Any], progress_bar: bool = True) -> list[Callback]:
    """The callbacks of the ``name -> _target_ node`` mapping, in order; a node set to None is left out, and so is
    a progress bar when the trainer runs without one (``trainer.enable_progress_bar=false``)."""
    callbacks = []
    for name, node in nodes.items():
        if not node:
            continue
        try:
            callback = instantiate(node)
        except Exception as e:
            raise ValueError(f"callbacks.{name}: {instantiation_error(e)}") from e
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks.{name}: {node.get('_target_')} is not a Lightning callback")
        if isinstance(callback, ProgressBar) and not progress_bar:
            continue
        callbacks.append(callback)
    return callbacks


def accuracy_table(accs: dict[str, float], title: str, column: str | None = None,
                   summary: tuple[str, float] | None = None) -> Table:  # fmt: skip
    table = Table(title=title)
    table.add_column("task")
    table.add_column(column or "exact match", justify="right")
    for task, acc in accs.items():
        table.add_row(task, f"{acc:.3f}")
    name, value = summary or ("mean", sum(accs.values()) / len(accs))
    table.add_row(f"[bold]{name}[/bold]", f"[bold]{value:.3f}[/bold]")
    return table


def select_deepspeed_accelerator(tc: TrainerConfig) -> None:
    """``trainer=deepspeed`` on the CPU: ``DS_ACCELERATOR=cpu`` (DeepSpeed's own switch, read at its first use and
    inherited by the other ranks' processes), so that DeepSpeed does not look for GPUs and warn it found none."""
    cpu = tc.accelerator == "cpu" or (tc.accelerator == "auto" and not torch.cuda.is_available())
    if cpu and "deepspeed" in strategy_target(tc).lower():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_trainer(tc: TrainerConfig, **runtime) -> L.Trainer:
    """``lightning.Trainer`` from its config node (the strategy node instantiated with it); ``runtime`` adds what
    the run decides (logger, callbacks, directories)."""
    node = {k: v for k, v in asdict(tc).items() if k != "extra"}
    node["val_check_interval"] = min(tc.val_check_interval, tc.max_steps)
    return instantiate(node, check_val_every_n_epoch=None, enable_model_summary=False, **runtime, **tc.extra)


def resume_path(ckpt_path: str, callbacks: list[Callback]) -> Path:
    """The checkpoint ``ckpt_path`` names: ``last`` is the run's ``last.ckpt`` (where the callback saving it
    writes), anything else a path. Refused when it is not there."""
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not (path.is_file() or is_deepspeed_checkpoint(path)):
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file (or DeepSpeed checkpoint "
                                    "directory)")  # fmt: skip
        return path
    lasts = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
             for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath]  # fmt: skip
    if not lasts:
        raise ValueError("ckpt_path=last: no callback saves last.ckpt (callbacks.last_checkpoint is left out); give "
                         "the checkpoint's path")  # fmt: skip
    if not (lasts[0].is_file() or is_deepspeed_checkpoint(lasts[0])):
        raise FileNotFoundError(
            f"ckpt_path=last: no {lasts[0]}. Resume in the interrupted run's own directory: add "
            "hydra.run.dir=<that run directory> (or give ckpt_path=<a .ckpt>)"
        )
    return lasts[0]


@rank_zero_only  # (Lightning's DDP launcher runs this script again in every other process)
def _continue_csv(logger: CSVLogger, step: int) -> None:
    """Resume into the same ``metrics.csv``: keep its rows logged before the checkpoint's step (later ones are
    logged again) instead of the empty file Lightning's writer would start."""
    log_dir = Path(logger.log_dir)
    metrics = log_dir / "metrics.csv"
    rows = []
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        rows = [row for row in rows if int(float(row.get("step", 0))) < step]
    for name in ("metrics.csv", "hparams.yaml"):  # rewritten below and by log_hyperparams
        (log_dir / name).unlink(missing_ok=True)
    writer = logger.experiment
    if rows:
        writer.metrics.extend(rows)
        writer.save()


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate every eval task, export ``model.safetensors`` + ``config.json``; returns results.json's dict.

    With ``ckpt_path``, resume the interrupted run from its checkpoint: optimizer, LR schedule, step, RNG states
    and data position, logging into the same logger version and checkpoint files.

    Under a distributed strategy every rank runs this; rank 0 alone evaluates and writes the export, from the full
    (gathered) weights in an unsharded model, so results.json is what the export gives at EP=1.
    """
    check_train_config(cfg)
    check_parallel(cfg)
    quiet_known_noise()
    select_deepspeed_accelerator(cfg.trainer)
    out = Path(cfg.output_dir)
    callbacks = build_callbacks(cfg.callbacks, cfg.trainer.enable_progress_bar)
    resume = resume_path(cfg.ckpt_path, callbacks) if cfg.ckpt_path else None
    saved: dict[str, Any] = {}
    if resume:
        deepspeed = is_deepspeed_checkpoint(resume)
        try:
            saved = (read_client_state(resume) if deepspeed
                     else torch.load(resume, map_location="cpu", weights_only=True, mmap=True))  # fmt: skip
        except Exception as e:
            raise ValueError(f"ckpt_path={resume}: not a readable Lightning checkpoint ({e})") from e
        if not isinstance(saved, dict) or not (deepspeed or isinstance(saved.get("state_dict"), dict)):
            raise ValueError(f"ckpt_path={resume}: not a Lightning checkpoint (expected a mapping with a "
                             "'state_dict')")  # fmt: skip
        check_resume_config(cfg, saved.get("train_config"), resume, deepspeed=deepspeed)
    source = cfg.init_from or resume
    init = load_checkpoint(source) if source else None  # a bad file is refused before anything is written
    if cfg.init_from and init.model:  # its recorded architecture wins over model.* (the weights must fit it)
        check_init_architecture(cfg.model, init.model, cfg.init_from, command_line_keys())
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    model_cfg = init.model if init and init.model else cfg.model
    tokenizer = model_class(model_cfg).tokenizer(model_cfg)  # the model's own (model=hf), else None
    dm = build_datamodule(cfg.data, tokenizer)
    dm.setup("fit")  # bad data settings fail here, before the logger and checkpoints write into the run directory
    model_cfg = replace(
        model_cfg,
        vocab_size=model_cfg.vocab_size or dm.vocab.size,
        max_seq_len=model_cfg.max_seq_len or dm.seq_len,
    )
    if model_cfg.vocab_size < dm.vocab.size or model_cfg.max_seq_len < dm.seq_len:
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size}, model.max_seq_len={model_cfg.max_seq_len}: the data needs "
            f">= {dm.vocab.size} and >= {dm.seq_len}"
        )
    module = MoELitModule(model_cfg, cfg.router, cfg.optim, cfg.trainer.max_steps, metrics=dm.metrics())
    if cfg.init_from:
        load_weights_into(module.model, init)
    init = None  # (its weights: Lightning loads a resumed run's checkpoint itself)

    versions = saved.get("logger_versions") or [None]
    logger = build_logger(cfg.logger, version=versions[0])
    if resume and isinstance(logger, CSVLogger):
        _continue_csv(logger, saved.get("global_step", 0))
    config = asdict(cfg)
    callbacks += [RunState(config), ValidateAtLastStep()]
    trainer = build_trainer(cfg.trainer, logger=logger or False, callbacks=callbacks, default_root_dir=str(out))
    if logger:
        logger.log_hyperparams(config)  # the whole run's configuration (the module adds its effective model)
    try:
        if resume and trainer.is_global_zero:
            print(f"resuming from {resume} (step {saved.get('global_step')})")
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
        ckpt_dir = out / "checkpoints"
        final_ckpt = ckpt_dir / "final.ckpt"
        trainer.save_checkpoint(final_ckpt, weights_only=False)  # full state, resumable
        state = full_model_state(trainer)  # a collective under expert parallelism: every rank takes part
        if not trainer.is_global_zero:
            return {}
        model = build_model(model_cfg, cfg.router)
        model.load_state_dict(state)
        model.to(trainer.strategy.root_device)
        ev = dm.evaluate(model)  # the data's own measure: exact match per task, bits per byte per file group
        for lg in trainer.loggers:
            lg.log_metrics(ev.metrics, step=trainer.global_step)
            lg.save()  # Lightning flushed the loggers when fit ended, before these
        weights = export_model(model, out / "export", tokenizer)
        kind = "export" if weights.is_dir() else "safetensors"  # a Hugging Face directory, or our weights file
        where = {"checkpoint": str(final_ckpt.resolve()), kind: str(weights.resolve()), "steps": trainer.global_step}
        results = {**ev.results, **where}
        atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2)))
        table_console().print(accuracy_table(ev.table, f"{ev.title} after {trainer.global_step} steps", ev.column,
                                                  ev.summary))  # fmt: skip
        print(f"results: {out / 'results.json'}\nexport:  {weights if weights.is_dir() else weights.parent}")
        return results
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()


def full_model_state(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (experts gathered by expert-parallel strategies), on every rank."""
    state = trainer.strategy.lightning_module_state_dict()
    n = len(LIGHTNING_PREFIX)
    return {k[n:]: v.detach().cpu() for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}


def adopt_launcher_env() -> None:
    """DeepSpeed's launcher passes the node rank as CROSS_RANK; Lightning reads NODE_RANK."""
    if "CROSS_RANK" in os.environ and "NODE_RANK" not in os.environ:
        os.environ["NODE_RANK"] = os.environ["CROSS_RANK"]


def configure_threads() -> None:
    """Use every core for intra-op work unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


class RunDirGuard(CleanErrors):
    """Hydra callback (conf/train.yaml) guarding a single run's directory:

    - the first process holds the directory's lock (``moe_merge_common.outputs.acquire_lock``) from before Hydra
      writes its
      config until the run ends: a second run into the same directory at once is refused, naming the first's pid;
    - a failed run leaves no directory behind when Hydra created it for this run and it holds nothing but Hydra's
      own files (``.hydra/``, the job's ``.log``): a refused configuration, or a failure before training wrote
      anything. A directory that existed before the run is never removed;
    - then, as ``moe_merge_common.cli.CleanErrors``, a bad-input error is printed as one line and a hint."""

    def __init__(self, hint: str = "python train.py --help lists every option; HYDRA_FULL_ERROR=1 shows the "
                 "full traceback") -> None:  # fmt: skip
        super().__init__(hint)
        self._created: Path | None = None
        self._lock: tuple[Path, int] | None = None

    def on_run_start(self, config, **kwargs: Any) -> None:
        from moe_merge_common.outputs import acquire_lock

        run_dir = Path(str(config.hydra.run.dir)).absolute()
        self._created = None if run_dir.exists() else run_dir
        if not first_process():
            return
        try:
            self._lock = run_dir, acquire_lock(run_dir, key="hydra.run.dir")
        except OSError as e:  # another job's directory: never removed by this one
            self._created = None
            print(f"Error: {e}\nHint: one run per directory; resume it later with ckpt_path=last", file=sys.stderr)
            raise SystemExit(1) from None

    def on_run_end(self, config, **kwargs: Any) -> None:
        from moe_merge_common.outputs import release_lock

        if self._lock is not None:
            run_dir, fd = self._lock
            self._lock = None
            release_lock(run_dir, fd)

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        self._remove(config, job_return)
        super().on_job_end(config, job_return, **kwargs)

    def _remove(self, config, job_return) -> None:
        run_dir, self._created = self._created, None
        if run_dir is None or job_return.status != JobStatus.FAILED or not first_process():
            return
        if Path(str(config.hydra.runtime.output_dir)).absolute() != run_dir:
            return
        self._remove_if_empty(run_dir, config.hydra.output_subdir)

    @staticmethod
    def _remove_if_empty(run_dir: Path, subdir: str = ".hydra") -> None:
        from moe_merge_common.outputs import LOCK

        if not run_dir.is_dir():
            return

        def hydra_own(p: Path) -> bool:
            parts = p.relative_to(run_dir).parts
            return p.is_dir() or parts[0] in (subdir, LOCK) or (len(parts) == 1 and p.suffix == ".log")

        if all(hydra_own(p) for p in run_dir.rglob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)
