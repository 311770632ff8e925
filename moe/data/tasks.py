"""Embedded multi-task sequence data, generated in code from a seed (no download).

Every example is ``[task token, input..., SEP, target..., PAD...]`` over one shared vocabulary. Loss and
exact-match accuracy are taken on the target tokens only (``target_mask``); ``task_id`` stays attached to each
example so routing can be analysed per task. Validation rows never occur in the training split.

Tasks (n = ``seq_symbols``, symbols drawn from an alphabet of ``num_symbols``):

- ``copy``    x -> x
- ``reverse`` x -> reversed x
- ``sort``    x -> x sorted by symbol index
- ``add``     a + b with ``add_digits`` digits each, digits least-significant first -> sum (one digit longer)
- ``lookup``  ``lookup_pairs`` (key symbol, value digit) pairs, QUERY key -> its value
- ``count``   x, QUERY s -> number of occurrences of s in x (1..n, uniform), as one digit
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moe.config import DataConfig

ALL_TASKS = ("copy", "reverse", "sort", "add", "lookup", "count")
PAD, SEP, PLUS, QUERY = 0, 1, 2, 3
TASK_BASE = 4
DIGIT_BASE = TASK_BASE + len(ALL_TASKS)
SYMBOL_BASE = DIGIT_BASE + 10


@dataclass(frozen=True)
class Vocab:
    num_symbols: int

    @property
    def size(self) -> int:
        return SYMBOL_BASE + self.num_symbols

    def task_token(self, task: str) -> int:
        return TASK_BASE + ALL_TASKS.index(task)


# Each generator returns (inputs [N, i], targets [N, t]) as token ids.
Generator = Callable[[np.random.Generator, int, DataConfig], tuple[np.ndarray, np.ndarray]]


def _symbols(rng: np.random.Generator, n: int, cfg: DataConfig) -> np.ndarray:
    return rng.integers(0, cfg.num_symbols, size=(n, cfg.seq_symbols))


def _copy(rng, n, cfg):
    x = _symbols(rng, n, cfg)
    return x + SYMBOL_BASE, x + SYMBOL_BASE


def _reverse(rng, n, cfg):
    x = _symbols(rng, n, cfg)
    return x + SYMBOL_BASE, x[:, ::-1] + SYMBOL_BASE


def _sort(rng, n, cfg):
    x = _symbols(rng, n, cfg)
    return x + SYMBOL_BASE, np.sort(x, axis=1) + SYMBOL_BASE


def _digits_lsb_first(values: np.ndarray, width: int) -> np.ndarray:
    return (values[:, None] // 10 ** np.arange(width)) % 10


def _add(rng, n, cfg):
    d = cfg.add_digits
    a, b = rng.integers(0, 10**d, size=(2, n))
    plus = np.full((n, 1), PLUS)
    inputs = np.concatenate([_digits_lsb_first(a, d) + DIGIT_BASE, plus, _digits_lsb_first(b, d) + DIGIT_BASE], 1)
    return inputs, _digits_lsb_first(a + b, d + 1) + DIGIT_BASE


def _lookup(rng, n, cfg):
    p = cfg.lookup_pairs
    keys = np.argsort(rng.random((n, cfg.num_symbols)), axis=1)[:, :p]  # distinct keys per example
    values = rng.integers(0, 10, size=(n, p))
    which = rng.integers(0, p, size=n)
    pairs = np.stack([keys + SYMBOL_BASE, values + DIGIT_BASE], axis=2).reshape(n, 2 * p)
    query = np.stack([np.full(n, QUERY), keys[np.arange(n), which] + SYMBOL_BASE], axis=1)
    return np.concatenate([pairs, query], 1), values[np.arange(n), which, None] + DIGIT_BASE


def _count(rng, n, cfg):
    # The count c is uniform over 1..seq_symbols (a constant guess scores 1/seq_symbols); the other positions
    # hold symbols other than s.
    length = cfg.seq_symbols
    c = rng.integers(1, length + 1, size=n)
    s = rng.integers(0, cfg.num_symbols, size=n)
    others = rng.integers(0, cfg.num_symbols - 1, size=(n, length))
    others += others >= s[:, None]
    is_s = np.argsort(np.argsort(rng.random((n, length)), axis=1), axis=1) < c[:, None]
    x = np.where(is_s, s[:, None], others)
    query = np.stack([np.full(n, QUERY), s + SYMBOL_BASE], axis=1)
    return np.concatenate([x + SYMBOL_BASE, query], 1), c[:, None] + DIGIT_BASE


GENERATORS: dict[str, Generator] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "lookup": _lookup,
    "count": _count,
}


def validate_data_config(cfg: DataConfig) -> None:
    for field_name in ("tasks", "eval_tasks"):
        for t in getattr(cfg, field_name) or ():
            if t not in GENERATORS:
                raise ValueError(f"data.{field_name}: unknown task {t!r}; expected some of {list(GENERATORS)}")
    if not cfg.tasks:
        raise ValueError("data.tasks: expected at least one task")
    if cfg.seq_symbols > 9:
        raise ValueError(f"data.seq_symbols={cfg.seq_symbols}: counts are written as one digit, so it must be <= 9")
    if cfg.num_symbols < 2:
        raise ValueError(f"data.num_symbols={cfg.num_symbols}: expected >= 2")
    if not 1 <= cfg.lookup_pairs <= cfg.num_symbols:
        raise ValueError(f"data.lookup_pairs={cfg.lookup_pairs}: expected 1..num_symbols ({cfg.num_symbols})")
    if cfg.add_digits < 1:
        raise ValueError(f"data.add_digits={cfg.add_digits}: expected >= 1")
    if cfg.train_per_task < 1:
        raise ValueError(f"data.train_per_task={cfg.train_per_task}: expected >= 1")
    if cfg.val_per_task < 1:
        raise ValueError(f"data.val_per_task={cfg.val_per_task}: expected >= 1 (the final evaluation needs examples)")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size={cfg.batch_size}: expected >= 1")


def max_example_len(cfg: DataConfig) -> int:
    """Length of ``[task, input, SEP, target]`` for the longest task (all rows are padded to it)."""
    rng = np.random.default_rng(0)
    return max(sum(a.shape[1] for a in gen(rng, 1, cfg)) + 2 for gen in GENERATORS.values())


@dataclass
class TaskSplit:
    """One split: ``tokens [N, L]`` int64, ``target_mask [N, L]`` bool, ``task_id [N]`` int64 (index in ALL_TASKS)."""

    tokens: torch.Tensor
    target_mask: torch.Tensor
    task_id: torch.Tensor


def _encode(task: str, inputs: np.ndarray, targets: np.ndarray, length: int, vocab: Vocab):
    n = inputs.shape[0]
    body = np.concatenate([np.full((n, 1), vocab.task_token(task)), inputs, np.full((n, 1), SEP), targets], 1)
    tokens = np.full((n, length), PAD, dtype=np.int64)
    tokens[:, : body.shape[1]] = body
    mask = np.zeros((n, length), dtype=bool)
    start = 2 + inputs.shape[1]
    mask[:, start : start + targets.shape[1]] = True
    return tokens, mask


def build_splits(cfg: DataConfig) -> tuple[TaskSplit, TaskSplit]:
    """Deterministic (train, val) splits for ``cfg.tasks`` (train) and the eval tasks (val)."""
    validate_data_config(cfg)
    vocab, length = Vocab(cfg.num_symbols), max_example_len(cfg)
    eval_tasks = cfg.eval_tasks or list(ALL_TASKS)
    out = {"train": [], "val": []}
    for task in (t for t in ALL_TASKS if t in cfg.tasks or t in eval_tasks):
        # One stream per task, independent of which other tasks are selected.
        rng = np.random.default_rng([cfg.seed, ALL_TASKS.index(task)])
        val_tok, val_mask = _encode(task, *GENERATORS[task](rng, cfg.val_per_task, cfg), length, vocab)
        val_tok, first = np.unique(val_tok, axis=0, return_index=True)
        val_mask = val_mask[first]
        if task in eval_tasks:
            out["val"].append((task, val_tok, val_mask))
        if task in cfg.tasks:
            tr_tok, tr_mask = _encode(task, *GENERATORS[task](rng, cfg.train_per_task, cfg), length, vocab)
            seen = {row.tobytes() for row in val_tok}
            keep = np.array([row.tobytes() not in seen for row in tr_tok], dtype=bool)
            out["train"].append((task, tr_tok[keep], tr_mask[keep]))

    def stack(parts) -> TaskSplit:
        return TaskSplit(
            tokens=torch.from_numpy(np.concatenate([p[1] for p in parts])),
            target_mask=torch.from_numpy(np.concatenate([p[2] for p in parts])),
            task_id=torch.cat([torch.full((len(p[1]),), ALL_TASKS.index(p[0])) for p in parts]),
        )

    return stack(out["train"]), stack(out["val"])


class SplitDataset(Dataset):
    """Map-style dataset over a TaskSplit; ``__getitems__`` fetches a whole batch with one index op."""

    def __init__(self, split: TaskSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.tokens.shape[0]

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.as_tensor(idx)
        return {
            "tokens": self.split.tokens[ix],
            "target_mask": self.split.target_mask[ix],
            "task_id": self.split.task_id[ix],
        }


def _identity(batch):
    return batch


class _SkipBatches:
    """The batch sampler ``batches`` without its first ``skip`` batches (indices only: no data is loaded)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints and restores (``state_dict``/``load_state_dict``: Lightning
    saves them for every train loader that has both), so a resumed run sees exactly the batches an uninterrupted
    run would.

    The state is the shuffling generator's state when the current epoch started (None with a sampler that orders
    each epoch by itself, ``moe.data.windows.EpochSampler``) and the number of batches handed
    out since. Restoring it replays the epoch's permutation and skips the batches already trained on, at the index
    level. Lightning fetches a sized loader's batches one at a time, so at a checkpoint the count is the number of
    batches trained on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_start: torch.Tensor | None = None  # generator state at the start of the current epoch
        self._started = False  # an epoch was started (a sampler of its own, e.g. per (seed, epoch), has no generator)
        self._served = 0  # batches handed out in the current epoch
        self._skip = 0  # batches to leave out of the epoch being started (set while resuming)
        self._resume: dict | None = None

    @property
    def _index_sampler(self):
        batches = super()._index_sampler
        return _SkipBatches(batches, self._skip) if self._skip else batches

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            if self.generator is not None and state["generator"] is not None:
                self.generator.set_state(state["generator"])
            skip = state["served"]
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        self._started = True
        self._skip = skip
        try:
            batches = super().__iter__()
        finally:
            self._skip = 0
        self._served = skip
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        if not self._started or self._served >= len(self):
            # Not started, or the epoch is over: the next epoch starts from the generator's current state.
            gen = self.generator.get_state() if self.generator is not None else None
            return {"generator": gen, "served": 0}
        return {"generator": self._epoch_start, "served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class MultiTaskDataModule(L.LightningDataModule):
    """The embedded tasks (``data=multitask``, ``moe.data.TrainData``): ``objective`` "tasks"."""

    objective = "tasks"
    # what the best checkpoint is chosen by (conf/callbacks: ${data_monitor:...}): = val/mean_accuracy unless a
    # fine-tune trains on fewer tasks than it evaluates
    monitor = ("val/mean_accuracy_trained", "max")
    task_names = list(ALL_TASKS)  # task_id indexes this list (routing statistics)

    @classmethod
    def check_config(cls, cfg: DataConfig) -> None:
        validate_data_config(cfg)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer=None) -> MultiTaskDataModule:
        if tokenizer is not None:
            raise ValueError("data=multitask has its own vocabulary: it cannot use the model's tokenizer (use "
                             "data=text with model=hf)")  # fmt: skip
        return cls(cfg)

    def metrics(self):
        """Exact match per task during training (``moe.data.metrics.TaskMetrics``)."""
        from moe.data.metrics import TaskMetrics

        return TaskMetrics(self.task_names, self.eval_tasks, self.train_tasks)

    def evaluate(self, model):
        """Exact match per evaluated task on the validation split (``moe.data.Evaluation``)."""
        from moe.data import Evaluation
        from moe.data.metrics import evaluate_tasks

        accs = evaluate_tasks(model, self.val_split)
        mean = sum(accs.values()) / len(accs)
        return Evaluation(metrics={**{f"final/acc/{t}": a for t, a in accs.items()}, "final/mean_accuracy": mean},
                          results={"tasks": accs, "mean_accuracy": mean}, title="Exact match on validation",
                          table=accs)  # fmt: skip

    @property
    def train_tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    def __init__(self, cfg: DataConfig):
        super().__init__()
        validate_data_config(cfg)
        self.cfg = cfg
        self.vocab = Vocab(cfg.num_symbols)
        self.seq_len = max_example_len(cfg) - 1  # the model sees tokens[:-1] and predicts tokens[1:]
        self.train_split: TaskSplit | None = None
        self.val_split: TaskSplit | None = None

    @property
    def eval_tasks(self) -> list[str]:
        return list(self.cfg.eval_tasks or ALL_TASKS)

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is None:
            self.train_split, self.val_split = build_splits(self.cfg)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return ResumableDataLoader(
            SplitDataset(self.train_split),
            batch_size=self.cfg.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            SplitDataset(self.val_split),
            batch_size=512,
            shuffle=False,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
        )
