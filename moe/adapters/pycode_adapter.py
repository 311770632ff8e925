"""``merging``'s ``TaskAdapter`` for the stdlib byte-level LM (``data=pycode``, ``moe.data.pycode``).

Scores are bits per byte per domain, lower is better: compare a merge with the gain share
(``merging.search.gain_share``), which does not depend on the score's direction, not with ``eval=true``'s ratio
to the fine-tune (meant for accuracies). Splits: "val" is the reported held-out modules, "search" the tuning
modules (``data.pycode.tune_fraction > 0``), neither of them trained on.

    python -m merging -m hydra/sweeper=merge_optuna adapter._target_=moe.adapters.pycode_adapter.PyCodeAdapter \
        data=pycode data.pycode.tune_fraction=0.1 base=B models=[F1,F2] tasks=[email,json] out=merged method=ties
"""

from __future__ import annotations

import torch
from torch import nn

from moe.adapters.moe_adapter import MoEAdapter, data_config
from moe.data import data_class
from moe.data.pycode import DOMAINS, PyCodeDataModule, evaluate_bits_per_byte, gather_windows


class PyCodeAdapter(MoEAdapter):
    """``MoEAdapter`` whose task data is ``data.pycode``: tasks are stdlib domains, scores bits per byte."""

    def __init__(self, model_cfg=None, router_cfg=None):
        super().__init__(model_cfg, router_cfg)
        self._modules: dict[str, PyCodeDataModule] = {}

    def datamodule(self, data) -> PyCodeDataModule:
        """The set-up data module of ``data`` (a ``DataConfig`` or its dict form), built once per configuration."""
        cfg = data_config(data)
        if not issubclass(data_class(cfg), PyCodeDataModule):
            raise ValueError(f"data._target_={cfg._target_!r}: PyCodeAdapter reads data=pycode "
                             "(moe.data.pycode.PyCodeDataModule)")  # fmt: skip
        key = repr(cfg.pycode)
        if key not in self._modules:
            dm = PyCodeDataModule(cfg.pycode)
            dm.setup()
            self._modules[key] = dm
        return self._modules[key]

    def evaluate(self, model: nn.Module, data, split: str = "val") -> dict[str, float]:
        """Bits per byte per eval domain on the held-out ("val") or tuning ("search") modules."""
        dm = self.datamodule(data)
        if split == "val":
            windows = dm.val_split
        elif split == "search":
            if dm.tune_split is None:
                raise ValueError("split='search' needs data.pycode.tune_fraction > 0 (a tuning split of modules)")
            windows = dm.tune_split
        else:
            raise ValueError(f"split={split!r}: expected 'val' or 'search'")
        scores = evaluate_bits_per_byte(model, windows)
        return {d: scores[d] for d in dm.eval_tasks if d in scores}

    def unlabeled(self, data, task: str | None = None, prompts: bool = False, batch_size: int = 16,
                  batches: int = 8) -> list:  # fmt: skip
        """``batches`` batches of evenly spaced training windows (of domain ``task`` only, if given), ``[B,
        seq_len]``; ``prompts``: their first half (DivMerge continues them for ``answer_length`` bytes)."""
        dm = self.datamodule(data)
        c = dm.train_corpus
        segs = [i for i, d in enumerate(c.seg_domain.tolist()) if task is None or DOMAINS[d] == task]
        if not segs:
            raise ValueError(f"tasks: {task!r} has no training text in data.pycode.domains")
        seq = dm.seq_len
        per_seg = batches * batch_size // len(segs) + 1
        starts = torch.cat([torch.linspace(c.seg_start[i], c.seg_end[i] - seq - 1, per_seg).long() for i in segs])
        starts = starts[: batches * batch_size]
        tokens, _ = gather_windows(c.data, starts, seq)
        tokens = tokens[:, : seq // 2] if prompts else tokens
        return list(tokens.split(batch_size))

    def answer_length(self, data, task: str) -> int:
        """DivMerge's continuation length: a quarter of a window."""
        return self.datamodule(data).seq_len // 4
