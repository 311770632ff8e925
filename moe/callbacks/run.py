"""Callbacks that run the training loop itself: the step progress bar, periodic ``last.ckpt``, a validation at the
last step, and the state a resume needs beyond Lightning's checkpoint (RNG states, logger versions, config)."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar


def short_metric_name(key: str) -> str:
    """``train/exact_match`` -> ``em``, ``val/mean_accuracy`` -> ``val_acc``: progress-bar names that fit."""
    for long, short in (("train/", ""), ("val/", "val_"), ("exact_match", "em"), ("mean_accuracy", "acc")):
        key = key.replace(long, short)
    return key


class StepProgressBar(RichProgressBar):
    """Lightning's RichProgressBar counting the run's optimizer steps (``step 120/2000``) instead of one epoch's
    batches (``Epoch 1/-2`` in a run bounded by max_steps), with short metric names (``em``, ``val_acc``), a
    shorter bar and no it/s column, so that the line fits 120 columns. ``hide``: metrics left off the bar (they
    are still logged); ``train/ce`` is the loss without its small router terms."""

    def __init__(self, hide: list[str] | tuple[str, ...] = ("train/ce",), bar_width: int = 20, **kwargs: Any):
        super().__init__(**kwargs)
        self.hide, self.bar_width = set(hide), bar_width

    def configure_columns(self, trainer: L.Trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
        from rich.progress import BarColumn

        columns = [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]
        for column in columns:
            if isinstance(column, BarColumn):
                column.bar_width = self.bar_width
        return columns

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_progress_bar_id is None:  # one bar for the run, not one per epoch
            super().on_train_epoch_start(trainer, pl_module)
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: the run directory says it
        return {short_metric_name(k): v for k, v in items.items() if k not in self.hide}


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at the last step: what ``ckpt_path=last``
    resumes. (A ModelCheckpoint with ``save_last`` writes it only when it saves a checkpoint of its own.) When a
    validation follows the step, the checkpoint is written after it: a resumed run does not validate again."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, **kwargs: Any):
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: expected >= 1")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True,
                         enable_version_counter=False, **kwargs)  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last = trainer.should_stop or 0 < trainer.max_steps <= step  # (should_stop: max_time, early stopping)
        if (step % self._every_n_train_steps and not last) or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateAtLastStep(Callback):
    """Validate after the last step too: a run's last step is rarely a multiple of ``val_check_interval``, and
    Lightning validates mid-epoch when ``should_stop`` is set."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) in types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class RunState(Callback):
    """What resuming needs beyond Lightning's checkpoint: the global RNG states (Lightning saves none; restored when
    training restarts, after any sanity check), the loggers' versions (a resumed run logs into the same CSV version
    and wandb run) and the run's configuration (a resume with another one is refused)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["logger_versions"] = [logger.version for logger in trainer.loggers]
        checkpoint["train_config"] = self.config

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._rng = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None
