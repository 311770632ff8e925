"""One training run from a TrainConfig: data, model, Lightning Trainer, final evaluation, exports, results.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from rich.console import Console
from rich.table import Table

from moe.config import LoggerConfig, TrainConfig, TrainerConfig
from moe.data import MultiTaskDataModule
from moe.evaluate import evaluate_tasks
from moe.export import LIGHTNING_PREFIX, atomic_write, export_model, load_checkpoint, load_weights_into
from moe.lightning import MoELitModule
from moe.model import MoETransformer


def build_logger(cfg: LoggerConfig, save_dir: str) -> Logger:
    if cfg.kind == "csv":
        return CSVLogger(save_dir=save_dir, name="csv")
    if cfg.kind == "wandb":
        if cfg.mode not in ("offline", "online"):
            raise ValueError(f"logger.mode={cfg.mode!r}: expected 'offline' or 'online'")
        return WandbLogger(project=cfg.project, name=cfg.name, save_dir=save_dir, mode=cfg.mode)
    raise ValueError(f"logger.kind={cfg.kind!r}: expected 'wandb' or 'csv'")


def accuracy_table(accs: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("exact match", justify="right")
    for task, acc in accs.items():
        table.add_row(task, f"{acc:.3f}")
    table.add_row("[bold]mean[/bold]", f"[bold]{sum(accs.values()) / len(accs):.3f}[/bold]")
    return table


def check_parallel(cfg: TrainConfig) -> None:
    """Refuse, before any work, a parallel setup that cannot run here."""
    strategy, ep = cfg.trainer.strategy, cfg.parallel.ep_size
    target = strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy)
    if ep < 1:
        raise ValueError(f"parallel.ep_size={ep}: expected >= 1")
    if ep > 1 and "ExpertParallel" not in target:
        raise ValueError(
            f"parallel.ep_size={ep} needs an expert-parallel strategy: add trainer=ddp (CPU or GPU) or "
            "trainer=deepspeed (GPU)"
        )
    if "deepspeed" in target.lower() and not torch.cuda.is_available():
        raise ValueError(
            "trainer=deepspeed: Lightning's DeepSpeedStrategy needs CUDA GPUs and none is visible; on the CPU use "
            "trainer=ddp trainer.devices=N parallel.ep_size=P (gloo)"
        )


def build_trainer(tc: TrainerConfig, **runtime) -> L.Trainer:
    """``lightning.Trainer`` from its config node (the strategy node instantiated with it); ``runtime`` adds what
    the run decides (logger, callbacks, directories)."""
    node = {k: v for k, v in asdict(tc).items() if k != "extra"}
    node["val_check_interval"] = min(tc.val_check_interval, tc.max_steps)
    return instantiate(node, check_val_every_n_epoch=None, enable_model_summary=False, **runtime, **tc.extra)


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate every eval task, export ``model.safetensors`` + ``config.json``; returns results.json's dict.

    Under a distributed strategy every rank runs this; rank 0 alone evaluates and writes the export, from the full
    (gathered) weights in an unsharded model, so results.json is what the export gives at EP=1.
    """
    check_parallel(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = MultiTaskDataModule(cfg.data)
    init = load_checkpoint(cfg.init_from) if cfg.init_from else None
    # Starting from a checkpoint: its recorded architecture wins over model.* (the weights must fit it).
    model_cfg = init.model if init and init.model else cfg.model
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
    module = MoELitModule(
        model_cfg, cfg.router, cfg.optim, cfg.trainer.max_steps, dm.eval_tasks, cfg.logger.log_expert_fractions
    )
    if init:
        load_weights_into(module.model, init)

    logger = build_logger(cfg.logger, str(out))
    ckpt_dir = out / "checkpoints"
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor=cfg.callbacks.monitor,
            mode="max",
            save_top_k=cfg.callbacks.save_top_k,
            save_last=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.callbacks.rich_progress and cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar())
    trainer = build_trainer(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(out))
    try:
        trainer.fit(module, datamodule=dm)
        final_ckpt = ckpt_dir / "final.ckpt"
        trainer.save_checkpoint(final_ckpt, weights_only=False)  # full state, resumable
        state = full_model_state(trainer)  # a collective under expert parallelism: every rank takes part
        if not trainer.is_global_zero:
            return {}
        model = MoETransformer(model_cfg, cfg.router)
        model.load_state_dict(state)
        model.to(trainer.strategy.root_device)
        accs = evaluate_tasks(model, dm.val_split)
        mean = sum(accs.values()) / len(accs)
        logger.log_metrics(
            {**{f"final/acc/{t}": a for t, a in accs.items()}, "final/mean_accuracy": mean}, step=trainer.global_step
        )
        weights = export_model(model, out / "export")
        results = {
            "tasks": accs,
            "mean_accuracy": mean,
            "checkpoint": str(final_ckpt.resolve()),
            "safetensors": str(weights.resolve()),
            "steps": trainer.global_step,
        }
        atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2)))
        Console().print(accuracy_table(accs, f"Exact match on validation after {trainer.global_step} steps"))
        print(f"results: {out / 'results.json'}\nexport:  {weights.parent}")
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
