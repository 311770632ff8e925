"""Byte-level language modelling on the Python standard library's own source (no download): ``data=text``'s
pipeline (``moe.data.text.LMDataModule``, ``moe.data.windows``) with pycode's own files, groups and split units.

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (minus tests, third-party packages and
generated tables, see ``PyCodeConfig.exclude``). Batches are ``moe.data.windows``'s: ``tokens [B, S+1]`` int64,
``target_mask [B, S+1]`` bool, ``task_id [B]`` int64 (the index in ``DOMAINS``), ``target_bytes [B, S+1]`` int32.

- **Vocabulary** (``ByteVocab``, 257 ids): ids 0..255 are the byte values, 256 is ``BOS``, written before every
  file (a document separator) and used as padding. ``BOS`` is never scored: ``target_mask`` is False on it and on
  the first position of each window, so every scored target is one byte and ``loss / ln 2`` is bits per byte.
- **Domains** (the groups): the top-level package a file belongs to, if it is one of ``DOMAINS``, else ``"other"``.
- **Split**: by path, never by position in a file. The unit is a module: a file, except that a package in
  ``other`` (``logging/``, ``ctypes/``...) goes whole. Per domain, units are ordered by a SHA-256 hash of their
  relative path and taken into validation until ``val_fraction`` of the domain's bytes is held out (at least
  one unit each side; ``moe.data.windows.split_units``). So the split is the same on every run and in any
  file-listing order, and no validation file's bytes are ever trained on. ``tune_fraction > 0`` then holds out a
  tuning split from the training units the same way (salt ``split_seed + 1``): trained on by nothing, reported
  by nothing (``tune_split``).
- **Windows**: per split, each domain's files are concatenated (``[BOS, file, BOS, file, ...]``, sorted by path)
  into one segment of a single token tensor; a window never crosses domains. Training draws ``train_windows``
  random windows per epoch, a pure function of ``(seed, epoch)``; validation takes ``val_windows_per_domain``
  evenly spaced windows per domain, fixed.
- **Token classes** (``token_classes``): letter, digit, whitespace, punctuation, keyword (every byte of a whole
  word in ``keyword.kwlist``, anywhere, comments and strings included; soft keywords excluded), other (non-ASCII
  bytes, control bytes, ``BOS``).
"""

from __future__ import annotations

import keyword
import math
import os
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.config import PyCodeConfig
from moe.data.tasks import TaskSplit
from moe.data.text import LMDataModule, group_bits_per_byte
from moe.data.windows import (  # noqa: F401  (EpochSampler, TrainWindows, gather_windows: pycode's names, kept)
    BOS,
    ByteVocab,
    Document,
    EpochSampler,
    TokenCorpus,
    TrainWindows,
    check_window_settings,
    gather_windows,
    pack,
    split_units,
    val_windows,
)

ByteCorpus = TokenCorpus  # pycode's name: one split's bytes, a segment per domain

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


def validate_pycode_config(cfg: PyCodeConfig) -> None:
    for name in ("domains", "eval_domains"):
        for d in getattr(cfg, name) or ():
            if d not in DOMAINS:
                raise ValueError(f"data.pycode.{name}: unknown domain {d!r}; expected some of {list(DOMAINS)}")
        if getattr(cfg, name) is not None and not getattr(cfg, name):
            raise ValueError(f"data.pycode.{name}: expected at least one domain (or null for all)")
    check_window_settings(cfg, "data.pycode", ("seq_len", "batch_size", "train_windows", "val_windows_per_domain"))


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


def split_files(
    files: list[SourceFile], val_fraction: float, salt: int = 0
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, val), each sorted by path: per domain, the units ``moe.data.windows.split_units`` holds out of
    ``val_fraction`` of the domain's bytes, hashing their relative paths."""
    val_units: set[str] = set()
    for domain in DOMAINS:
        sizes: dict[str, int] = {}
        for f in files:
            if f.domain == domain:
                sizes[f.unit] = sizes.get(f.unit, 0) + f.size
        val_units |= split_units(sizes, val_fraction, salt)
    files = sorted(files, key=lambda f: f.path)
    return [f for f in files if f.unit not in val_units], [f for f in files if f.unit in val_units]


def build_corpus(root: str | Path, files: list[SourceFile], domains: list[str] | None = None) -> ByteCorpus:
    """Read ``files`` (restricted to ``domains``) into a ByteCorpus, a segment per domain in ``DOMAINS`` order,
    files in path order; a file holding a NUL byte is skipped (binary)."""
    root, groups = Path(root), []
    for d, domain in enumerate(DOMAINS):
        if domains is not None and domain not in domains:
            continue
        docs = []
        for f in (f for f in files if f.domain == domain):
            raw = (root / f.path).read_bytes()
            if b"\0" not in raw:
                docs.append(Document(f.path, np.frombuffer(raw, dtype=np.uint8), None))
        groups.append((d, docs))
    return pack(groups, BOS)


# ---------------------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------------------


class PyCodeDataModule(LMDataModule):
    """``data=pycode`` (``moe.data.TrainData``, objective "lm"): ``moe.data.text.LMDataModule`` over the stdlib's
    files, bytes as tokens (``dm.vocab.size`` 257), ``DOMAINS`` as groups; built from ``data.pycode``."""

    task_names = list(DOMAINS)  # task_id indexes this list
    class_names = list(CLASS_NAMES)  # what token_classes returns indexes this list (routing heatmaps)

    @classmethod
    def check_config(cls, cfg) -> None:
        validate_pycode_config(cfg.pycode)

    @classmethod
    def from_config(cls, cfg, tokenizer=None) -> PyCodeDataModule:
        if tokenizer is not None:
            raise ValueError("data=pycode is byte-level: it cannot use the model's tokenizer (for a model=hf run, "
                             "data=text 'data.text.files=[...]' tokenizes with the model's own)")  # fmt: skip
        return cls(cfg.pycode)

    def __init__(self, cfg: PyCodeConfig):
        validate_pycode_config(cfg)
        super().__init__(task_names=list(DOMAINS), vocab=ByteVocab(), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         train_windows=cfg.train_windows, seed=cfg.seed, num_workers=cfg.num_workers,
                         eval_batch_size=128)  # fmt: skip
        self.cfg = cfg
        self.root = Path(cfg.root) if cfg.root else stdlib_root()
        self.train_files: list[SourceFile] | None = None
        self.val_files: list[SourceFile] | None = None
        self.tune_files: list[SourceFile] = []

    @property
    def train_tasks(self) -> list[str] | None:
        return list(self.cfg.domains) if self.cfg.domains else None

    @property
    def eval_tasks(self) -> list[str]:
        return list(self.cfg.eval_domains or DOMAINS)

    @staticmethod
    def token_classes(tokens: torch.Tensor) -> torch.Tensor:
        return token_classes(tokens)

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


def evaluate_bits_per_byte(model: nn.Module, split: TaskSplit, batch_size: int = 128) -> dict[str, float]:
    """Bits per byte per domain present in ``split`` and over all of it ("all"), weighted by scored bytes
    (``moe.data.text.group_bits_per_byte``). ``model(tokens[:, :-1])`` returns ``(logits [B, S, V], ...)``."""
    return group_bits_per_byte(model, split, list(DOMAINS), batch_size)
