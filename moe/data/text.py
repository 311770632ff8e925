"""``data=text``: language modelling on your own files, tokenized by the model's tokenizer (or bytes).

``data.text.files`` names the corpus (``moe.data.corpus``: globs of .txt .md .py .jsonl .parquet, one group or
a mapping of named groups); the documents are tokenized once and cached. Each group's documents are split by
document (a hash of its text, ``moe.data.windows.split_units``): ``val_fraction`` of its bytes held out, then
``tune_fraction`` of the training documents' (``tune_split``, trained on by nothing). Windows, sampling and the
batch format are ``moe.data.windows``'s; ``task_id`` indexes ``task_names``, the group names.

Bits per byte (``BitsPerByte``, ``group_bits_per_byte``): ``sum nll / ln 2 / sum target_bytes`` over every scored
target (not a mean of per-window means), per group (``val/bpb/<group>``, logged for every group with validation
windows, one group included) and over all of them (``val/bpb``); ``val/loss`` is the mean nll per scored token.
With the bytes tokenizer every scored token is one byte, so bits per byte is loss / ln 2.

``LMDataModule`` is what ``data=text`` and ``data=pycode`` (``moe.data.pycode``) share: loaders, metrics and the
final evaluation over ``train_corpus`` / ``val_split``, which each builds in its own ``setup``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric

from moe.config import TextConfig
from moe.data.corpus import (
    WHOLE_FILE,
    ByteTokenizer,
    default_cache_dir,
    expand,
    file_groups,
    resolve_tokenizer,
    tokenize_files,
)
from moe.data.tasks import ResumableDataLoader
from moe.data.windows import (
    ByteVocab,
    Document,
    EpochSampler,
    TokenCorpus,
    TokenVocab,
    TrainWindows,
    WindowDataset,
    WindowSplit,
    check_window_settings,
    pack,
    split_units,
    val_windows,
)

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------------------------
# Bits per byte
# ---------------------------------------------------------------------------------------------------------------


def target_bytes(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, S+1]``: the batch's ``target_bytes``, or one per scored target when it has none (byte-level)."""
    nbytes = batch.get("target_bytes")
    return batch["target_mask"].int() if nbytes is None else nbytes


class _GroupSums(Metric):
    """Per group: summed nll (nats), scored tokens and their bytes; summed over ranks."""

    full_state_update = False

    def __init__(self, n: int):
        super().__init__()
        for name in ("nll", "tokens", "nbytes"):
            self.add_state(name, torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_BS: torch.Tensor, mask_BS: torch.Tensor, bytes_BS: torch.Tensor, group_B: torch.Tensor):
        # in the states' dtype: float64, unless a strategy cast the module (DeepSpeed's fp32 engine makes it float32)
        self.nll.index_add_(0, group_B, nll_BS.double().sum(1).to(self.nll.dtype))
        self.tokens.index_add_(0, group_B, mask_BS.double().sum(1).to(self.tokens.dtype))
        self.nbytes.index_add_(0, group_B, bytes_BS.double().sum(1).to(self.nbytes.dtype))

    def compute(self):
        return self.nll, self.tokens, self.nbytes


class BitsPerByte(nn.Module):
    """``moe.data.Metrics`` of language-model data: ``val/bpb``, ``val/bpb/<group>`` (each group seen),
    ``val/loss``; ``train/bpb`` per training batch. ``group_names``: what ``task_id`` indexes."""

    prog_bar = ("val/bpb", "val/loss")

    def __init__(self, group_names: list[str]):
        super().__init__()
        self.group_names = list(group_names)
        self.sums = _GroupSums(len(self.group_names))

    def update(self, batch, nll_BS, correct_B) -> None:
        mask_BS = batch["target_mask"][:, 1:]
        self.sums.update(nll_BS * mask_BS, mask_BS, target_bytes(batch)[:, 1:] * mask_BS, batch["task_id"])

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.sums.update_called:
            return {}
        nll, tokens, nbytes = (t.reshape(-1) for t in self.sums.compute())  # torchmetrics squeezes one group's [1]
        out = {f"val/bpb/{name}": nll[g] / LN2 / nbytes[g].clamp_min(1)
               for g, name in enumerate(self.group_names) if tokens[g] > 0}  # fmt: skip
        return {**out, "val/bpb": nll.sum() / LN2 / nbytes.sum().clamp_min(1),
                "val/loss": nll.sum() / tokens.sum().clamp_min(1)}  # fmt: skip

    def reset(self) -> None:
        self.sums.reset()

    def train_values(self, batch, nll_BS, correct_B) -> dict[str, torch.Tensor]:
        mask_BS = batch["target_mask"][:, 1:]
        nbytes = (target_bytes(batch)[:, 1:] * mask_BS).sum()
        return {"train/bpb": (nll_BS * mask_BS).sum() / LN2 / nbytes.clamp_min(1)}


