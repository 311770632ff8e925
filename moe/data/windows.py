"""Packed token windows for language modelling, shared by ``data=text`` and ``data=pycode``.

- **Split** (``split_units``): by unit (a document, or pycode's module), never by position inside one. A group's
  units are visited in the order of a SHA-256 hash of their key (salted), and each one that brings the held-out
  size closer to ``fraction`` of the group's goes out (the smallest one if none does); the last unit in hash
  order always stays in. So the split is the same on every run and in any listing order.
- **Corpus** (``TokenCorpus``, ``pack``): per group, ``[SEP, doc, SEP, doc, ...]`` as one segment of a single token
  tensor; a window never crosses groups. ``SEP`` (``sep``: byte-level ``BOS`` = 256, else the tokenizer's EOS)
  is never a scored target. ``nbytes``: the UTF-8 bytes of text each token covers (None: one per token, byte-level).
- **Windows**: ``seq_len + 1`` tokens. Training draws random windows per epoch, a pure function of ``(seed,
  epoch)`` (``EpochSampler`` over ``TrainWindows``); validation takes evenly spaced windows per group, fixed
  (``val_windows``). Batches: ``tokens [B, S+1]`` int64, ``target_mask [B, S+1]`` bool (False at SEP and at
  position 0), ``task_id [B]`` int64 (the group), ``target_bytes [B, S+1]`` int32 (0 where not scored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from moe.data.tasks import SplitDataset, TaskSplit

BOS = 256  # byte-level: ids 0..255 are the bytes, 256 separates documents (and pads)


@dataclass(frozen=True)
class ByteVocab:
    """Bytes 0..255, then ``BOS`` (document separator and padding, never a target)."""

    @property
    def size(self) -> int:
        return BOS + 1


@dataclass(frozen=True)
class TokenVocab:
    """A tokenizer's ids: ``size`` = ``len(tokenizer)``."""

    size: int


