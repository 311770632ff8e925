"""Byte-level language modelling on the Python standard library's own source (no download).

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (minus tests, third-party packages and
generated tables, see ``PyCodeConfig.exclude``). Batches have the multi-task format of ``moe.data.tasks``:
``tokens [B, S+1]`` int64, ``target_mask [B, S+1]`` bool, ``task_id [B]`` int64 (the index in ``DOMAINS``).

- **Vocabulary** (``ByteVocab``, 257 ids): ids 0..255 are the byte values, 256 is ``BOS``, written before every
  file (a document separator) and used as padding. ``BOS`` is never scored: ``target_mask`` is False on it and on
  the first position of each window, so every scored target is one byte and ``loss / ln 2`` is bits per byte.
- **Domains**: the top-level package a file belongs to, if it is one of ``DOMAINS``, else ``"other"``.
- **Split**: by path, never by position in a file. The unit is a module: a file, except that a package in
  ``other`` (``logging/``, ``ctypes/``...) goes whole. Per domain, units are ordered by a SHA-256 hash of their
  relative path and taken into validation until ``val_fraction`` of the domain's bytes is held out (at least
  one unit each side). So the split is the same on every run and in any file-listing order, and no validation
  file's bytes are ever trained on. ``tune_fraction > 0`` then holds out a tuning split from the training units
  the same way (salt ``split_seed + 1``): trained on by nothing, reported by nothing (``tune_split``).
- **Windows**: per split, each domain's files are concatenated (``[BOS, file, BOS, file, ...]``, sorted by path)
  into one segment of a single uint8 tensor; a window never crosses domains. Training draws ``train_windows``
  random windows per epoch, a pure function of ``(seed, epoch)``; validation takes ``val_windows_per_domain``
  evenly spaced windows per domain, fixed.
- **Token classes** (``token_classes``): letter, digit, whitespace, punctuation, keyword (every byte of a whole
  word in ``keyword.kwlist``, anywhere, comments and strings included; soft keywords excluded), other (non-ASCII
  bytes, control bytes, ``BOS``).
"""

from __future__ import annotations

import hashlib
import keyword
import math
import os
import string
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from moe.config import PyCodeConfig
from moe.data.tasks import SplitDataset, TaskSplit

# Top-level stdlib packages with >= ~40 KB of source on 3.10-3.13 that the routing heatmap shows as rows;
# everything else is "other" (which must stay last).
DOMAINS = (
    "asyncio",
    "concurrent",
    "email",
    "http",
    "idlelib",
    "importlib",
    "json",
    "logging",
    "multiprocessing",
    "tkinter",
    "unittest",
    "urllib",
    "xml",
    "other",
)
CLASS_NAMES = ("letter", "digit", "whitespace", "punctuation", "keyword", "other")
LETTER, DIGIT, WHITESPACE, PUNCTUATION, KEYWORD, OTHER = range(len(CLASS_NAMES))
BOS = 256
_SEP_BYTE = 0  # BOS as stored in the uint8 corpus: NUL cannot occur in Python source (files holding one are skipped)


@dataclass(frozen=True)
class ByteVocab:
    """Bytes 0..255, then ``BOS`` (document separator and padding, never a target)."""

    @property
    def size(self) -> int:
        return BOS + 1


def validate_pycode_config(cfg: PyCodeConfig) -> None:
    for name in ("domains", "eval_domains"):
        for d in getattr(cfg, name) or ():
            if d not in DOMAINS:
                raise ValueError(f"data.pycode.{name}: unknown domain {d!r}; expected some of {list(DOMAINS)}")
        if getattr(cfg, name) is not None and not getattr(cfg, name):
            raise ValueError(f"data.pycode.{name}: expected at least one domain (or null for all)")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.pycode.val_fraction={cfg.val_fraction}: expected 0 < val_fraction < 1")
    if not 0.0 <= cfg.tune_fraction < 1.0:
        raise ValueError(f"data.pycode.tune_fraction={cfg.tune_fraction}: expected 0 <= tune_fraction < 1")
    for name in ("seq_len", "batch_size", "train_windows", "val_windows_per_domain"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"data.pycode.{name}={getattr(cfg, name)}: expected >= 1")


# ---------------------------------------------------------------------------------------------------------------
# Corpus and split
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    path: str  # posix path relative to the root, e.g. "email/mime/text.py"
    domain: str
    size: int

    @property
    def unit(self) -> str:
        """The split unit: the file, or in ``other`` its whole top-level module (``logging``, ``argparse.py``)."""
        return self.path.split("/", 1)[0] if self.domain == "other" else self.path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def domain_of(path: str) -> str:
    top = path.split("/", 1)[0].removesuffix(".py")
    return top if top in DOMAINS else "other"


