"""Data: the six embedded tasks generated from a seed (``tasks``) and the stdlib's Python source as a byte-level
corpus (``pycode``). The names below keep ``from moe.data import ...`` working as it did before the split."""

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
