"""``data=text`` corpora: files by glob, documents read with ``datasets``, tokenizers, the on-disk token cache.

- **Files** (``file_groups``, ``expand``): ``data.text.files`` is a list of globs (one group, ``all``) or a mapping
  group -> glob(s). ``.txt .md .py``: the whole file is one document (read in text mode: ``\\r\\n`` becomes
  ``\\n``); ``.jsonl``: one document per line, field ``text_field``; ``.parquet``: column ``text_field``. Within a
  group, files are taken in path order and documents in file order, whatever the listing order.
- **Tokenizers**: ``ByteTokenizer`` (ids 0..255 are bytes, EOS = 256) or ``HFTokenizer`` around a fast
  transformers tokenizer (EOS = its ``eos_token_id``; special-token text inside a document is tokenized as
  text). Each token carries the UTF-8 bytes of text it covers (``token_bytes``), for bits per byte.
- **Cache** (``tokenize_files``): the tokenized documents, per file list (path, size, mtime), tokenizer and
  ``text_field``, as one safetensors file under ``cache_dir``, written atomically; an unreadable entry is rebuilt.
  Split and window settings are not part of the key: changing them re-packs the cached documents, it does not
  re-tokenize them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe.data.windows import BOS

log = logging.getLogger(__name__)

WHOLE_FILE = (".txt", ".md", ".py")  # one document per file
SUFFIXES = (*WHOLE_FILE, ".jsonl", ".parquet")
CACHE_VERSION = 1  # bump when what is cached, or how, changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-merge" / "text"


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def file_groups(files: Any) -> dict[str, list[str]]:
    """``data.text.files`` as group name -> globs: a glob or a list of them is the one group ``all``."""
    usage = "expected a list of globs or a mapping group name -> glob or list of globs"
    if isinstance(files, str):
        files = [files]
    if isinstance(files, Mapping):
        groups = {str(k): [v] if isinstance(v, str) else v for k, v in files.items()}
    elif isinstance(files, Iterable) and not isinstance(files, bytes):
        groups = {"all": list(files)}
    else:
        raise ValueError(f"data.text.files={files!r}: {usage} (e.g. data.text.files=[corpus/*.txt])")
    if not groups:
        raise ValueError(f"data.text.files: empty; {usage}")
    for name, globs in groups.items():
        globs = list(globs) if globs is not None and not isinstance(globs, bytes) else None
        if not name or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"data.text.files.{name or '<empty name>'}={globs!r}: {usage}")
        groups[name] = globs
    return groups


def expand(groups: dict[str, list[str]]) -> dict[str, list[Path]]:
    """Group -> its files (resolved, deduplicated, in path order). Refuses a glob matching no file, a file of an
    unsupported type and a file in two groups, naming it."""
    out, owner = {}, {}
    for name, globs in groups.items():
        paths = set()
        for g in globs:
            found = [Path(p).resolve() for p in glob.glob(os.path.expanduser(g), recursive=True)]
            found = [p for p in found if p.is_file()]
            if not found:
                raise ValueError(f"data.text.files: {g!r} matches no file")
            for p in found:
                if p.suffix.lower() not in SUFFIXES:
                    raise ValueError(f"data.text.files: {p} (from {g!r}): unsupported file type {p.suffix!r}; "
                                     f"expected one of {' '.join(SUFFIXES)}")  # fmt: skip
                if owner.setdefault(p, name) != name:
                    raise ValueError(f"data.text.files: {p} is in two groups ({owner[p]!r} and {name!r})")
            paths.update(found)
        out[name] = sorted(paths, key=str)
    return out


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: nothing may touch the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _bad_jsonl_line(path: Path, field: str) -> str | None:
    """Why ``path`` cannot be read as documents: the first line that is not a JSON object with a string
    ``field``, or its encoding; "" if none, None if it holds only blank lines."""
    blank = True
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    blank = False
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        return f"line {i}: not valid JSON"
                    if not isinstance(obj, dict) or field not in obj:
                        return f"line {i}: no field {field!r} (data.text.text_field)"
                    if not isinstance(obj[field], str):
                        return f"line {i}: field {field!r} is a {type(obj[field]).__name__}, not a string"
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e})"
    return None if blank else ""


def read_documents(path: Path, text_field: str, cache_dir: Path) -> Iterator[str]:
    """The documents of one file, in order, read with ``datasets`` (streaming: no Arrow copy is written;
    ``cache_dir``: its own cache directory, which gets lock files only)."""
    suffix = path.suffix.lower()
    builder = "text" if suffix in WHOLE_FILE else "json" if suffix == ".jsonl" else "parquet"
    field = "text" if builder == "text" else text_field
    for row, text in enumerate(_values(path, builder, field, cache_dir)):
        if not isinstance(text, str):
            why = (_bad_jsonl_line(path, field) if builder == "json" else "") or (
                f"row {row}: column {field!r} (data.text.text_field) is missing or not a string")
            raise ValueError(f"data.text.files: {path}: {why}")
        if builder == "text" and "\0" in text:
            raise ValueError(f"data.text.files: {path}: a binary file (it holds a NUL byte)")
        yield text


def _values(path: Path, builder: str, field: str, cache_dir: Path) -> Iterator[Any]:
    """``field`` of each row ``datasets`` reads from ``path``; its errors as a ValueError naming the file."""
    datasets = _datasets()
    kw = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True,
                                   cache_dir=str(cache_dir), **kw)  # fmt: skip
        for example in ds:
            yield example.get(field)
    except Exception as e:  # datasets / pyarrow errors: say which file, and why when we can tell
        cause, seen = e, set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, UnicodeDecodeError):
                raise ValueError(f"data.text.files: {path}: not UTF-8 text ({cause})") from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        why = _bad_jsonl_line(path, field) if builder == "json" else ""
        if builder == "json" and why is None:
            return  # nothing but blank lines: no document
        why = why or f"cannot read it as {builder} ({type(e).__name__}: {e})"
        raise ValueError(f"data.text.files: {path}: {why}") from None


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes; EOS = ``BOS`` (256). Every token is one byte (``nbytes`` None)."""

    eos_id, vocab_size, identity = BOS, BOS + 1, "bytes"

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return [(np.frombuffer(t.encode("utf-8"), dtype=np.uint8), None) for t in texts]