def unit_hash(key: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")


def split_units(sizes: Mapping[str, int], fraction: float, salt: int = 0) -> set[str]:
    """The held-out units of one group (``sizes``: unit key -> size): see the module docstring. None when the
    group has fewer than two units."""
    if len(sizes) < 2:
        return set()
    order = sorted(sizes, key=lambda u: (unit_hash(u, salt), u))[:-1]
    target, held, chosen = fraction * sum(sizes.values()), 0, []
    for unit in order:
        if held + sizes[unit] / 2 <= target:  # |held + size - target| <= |held - target|
            chosen.append(unit)
            held += sizes[unit]
    return set(chosen or [min(order, key=lambda u: (sizes[u], unit_hash(u, salt)))])


class Document(NamedTuple):
    name: str  # where it came from (a path, "path:line")
    ids: np.ndarray  # [n] token ids
    nbytes: np.ndarray | None  # [n] UTF-8 bytes per token; None: one each (byte-level)


@dataclass
class TokenCorpus:
    """One split as a single token tensor: per group, ``[SEP, doc, SEP, doc, ...]``.

    ``seg_group[i]`` is the group index (``task_names``) of segment ``i`` = ``data[seg_start[i] : seg_end[i]]``.
    """

    data: torch.Tensor  # [N] token ids (int16, or int32 for a vocabulary over 32767)
    seg_group: torch.Tensor  # [G] int64
    seg_start: torch.Tensor  # [G] int64
    seg_end: torch.Tensor  # [G] int64
    files: list[str]  # the documents it holds, in order
    nbytes: torch.Tensor | None = None  # [N] uint8/int32: UTF-8 bytes per token, 0 at SEP; None: 1 but at SEP
    sep: int = BOS

    @property
    def seg_domain(self) -> torch.Tensor:  # data=pycode's name for the group
        return self.seg_group


def pack(groups: Sequence[tuple[int, Sequence[Document]]], sep: int = BOS) -> TokenCorpus:
    """``(group index, documents)`` in order -> a TokenCorpus; a group without documents has no segment."""
    exact = any(d.nbytes is not None for _, docs in groups for d in docs)  # else byte-level: one byte per token
    ids, nbytes, names, seg_group, seg_start, seg_end = [], [], [], [], [], []
    sep_ids, zero = np.array([sep], dtype=np.int64), np.zeros(1, dtype=np.int32)
    pos = 0
    for g, docs in groups:
        if not docs:
            continue
        seg_group.append(g)
        seg_start.append(pos)
        for d in docs:
            ids += [sep_ids, d.ids]
            if exact:
                nbytes += [zero, d.nbytes if d.nbytes is not None else np.ones(len(d.ids), dtype=np.int32)]
            names.append(d.name)
            pos += 1 + len(d.ids)
        seg_end.append(pos)
    dtype = np.int16 if sep < 2**15 and all(a.size == 0 or a.max() < 2**15 for a in ids) else np.int32
    data = torch.from_numpy(np.concatenate(ids or [np.zeros(0, dtype)], dtype=dtype, casting="same_kind"))
    nb_dtype = np.uint8 if all(a.size == 0 or a.max() < 256 for a in nbytes) else np.int32
    nb = torch.from_numpy(np.concatenate(nbytes, dtype=nb_dtype, casting="unsafe")) if exact else None
    seg_group, seg_start, seg_end = (torch.tensor(x, dtype=torch.int64) for x in (seg_group, seg_start, seg_end))
    return TokenCorpus(data, seg_group, seg_start, seg_end, names, nb, sep)


def gather_windows(
    data: torch.Tensor, starts: torch.Tensor, length: int, sep: int = BOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, length]`` int64 and ``target_mask`` (False at ``sep`` and at position 0)."""
    tokens = data[starts[:, None] + torch.arange(length)].long()
    mask = tokens != sep
    mask[:, 0] = False
    return tokens, mask


def window_batch(corpus: TokenCorpus, starts: torch.Tensor, length: int, seg: torch.Tensor) -> dict:
    """The batch of the windows at ``starts`` (each inside segment ``seg``)."""
    tokens, mask = gather_windows(corpus.data, starts, length, corpus.sep)
    if corpus.nbytes is None:
        nbytes = mask.int()
    else:
        nbytes = corpus.nbytes[starts[:, None] + torch.arange(length)].int() * mask
    return {"tokens": tokens, "target_mask": mask, "task_id": corpus.seg_group[seg], "target_bytes": nbytes}


class TrainWindows(Dataset):
    """Every window of ``seq_len + 1`` tokens inside one group segment; index ``i`` is the i-th such window."""

    def __init__(self, corpus: TokenCorpus, seq_len: int):
        self.corpus, self.length = corpus, seq_len + 1
        counts = (corpus.seg_end - corpus.seg_start - self.length + 1).clamp_min(0)  # segments too short: none
        self.cum = torch.cumsum(counts, 0)
        self.first = self.cum - counts  # index of each segment's first window

    def __len__(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.as_tensor(idx, dtype=torch.int64)
        seg = torch.searchsorted(self.cum, ix, right=True)
        starts = self.corpus.seg_start[seg] + ix - self.first[seg]
        return window_batch(self.corpus, starts, self.length, seg)


def check_window_settings(cfg, prefix: str, counts: tuple[str, ...]) -> None:
    """The settings every windowed corpus shares: ``val_fraction`` in (0, 1), ``tune_fraction`` in [0, 1), each of
    ``counts`` >= 1; errors name ``<prefix>.<key>``."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"{prefix}.val_fraction={cfg.val_fraction}: expected 0 < val_fraction < 1")
    if not 0.0 <= cfg.tune_fraction < 1.0:
        raise ValueError(f"{prefix}.tune_fraction={cfg.tune_fraction}: expected 0 <= tune_fraction < 1")
    for name in counts:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{prefix}.{name}={getattr(cfg, name)}: expected >= 1")


class EpochSampler(Sampler[int]):
    """``num_samples`` uniform indices in ``[0, n)`` per epoch, drawn from ``(seed, epoch)`` alone (Lightning calls
    ``set_epoch`` at each epoch start), so epoch e is the same whatever happened before it."""

    def __init__(self, n: int, num_samples: int, seed: int):
        if n < 1:
            raise ValueError("no training window fits: every selected group is shorter than seq_len + 1 tokens")
        self.n, self.num_samples, self.seed, self.epoch = n, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(unit_hash(f"{self.seed}/{self.epoch}", 0) >> 1)
        return iter(torch.randint(self.n, (self.num_samples,), generator=g).tolist())


@dataclass
class WindowSplit(TaskSplit):
    """Fixed windows (``TaskSplit``) with ``target_bytes [N, L]`` int32: the bytes each scored target covers."""

    target_bytes: torch.Tensor | None = None


def val_windows(corpus: TokenCorpus, seq_len: int, per_group: int) -> WindowSplit:
    """Up to ``per_group`` evenly spaced windows per segment (one SEP-padded window if the segment is short)."""
    length = seq_len + 1
    parts = []
    for i, (a, b) in enumerate(zip(corpus.seg_start.tolist(), corpus.seg_end.tolist())):
        seg = torch.tensor([i])
        if b - a >= length:
            m = min(per_group, (b - a - 1) // seq_len)
            starts = torch.linspace(a, b - length, m, dtype=torch.float64).round().long()
            parts.append(window_batch(corpus, starts, length, seg.expand(m)))
        else:  # the segment, then SEP (unscored) up to one window
            pad = length - (b - a)
            padded = TokenCorpus(
                torch.cat([corpus.data[a:b], torch.full((pad,), corpus.sep, dtype=corpus.data.dtype)]),
                corpus.seg_group[seg], torch.zeros(1, dtype=torch.int64), torch.tensor([length]), [],
                None if corpus.nbytes is None else torch.cat([corpus.nbytes[a:b], corpus.nbytes.new_zeros(pad)]),
                corpus.sep,
            )  # fmt: skip
            parts.append(window_batch(padded, torch.zeros(1, dtype=torch.int64), length, torch.zeros(1).long()))
    if not parts:
        raise ValueError("no validation text: the selected eval groups hold no validation document")
    return WindowSplit(*(torch.cat([p[k] for p in parts]) for k in ("tokens", "target_mask", "task_id",
                                                                     "target_bytes")))  # fmt: skip


class WindowDataset(SplitDataset):
    """``SplitDataset`` over a ``WindowSplit``: batches also carry ``target_bytes`` (one byte per scored target
    when the split has none)."""

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        out, s = super().__getitems__(idx), self.split
        ix = torch.as_tensor(idx)
        out["target_bytes"] = s.target_bytes[ix] if s.target_bytes is not None else s.target_mask[ix].int()
        return out