@torch.no_grad()
def group_bits_per_byte(model: nn.Module, split, group_names: list[str], batch_size: int = 128) -> dict[str, float]:
    """Bits per byte per group present in ``split`` (a ``WindowSplit``, or a ``TaskSplit``: one byte per scored
    target) and over all of it (``"all"``). ``model(tokens[:, :-1])[0]`` are the logits ``[B, S, V]``; the model
    runs on its own device, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(group_names)
    nll, nbytes = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    split_bytes = getattr(split, "target_bytes", None)
    try:
        for i in range(0, split.tokens.shape[0], batch_size):
            tokens = split.tokens[i : i + batch_size].to(device)
            mask = split.target_mask[i : i + batch_size, 1:].to(device)
            logits = model(tokens[:, :-1])[0]
            ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none") * mask
            group = split.task_id[i : i + batch_size]
            b = mask if split_bytes is None else split_bytes[i : i + batch_size, 1:].to(device) * mask
            nll.index_add_(0, group, ce.sum(1).double().cpu())
            nbytes.index_add_(0, group, b.sum(1).double().cpu())
    finally:
        model.train(was_training)
    out = {group_names[g]: float(nll[g] / LN2 / nbytes[g].clamp_min(1)) for g in range(n) if nbytes[g] > 0}
    return {**out, "all": float(nll.sum() / LN2 / nbytes.sum().clamp_min(1))}


# ---------------------------------------------------------------------------------------------------------------
# What data=text and data=pycode share
# ---------------------------------------------------------------------------------------------------------------


def _identity(batch):
    return batch


class LMDataModule(L.LightningDataModule):
    """Language-model windows (``moe.data.TrainData``, objective "lm"): a subclass's ``setup`` builds
    ``train_corpus`` (a ``TokenCorpus``) and ``val_split`` (+ ``tune_split``, ``WindowSplit``); this class serves
    them, measures bits per byte during training (``metrics``) and after it (``evaluate``)."""

    objective = "lm"
    monitor = ("val/bpb", "min")  # what the best checkpoint is chosen by (conf/callbacks: ${data_monitor:...})

    def __init__(self, *, task_names: list[str], vocab, seq_len: int, batch_size: int, train_windows: int,
                 seed: int, num_workers: int, eval_batch_size: int):  # fmt: skip
        super().__init__()
        self.task_names, self.vocab, self.seq_len = list(task_names), vocab, seq_len  # the model sees seq_len
        self.batch_size, self.train_windows, self.seed = batch_size, train_windows, seed
        self.num_workers, self.eval_batch_size = num_workers, eval_batch_size
        self.train_corpus: TokenCorpus | None = None
        self.val_split: WindowSplit | None = None
        self.tune_split: WindowSplit | None = None  # windows of the tuning documents (tune_fraction > 0)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def train_dataloader(self) -> DataLoader:
        ds = TrainWindows(self.train_corpus, self.seq_len)
        # resumable: a run resumed from a mid-epoch checkpoint skips the batches it already trained on
        return ResumableDataLoader(ds, batch_size=self.batch_size, drop_last=True, collate_fn=_identity,
                                   sampler=EpochSampler(len(ds), self.train_windows, self.seed),
                                   num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(WindowDataset(self.val_split), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=_identity, num_workers=self.num_workers)  # fmt: skip

    def metrics(self) -> BitsPerByte:
        return BitsPerByte(self.task_names)

    def evaluate(self, model: nn.Module):
        """Bits per byte per group on the validation windows, and over all of them (``moe.data.Evaluation``)."""
        from moe.data import Evaluation

        bpb = group_bits_per_byte(model, self.val_split, self.task_names, self.eval_batch_size)
        per = {g: v for g, v in bpb.items() if g != "all" or g in self.task_names}
        return Evaluation(metrics={**{f"final/bpb/{g}": v for g, v in per.items()}, "final/bpb": bpb["all"]},
                          results={"bits_per_byte": per, "bpb": bpb["all"]}, title="Bits per byte on validation",
                          table=per, column="bits/byte", summary=("all", bpb["all"]))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# data=text
# ---------------------------------------------------------------------------------------------------------------


def check_text_config(cfg: TextConfig) -> None:
    """Refuse (ValueError naming the key) what ``data.text`` cannot use; the files are looked at in ``setup``."""
    file_groups(cfg.files)
    if not isinstance(cfg.tokenizer, str) or not cfg.tokenizer:
        raise ValueError(f"data.text.tokenizer={cfg.tokenizer!r}: expected auto, bytes or a tokenizer directory")
    if cfg.tokenizer not in ("auto", "bytes") and not Path(cfg.tokenizer).expanduser().is_dir():
        raise ValueError(f"data.text.tokenizer={cfg.tokenizer!r}: expected auto, bytes or a local tokenizer "
                         "directory (tokenizer.json, ...); no such directory")  # fmt: skip
    if not isinstance(cfg.text_field, str) or not cfg.text_field:
        raise ValueError(f"data.text.text_field={cfg.text_field!r}: expected a field name")
    check_window_settings(cfg, "data.text", ("seq_len", "batch_size", "train_windows", "val_windows_per_group"))
    if cfg.num_workers < 0:
        raise ValueError(f"data.text.num_workers={cfg.num_workers}: expected >= 0")


class TextDataModule(LMDataModule):
    """``data=text`` (``moe.data.TrainData``): built from ``data.text`` and the model's tokenizer, if any.
    ``train_docs`` / ``val_docs`` / ``tune_docs`` (after ``setup``): each split's document names per group."""

    @classmethod
    def check_config(cls, cfg) -> None:
        check_text_config(cfg.text)

    @classmethod
    def from_config(cls, cfg, tokenizer=None) -> TextDataModule:
        return cls(cfg.text, tokenizer)

    def __init__(self, cfg: TextConfig, tokenizer=None):
        check_text_config(cfg)
        self.cfg, self.groups = cfg, file_groups(cfg.files)
        self.tokenizer = resolve_tokenizer(cfg.tokenizer, tokenizer)
        byte_level = isinstance(self.tokenizer, ByteTokenizer)
        super().__init__(task_names=list(self.groups), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         vocab=ByteVocab() if byte_level else TokenVocab(self.tokenizer.vocab_size),
                         train_windows=cfg.train_windows, seed=cfg.seed, num_workers=cfg.num_workers,
                         eval_batch_size=cfg.batch_size)  # fmt: skip
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.train_docs: dict[str, list[str]] | None = None
        self.val_docs: dict[str, list[str]] | None = None
        self.tune_docs: dict[str, list[str]] | None = None

    @property
    def eval_tasks(self) -> list[str]:
        return list(self.task_names)

    @property
    def train_tasks(self) -> list[str] | None:
        return None  # every group

    def setup(self, stage: str | None = None) -> None:
        if self.train_corpus is not None:
            return
        cfg, length = self.cfg, self.cfg.seq_len + 1
        tok = tokenize_files(expand(self.groups), self.tokenizer, cfg.text_field, self.cache_dir)
        docs: list[list[tuple[Document, str, int]]] = [[] for _ in self.task_names]  # (document, split key, size)
        row = 0
        for i in range(len(tok.size)):
            row = row + 1 if i and tok.file[i] == tok.file[i - 1] else 0
            a, b = tok.offsets[i], tok.offsets[i + 1]
            path = tok.files[tok.file[i]]
            name = path if path.lower().endswith(WHOLE_FILE) else f"{path}#{row}"  # else: its row in the file
            doc = Document(name, tok.ids[a:b], None if tok.nbytes is None else tok.nbytes[a:b])
            docs[tok.group[i]].append((doc, f"{int(tok.digest[i]) & (2**64 - 1):016x}", int(tok.size[i])))
        splits: dict[str, list[list[Document]]] = {"train": [], "val": [], "tune": []}
        for name, group in zip(self.task_names, docs):
            total = sum(len(d.ids) + 1 for d, _, _ in group)
            if total < length:
                raise ValueError(f"data.text.files: group {name!r} holds {total} tokens (separators included), "
                                 f"fewer than one window of data.text.seq_len + 1 = {length}")  # fmt: skip
            sizes: dict[str, int] = {}
            for _, key, size in group:  # identical documents share a key: one unit, never on both sides
                sizes[key] = sizes.get(key, 0) + size
            val = split_units(sizes, cfg.val_fraction, cfg.split_seed)
            tune = set()
            if cfg.tune_fraction > 0:
                tune = split_units({k: v for k, v in sizes.items() if k not in val}, cfg.tune_fraction,
                                   cfg.split_seed + 1)  # fmt: skip
            side = {k: "val" if k in val else "tune" if k in tune else "train" for k in sizes}
            for split, part in splits.items():
                part.append([d for d, key, _ in group if side[key] == split])
            n_train = sum(len(d.ids) + 1 for d in splits["train"][-1])
            if n_train < length:
                raise ValueError(f"data.text.files: group {name!r} holds {n_train} training tokens once its "
                                 f"validation and tuning documents are held out, fewer than one window of "
                                 f"data.text.seq_len + 1 = {length}")  # fmt: skip
        if not any(splits["val"]):
            raise ValueError("data.text.files: no validation document: every group holds a single document "
                             "(the split holds out whole documents)")  # fmt: skip
        sep = self.tokenizer.eos_id
        corpora = {k: pack(list(enumerate(v)), sep) for k, v in splits.items()}
        self.train_docs, self.val_docs, self.tune_docs = (
            {n: [d.name for d in ds] for n, ds in zip(self.task_names, splits[k])} for k in ("train", "val", "tune"))
        self.train_corpus = corpora["train"]
        self.val_split = val_windows(corpora["val"], cfg.seq_len, cfg.val_windows_per_group)
        if any(splits["tune"]):
            self.tune_split = val_windows(corpora["tune"], cfg.seq_len, cfg.val_windows_per_group)