def token_bytes(text: str, offsets: Any) -> np.ndarray:
    """``[n]`` int32: the UTF-8 bytes of ``text`` each token covers, token i covering the characters from
    max(start_i, the previous tokens' end) to end_i. Sums to the document's byte length minus any characters
    no token covers."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    cum = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000), out=cum[1:])  # UTF-8 bytes of each char
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(cp))
    if not len(off):
        return np.zeros(0, dtype=np.int32)
    prev_end = np.maximum.accumulate(np.concatenate([[0], off[:-1, 1]]))
    start = np.minimum(np.maximum(off[:, 0], prev_end), off[:, 1])
    return (cum[off[:, 1]] - cum[start]).astype(np.int32)


class HFTokenizer:
    """A fast transformers tokenizer; ``identity`` hashes its full definition (``backend_tokenizer.to_str()``)."""

    def __init__(self, tokenizer: Any, where: str):
        if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{where}: {type(tokenizer).__name__} is not a fast tokenizer (bits per byte needs its "
                             "offsets: return_offsets_mapping)")  # fmt: skip
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{where}: the tokenizer has no eos_token (documents are joined with it)")
        self.tokenizer, self.eos_id, self.vocab_size = tokenizer, int(tokenizer.eos_token_id), len(tokenizer)
        spec = f"{tokenizer.backend_tokenizer.to_str()}|eos={self.eos_id}|n={self.vocab_size}"
        self.identity = "hf:" + hashlib.sha256(spec.encode()).hexdigest()

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True,
                             return_attention_mask=False, verbose=False)  # fmt: skip
        return [(np.asarray(ids, dtype=np.int64), token_bytes(t, offs))
                for t, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"])]  # fmt: skip


def resolve_tokenizer(spec: str, given: Any = None) -> ByteTokenizer | HFTokenizer:
    """``data.text.tokenizer``: "auto" (``given``, the model's, else bytes), "bytes", or a tokenizer directory."""
    if spec == "bytes" or (spec == "auto" and given is None):
        return ByteTokenizer()
    if spec == "auto":
        return HFTokenizer(given, "data.text.tokenizer=auto (the model's tokenizer)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:
        raise ValueError(f"data.text.tokenizer={spec!r}: cannot load a tokenizer from it ({type(e).__name__}: "
                         f"{e})") from None  # fmt: skip
    return HFTokenizer(tok, f"data.text.tokenizer={spec!r}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenized documents and their cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Tokenized:
    """Every document of a corpus, tokenized: document ``i`` is ``ids[offsets[i] : offsets[i+1]]``."""

    ids: np.ndarray  # [T] uint8 (bytes) or int32
    nbytes: np.ndarray | None  # [T] uint8 (int32 if a token covers > 255): UTF-8 bytes per token; None: one each
    offsets: np.ndarray  # [D + 1] int64
    group: np.ndarray  # [D] int64: index in the group list
    file: np.ndarray  # [D] int64: index in ``files``
    digest: np.ndarray  # [D] int64: the first 8 bytes of the SHA-256 of the document's UTF-8 text
    size: np.ndarray  # [D] int64: its UTF-8 bytes
    files: list[str]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in ("ids", "offsets", "group", "file", "digest", "size")}
        return out if self.nbytes is None else {**out, "nbytes": self.nbytes}


def _narrow(nbytes: np.ndarray) -> np.ndarray:
    return nbytes.astype(np.uint8 if not len(nbytes) or nbytes.max() < 256 else np.int32)


def cache_key(groups: dict[str, list[Path]], tokenizer_identity: str, text_field: str) -> str:
    files = [[name, str(p), p.stat().st_size, p.stat().st_mtime_ns] for name, ps in groups.items() for p in ps]
    spec = {"version": CACHE_VERSION, "files": files, "tokenizer": tokenizer_identity, "text_field": text_field}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _load(path: Path, key: str) -> Tokenized:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        raise ValueError("its key does not match its name")
    a = load_file(str(path))
    t = Tokenized(a["ids"], a.get("nbytes"), a["offsets"], a["group"], a["file"], a["digest"], a["size"],
                  json.loads(meta["files"]))  # fmt: skip
    n = len(t.offsets) - 1
    ok = (n >= 0 and t.offsets[0] == 0 and t.offsets[-1] == len(t.ids) and bool(np.all(np.diff(t.offsets) >= 0))
          and all(len(x) == n for x in (t.group, t.file, t.digest, t.size))
          and (t.nbytes is None or len(t.nbytes) == len(t.ids))
          and (n == 0 or 0 <= t.file.min() and t.file.max() < len(t.files)))  # fmt: skip
    if not ok:
        raise ValueError("inconsistent arrays")
    return t


def _save(path: Path, key: str, t: Tokenized) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(t.arrays(), str(tmp), metadata={"key": key, "files": json.dumps(t.files)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tokenize_files(groups: dict[str, list[Path]], tokenizer, text_field: str, cache_dir: Path,
                   batch_chars: int = 1 << 22) -> Tokenized:  # fmt: skip
    """Every document of ``groups`` (group -> files, from ``expand``) tokenized, from the cache when it holds
    them; else read, tokenized (a progress bar over the files' bytes) and cached."""
    key = cache_key(groups, tokenizer.identity, text_field)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            return _load(path, key)
        except Exception as e:
            log.warning("%s: unreadable tokenized-corpus cache entry (%s); rebuilding it", path, e)
    from tqdm.auto import tqdm

    files = [p for ps in groups.values() for p in ps]
    owners = [g for g, ps in enumerate(groups.values()) for _ in ps]
    ids, nbytes, lengths, group, file, digest, size = [], [], [], [], [], [], []

    def add(texts: list[str], g: int, fi: int) -> None:
        for (tok, nb), text in zip(tokenizer.encode(texts) if texts else [], texts):
            raw = text.encode("utf-8")
            ids.append(tok)
            nbytes.append(nb)
            lengths.append(len(tok))
            digest.append(int.from_bytes(hashlib.sha256(raw).digest()[:8], "big", signed=True))
            size.append(len(raw))
            group.append(g)
            file.append(fi)

    total, t0 = sum(p.stat().st_size for p in files), time.perf_counter()
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        where = str(cache_dir)
    except OSError:
        where = None  # the system's temporary directory
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing data.text", disable=None)  # off without a tty
    with bar, tempfile.TemporaryDirectory(prefix=".datasets-", dir=where) as scratch:  # datasets' lock files
        for fi, (g, p) in enumerate(zip(owners, files)):
            batch, chars = [], 0
            for text in read_documents(p, text_field, Path(scratch)):
                batch.append(text)
                chars += len(text)
                if chars >= batch_chars or len(batch) >= 1024:
                    add(batch, g, fi)
                    batch, chars = [], 0
            add(batch, g, fi)
            bar.update(p.stat().st_size)
    exact = tokenizer.identity != "bytes"
    t = Tokenized(
        ids=np.concatenate(ids or [np.zeros(0)]).astype(np.int32 if exact else np.uint8),
        nbytes=_narrow(np.concatenate(nbytes or [np.zeros(0, np.int32)])) if exact else None,
        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        group=np.array(group, dtype=np.int64), file=np.array(file, dtype=np.int64),
        digest=np.array(digest, dtype=np.int64), size=np.array(size, dtype=np.int64), files=[str(p) for p in files],
    )  # fmt: skip
    log.info("tokenized %d files (%.1f MB) into %d documents, %d tokens in %.1f s", len(files), total / 1e6,
             len(lengths), len(t.ids), time.perf_counter() - t0)  # fmt: skip
    try:
        _save(path, key, t)
    except OSError as e:  # a read-only or full cache directory costs a re-tokenization next time, nothing more
        log.warning("%s: cannot write the tokenized-corpus cache (%s)", path, e)
    return t
