"""Data: the six embedded tasks generated from a seed (``tasks``) and the stdlib's Python source as a byte-level
corpus (``pycode``). ``data._target_`` names the data module class a run builds (``build_datamodule``): adding a
corpus means adding a class with the ``TrainData`` interface and a conf/data/*.yaml, no branch. The task names
below keep ``from moe.data import ...`` working as it did before the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning as L
import torch
from hydra.utils import get_class
from torch import nn

from moe.data.tasks import (
    ALL_TASKS,
    DIGIT_BASE,
    PAD,
    PLUS,
    QUERY,
    SEP,
    SYMBOL_BASE,
    TASK_BASE,
    MultiTaskDataModule,
    ResumableDataLoader,
    SplitDataset,
    TaskSplit,
    Vocab,
    build_splits,
    max_example_len,
    validate_data_config,
)

__all__ = ["Evaluation", "Metrics", "TrainData",
           "ALL_TASKS", "DIGIT_BASE", "MultiTaskDataModule", "PAD", "PLUS", "QUERY", "ResumableDataLoader", "SEP",
           "SYMBOL_BASE", "SplitDataset", "TASK_BASE", "TaskSplit", "Vocab", "build_splits", "max_example_len",
           "validate_data_config"]  # fmt: skip


@dataclass
class Evaluation:
    """A data module's final evaluation of a trained model (``TrainData.evaluate``): ``metrics`` are logged (as
    ``final/...``), ``results`` go to results.json, ``table`` (row -> value, under ``column``, then ``summary``) is
    printed."""

    metrics: dict[str, float]
    results: dict[str, Any]
    title: str
    table: dict[str, float] = field(default_factory=dict)
    column: str | None = None
    summary: tuple[str, float] | None = None  # the table's last row; None: the mean of the rows


@runtime_checkable
class Metrics(Protocol):
    """What a data module measures during training (``TrainData.metrics``), an ``nn.Module`` of torchmetrics so
    ranks are summed. ``nll_BS``: next-token loss in nats at each position the model predicted (0 where
    ``batch["target_mask"][:, 1:]`` is False); ``correct_B``: every target token of the row is the argmax."""

    prog_bar: tuple[str, ...]  # keys compute() returns that the progress bar shows

    def update(self, batch: dict[str, torch.Tensor], nll_BS: torch.Tensor, correct_B: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, torch.Tensor]:
        """Validation values by logged name (``val/...``); empty when nothing was seen. Then ``reset()``."""

    def reset(self) -> None: ...

    def train_values(self, batch: dict[str, torch.Tensor], nll_BS: torch.Tensor,
                     correct_B: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """Logged at each training step (``train/...``), from this batch alone."""


@runtime_checkable
class TrainData(Protocol):
    """What a run needs from a data module (a ``LightningDataModule``) beyond Lightning's hooks.

    ``monitor``: the validation value the best checkpoint is chosen by, and whether lower or higher is better;
    ``objective``: "tasks" (loss and exact match on each example's target tokens, per task) or "lm" (next-token
    loss on every token, bits per byte); ``vocab.size`` and ``seq_len``: what the model must cover;
    ``task_names`` (``task_id`` indexes it), ``eval_tasks`` (validated), ``train_tasks`` (trained on)."""

    objective: ClassVar[str]
    monitor: ClassVar[tuple[str, str]]  # (logged name, "min" | "max"): what the best checkpoint is chosen by
    task_names: list[str]
    vocab: Any
    seq_len: int

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse (ValueError naming the key) what this class cannot use, before any work."""

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> L.LightningDataModule:
        """The data module for a ``moe.config.DataConfig``; ``tokenizer``: the model's own, when it brings one
        (a transformers tokenizer, ``model_class(model).tokenizer(model)``), else None."""

    def metrics(self) -> nn.Module:
        """A fresh ``Metrics`` module for validation during training."""

    def evaluate(self, model: nn.Module) -> Evaluation:
        """The final evaluation of ``model`` (tokens ``[B, S]`` -> ``(logits, routings)``) on the held-out split."""

    @property
    def eval_tasks(self) -> list[str]: ...

    @property
    def train_tasks(self) -> list[str] | None: ...


def data_class(cfg: Any) -> type:
    """The class ``data._target_`` names: a ``LightningDataModule`` with ``from_config`` and ``check_config``
    (``TrainData``)."""
    try:
        cls = get_class(cfg._target_)
    except Exception as e:
        raise ValueError(f"data._target_={cfg._target_!r}: not an importable class ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)
            and all(callable(getattr(cls, m, None)) for m in ("from_config", "check_config"))):  # fmt: skip
        raise ValueError(f"data._target_={cfg._target_!r}: expected a LightningDataModule class with from_config "
                         "and check_config (moe.data.TrainData)")  # fmt: skip
    return cls


def build_datamodule(cfg: Any, tokenizer: Any = None) -> L.LightningDataModule:
    """``data_class(cfg).from_config(cfg, tokenizer)``."""
    return data_class(cfg).from_config(cfg, tokenizer)