def list_files(root: str | Path, exclude: list[str] | tuple[str, ...] = ()) -> list[SourceFile]:
    """Every ``.py`` file under ``root`` outside excluded directories, sorted by relative path."""
    root, skip = Path(root), set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                rel = (rel_dir / name).as_posix()
                out.append(SourceFile(rel, domain_of(rel), (Path(dirpath) / name).stat().st_size))
    return sorted(out, key=lambda f: f.path)


def _path_hash(unit: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{unit}".encode()).digest()[:8], "big")


def split_files(
    files: list[SourceFile], val_fraction: float, salt: int = 0
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, val), each sorted by path. Per domain, units are visited in hash order and each one that brings the
    held-out bytes closer to ``val_fraction`` of the domain's goes to validation (the smallest unit if none does);
    the last unit in hash order always stays in training."""
    val_units: set[str] = set()
    for domain in DOMAINS:
        sizes: dict[str, int] = {}
        for f in files:
            if f.domain == domain:
                sizes[f.unit] = sizes.get(f.unit, 0) + f.size
        if len(sizes) < 2:
            continue
        order = sorted(sizes, key=lambda u: (_path_hash(u, salt), u))[:-1]
        target, held, chosen = val_fraction * sum(sizes.values()), 0, []
        for unit in order:
            if held + sizes[unit] / 2 <= target:  # |held + size - target| <= |held - target|
                chosen.append(unit)
                held += sizes[unit]
        val_units.update(chosen or [min(order, key=lambda u: (sizes[u], _path_hash(u, salt)))])
    files = sorted(files, key=lambda f: f.path)
    return [f for f in files if f.unit not in val_units], [f for f in files if f.unit in val_units]


@dataclass
class ByteCorpus:
    """One split as a single uint8 tensor: per domain, ``[SEP, file, SEP, file, ...]`` (SEP stored as byte 0).

    ``seg_domain[i]`` is the DOMAINS index of segment ``i`` = ``data[seg_start[i] : seg_end[i]]``.
    """

    data: torch.Tensor  # [N] uint8
    seg_domain: torch.Tensor  # [G] int64
    seg_start: torch.Tensor  # [G] int64
    seg_end: torch.Tensor  # [G] int64
    files: list[str]  # relative paths it holds


def build_corpus(root: str | Path, files: list[SourceFile], domains: list[str] | None = None) -> ByteCorpus:
    """Read ``files`` (restricted to ``domains``) into a ByteCorpus; a file holding a NUL byte is skipped."""
    root = Path(root)
    chunks: list[bytes] = []
    seg_domain, seg_start, seg_end, kept = [], [], [], []
    pos = 0
    for d, domain in enumerate(DOMAINS):
        if domains is not None and domain not in domains:
            continue
        start = pos
        for f in (f for f in files if f.domain == domain):
            raw = (root / f.path).read_bytes()
            if b"\0" in raw:
                continue
            chunks += [b"\0", raw]
            pos += 1 + len(raw)
            kept.append(f.path)
        if pos > start:
            seg_domain.append(d)
            seg_start.append(start)
            seg_end.append(pos)
    data = torch.from_numpy(np.frombuffer(b"".join(chunks), dtype=np.uint8).copy())
    seg_domain, seg_start, seg_end = (torch.tensor(x, dtype=torch.int64) for x in (seg_domain, seg_start, seg_end))
    return ByteCorpus(data, seg_domain, seg_start, seg_end, kept)


def gather_windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, length]`` int64 (SEP -> BOS) and ``target_mask`` (False at BOS and at position 0)."""
    tokens = data[starts[:, None] + torch.arange(length)].long()
    tokens[tokens == _SEP_BYTE] = BOS
    mask = tokens != BOS
    mask[:, 0] = False
    return tokens, mask


class TrainWindows(Dataset):
    """Every window of ``seq_len + 1`` tokens inside one domain segment; index ``i`` is the i-th such window."""

    def __init__(self, corpus: ByteCorpus, seq_len: int):
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
        tokens, mask = gather_windows(self.corpus.data, starts, self.length)
        return {"tokens": tokens, "target_mask": mask, "task_id": self.corpus.seg_domain[seg]}


class EpochSampler(Sampler[int]):
    """``num_samples`` uniform indices in ``[0, n)`` per epoch, drawn from ``(seed, epoch)`` alone (Lightning calls
    ``set_epoch`` at each epoch start), so epoch e is the same whatever happened before it."""

    def __init__(self, n: int, num_samples: int, seed: int):
        if n < 1:
            raise ValueError("no training window fits: every selected domain is shorter than seq_len + 1 bytes")
        self.n, self.num_samples, self.seed, self.epoch = n, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_path_hash(f"{self.seed}/{self.epoch}", 0) >> 1)
        return iter(torch.randint(self.n, (self.num_samples,), generator=g).tolist())


