"""Data: the six embedded tasks generated from a seed (``tasks``) and the stdlib's Python source as a byte-level
corpus (``pycode``). ``data._target_`` names the data module class a run builds (``build_datamodule``): adding a
corpus means adding a class with the ``TrainData`` interface and a conf/data/*.yaml, no branch. The task names
below keep ``from moe.data import ...`` working as it did before the split."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning as L
from hydra.utils import get_class

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

__all__ = ["ALL_TASKS", "DIGIT_BASE", "MultiTaskDataModule", "PAD", "PLUS", "QUERY", "ResumableDataLoader", "SEP",
           "SYMBOL_BASE", "SplitDataset", "TASK_BASE", "TaskSplit", "Vocab", "build_splits", "max_example_len",
           "validate_data_config"]  # fmt: skip


@runtime_checkable
class TrainData(Protocol):
    """What a run needs from a data module (a ``LightningDataModule``) beyond Lightning's hooks.

    ``objective``: "tasks" (loss and exact match on each example's target tokens, per task) or "lm" (next-token
    loss on every token, bits per byte); ``vocab.size`` and ``seq_len``: what the model must cover;
    ``task_names`` (``task_id`` indexes it), ``eval_tasks`` (validated), ``train_tasks`` (trained on)."""

    objective: ClassVar[str]
    task_names: list[str]
    vocab: Any
    seq_len: int

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse (ValueError naming the key) what this class cannot use, before any work."""

    @classmethod
    def from_config(cls, cfg: Any) -> L.LightningDataModule:
        """The data module for a ``moe.config.DataConfig``."""

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


def build_datamodule(cfg: Any) -> L.LightningDataModule:
    """``data_class(cfg).from_config(cfg)``."""
    return data_class(cfg).from_config(cfg)