def val_windows(corpus: ByteCorpus, seq_len: int, per_domain: int) -> TaskSplit:
    """Up to ``per_domain`` evenly spaced windows per segment (one BOS-padded window if the segment is short)."""
    length = seq_len + 1
    tokens, masks, task_ids = [], [], []
    for d, a, b in zip(corpus.seg_domain.tolist(), corpus.seg_start.tolist(), corpus.seg_end.tolist()):
        if b - a >= length:
            m = min(per_domain, (b - a - 1) // seq_len)
            starts = torch.linspace(a, b - length, m, dtype=torch.float64).round().long()
            tok, mask = gather_windows(corpus.data, starts, length)
        else:
            padded = torch.cat([corpus.data[a:b], torch.full((length - (b - a),), _SEP_BYTE, dtype=torch.uint8)])
            tok, mask = gather_windows(padded, torch.zeros(1, dtype=torch.int64), length)
        tokens.append(tok)
        masks.append(mask)
        task_ids.append(torch.full((tok.shape[0],), d, dtype=torch.int64))
    if not tokens:
        raise ValueError("no validation text: the selected eval domains hold no validation file")
    return TaskSplit(torch.cat(tokens), torch.cat(masks), torch.cat(task_ids))


# ---------------------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------------------


def _identity(batch):
    return batch


class PyCodeDataModule(L.LightningDataModule):
    """``data=pycode`` (``moe.data.TrainData``, objective "lm"): ``dm.vocab.size`` (257) and ``dm.seq_len`` are
    what the model needs, as for ``MultiTaskDataModule``; built from ``data.pycode``."""

    objective = "lm"
    task_names = list(DOMAINS)  # task_id indexes this list

    @classmethod
    def check_config(cls, cfg) -> None:
        validate_pycode_config(cfg.pycode)

    @classmethod
    def from_config(cls, cfg) -> PyCodeDataModule:
        return cls(cfg.pycode)

    @property
    def train_tasks(self) -> list[str] | None:
        return list(self.cfg.domains) if self.cfg.domains else None
    class_names = list(CLASS_NAMES)  # what token_classes returns indexes this list (routing heatmaps)

    def __init__(self, cfg: PyCodeConfig):
        super().__init__()
        validate_pycode_config(cfg)
        self.cfg = cfg
        self.vocab = ByteVocab()
        self.seq_len = cfg.seq_len  # the model sees tokens[:, :-1]
        self.root = Path(cfg.root) if cfg.root else stdlib_root()
        self.train_files: list[SourceFile] | None = None
        self.val_files: list[SourceFile] | None = None
        self.train_corpus: ByteCorpus | None = None
        self.val_split: TaskSplit | None = None
        self.tune_files: list[SourceFile] = []
        self.tune_split: TaskSplit | None = None  # windows of the tuning modules (cfg.tune_fraction > 0)

    @staticmethod
    def token_classes(tokens: torch.Tensor) -> torch.Tensor:
        return token_classes(tokens)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def eval_tasks(self) -> list[str]:
        return list(self.cfg.eval_domains or DOMAINS)

    def setup(self, stage: str | None = None) -> None:
        if self.train_corpus is not None:
            return
        files = list_files(self.root, self.cfg.exclude)
        if not files:
            raise ValueError(f"data.pycode.root={str(self.root)!r}: no .py file found")
        self.train_files, self.val_files = split_files(files, self.cfg.val_fraction, self.cfg.split_seed)
        if self.cfg.tune_fraction > 0:
            self.train_files, self.tune_files = split_files(
                self.train_files, self.cfg.tune_fraction, self.cfg.split_seed + 1
            )
            tune_corpus = build_corpus(self.root, self.tune_files, self.eval_tasks)
            self.tune_split = val_windows(tune_corpus, self.cfg.seq_len, self.cfg.val_windows_per_domain)
        self.train_corpus = build_corpus(self.root, self.train_files, self.cfg.domains)
        val_corpus = build_corpus(self.root, self.val_files, self.eval_tasks)
        self.val_split = val_windows(val_corpus, self.cfg.seq_len, self.cfg.val_windows_per_domain)

    def train_dataloader(self) -> DataLoader:
        ds = TrainWindows(self.train_corpus, self.cfg.seq_len)
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=EpochSampler(len(ds), self.cfg.train_windows, self.cfg.seed),
            drop_last=True,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            SplitDataset(self.val_split),
            batch_size=128,
            shuffle=False,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
        )


# ---------------------------------------------------------------------------------------------------------------
# Token classes and bits per byte
# ---------------------------------------------------------------------------------------------------------------


def _class_table() -> torch.Tensor:
    table = torch.full((BOS + 1,), OTHER, dtype=torch.int64)
    for chars, cls in (
        (string.ascii_letters, LETTER),
        (string.digits, DIGIT),
        (string.whitespace, WHITESPACE),
        (string.punctuation, PUNCTUATION),
    ):
        table[list(chars.encode())] = cls
    return table


_CLASS_TABLE = _class_table()
_WORD = torch.zeros(BOS + 1, dtype=torch.bool)  # identifier bytes: [A-Za-z0-9_] and non-ASCII (UTF-8) bytes
_WORD[list((string.ascii_letters + string.digits + "_").encode())] = True
_WORD[128:256] = True
_KW_MAX = max(map(len, keyword.kwlist))  # 8 ("continue", "nonlocal")


def _pack_word(ascii_: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """One int64 per word ``ascii_[start : start + length]`` (length <= _KW_MAX): 7 bits per byte, then the length."""
    code = length << (7 * _KW_MAX)
    for j in range(_KW_MAX):
        code |= (ascii_[start + j] * (j < length)) << (7 * j)
    return code


def _keyword_codes() -> torch.Tensor:
    words = [k.encode() for k in keyword.kwlist]
    flat = torch.tensor(list(b"".join(w.ljust(_KW_MAX, b"\0") for w in words)))
    return _pack_word(flat, torch.arange(len(words)) * _KW_MAX, torch.tensor([len(w) for w in words]))


_KW_CODES = _keyword_codes()


def token_classes(tokens: torch.Tensor) -> torch.Tensor:
    """Same-shape int64: each token's index in ``CLASS_NAMES``. ``tokens [..., L]`` holds ids < 257; words are runs
    of identifier bytes along the last dim, and every byte of a word in ``keyword.kwlist`` is "keyword"."""
    shape, device = tokens.shape, tokens.device
    t = F.pad(tokens.reshape(-1, shape[-1]).long().cpu(), (0, 1), value=BOS)  # a non-word column ends every row
    flat = F.pad(t.reshape(-1), (0, _KW_MAX), value=BOS)
    word = _WORD[flat]
    prev = F.pad(word[:-1], (1, 0))
    nxt = F.pad(word[1:], (0, 1))
    starts = (word & ~prev).nonzero().squeeze(1)
    ends = (word & ~nxt).nonzero().squeeze(1)  # the k-th word starts at starts[k] and ends at ends[k]
    length = ends - starts + 1
    short = length <= _KW_MAX
    starts, length = starts[short], length[short]
    ascii_ = torch.where(flat < 128, flat, 0)  # non-ASCII bytes become 0, which no keyword holds
    hit = torch.isin(_pack_word(ascii_, starts, length), _KW_CODES)
    edges = torch.zeros(flat.numel() + 1, dtype=torch.int32)
    edges[starts[hit]] = 1
    edges[starts[hit] + length[hit]] = -1
    is_kw = torch.cumsum(edges, 0)[: t.numel()].bool()
    cls = torch.where(is_kw, KEYWORD, _CLASS_TABLE[t.reshape(-1)])
    return cls.reshape(t.shape)[:, :-1].reshape(shape).to(device)


def bits_per_byte(loss_nats_per_token: float | torch.Tensor) -> float:
    """Cross-entropy in nats per scored target -> bits per byte. Exact here: every scored target is one byte
    (BOS is never scored), so it is loss / ln 2."""
    return float(loss_nats_per_token) / math.log(2)


@torch.no_grad()
def evaluate_bits_per_byte(model: nn.Module, split: TaskSplit, batch_size: int = 128) -> dict[str, float]:
    """Bits per byte per domain present in ``split`` and over all of it ("all"), weighted by scored bytes.

    ``model(tokens[:, :-1])`` returns ``(logits [B, S, V], ...)`` as ``MoETransformer`` does."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(DOMAINS)
    nats, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for i in range(0, split.tokens.shape[0], batch_size):
        tokens = split.tokens[i : i + batch_size].to(device)
        mask = split.target_mask[i : i + batch_size, 1:].to(device)
        logits = model(tokens[:, :-1])[0]
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none") * mask
        task = split.task_id[i : i + batch_size]
        nats.index_add_(0, task, ce.sum(1).double().cpu())
        count.index_add_(0, task, mask.sum(1).double().cpu())
    model.train(was_training)
    out = {DOMAINS[d]: bits_per_byte(nats[d] / count[d]) for d in range(n) if count[d] > 0}
    out["all"] = bits_per_byte(nats.sum() / count.sum())
    return out
