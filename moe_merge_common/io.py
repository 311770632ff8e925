"""Checkpoint I/O for streaming merges.

Readers give one tensor (or a range of its rows) at a time:

- safetensors files are parsed here and read with ``os.preadv`` into a fresh buffer: only the bytes asked for
  are read, and nothing stays mapped. (Mapped pages of the inputs would count towards the process's resident set:
  a memory-mapped read of five 420 MB checkpoints ends at more than 2 GB RSS.)
- Hugging Face-style directories: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
- Lightning ``.ckpt`` and ``.pt``/``.bin`` state dicts, loaded with ``torch.load(weights_only=True, mmap=True)``
  so a pickle smuggled into the file is never executed; a Lightning ``state_dict``'s ``model.`` prefix is
  stripped as ``moe/export.py`` does.

``ShardedWriter`` streams the output: the shard layout and each shard's header are known before the first byte
of data, so every tensor's bytes go straight to their place in the staged shard, chunk by chunk, from whichever
thread merges that tensor; the staging directory is renamed into place only when every byte is there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from moe_merge_common.outputs import STAGE_PREFIX, STAGE_SUFFIX, replace_previous, write_manifest

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LIGHTNING_PREFIX = "model."
COPY_FROM_BASE = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def row_shape(shape) -> tuple[int, int]:
    """``[R, C]`` for a tensor shape: C = last dim (ndim >= 2); a vector or scalar is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return math.prod(shape[:-1]), int(shape[-1])


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate tensor names {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return dict(pairs)


MAX_DIMS, MAX_DIM = 16, 1 << 40  # far beyond any model's tensor; an adversarial header is refused before use


def check_shape_bounds(shape, where: str) -> None:
    """Refuse a shape with more than ``MAX_DIMS`` dimensions, or whose dimensions, or the product of its nonzero
    ones, exceed ``MAX_DIM``: a zero-byte tensor may still claim 10^18 rows, and code that walks its rows would
    spin (the largest tensors of today's models hold about 2^31 elements)."""
    nonzero = math.prod(d for d in shape if d) if shape else 1
    if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape) or nonzero > MAX_DIM:
        raise ValueError(f"{where}: shape {list(shape)} is out of bounds (at most {MAX_DIMS} dimensions, each and "
                         f"the product of the nonzero ones at most {MAX_DIM})")  # fmt: skip


def _entry(path: Path, name: str, e) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data offsets) of one header entry, refused unless well-formed (the safetensors rules)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: expected {{dtype, shape, data_offsets}}, got {str(e)[:80]}")
    if e["dtype"] not in ST_DTYPES:
        raise ValueError(f"{where} has unsupported dtype {e['dtype']}")
    shape, offsets = e["shape"], e["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):  # fmt: skip
        raise ValueError(f"{where}: shape {shape} is not a list of non-negative integers")
    check_shape_bounds(shape, where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                     for o in offsets)):  # fmt: skip
        raise ValueError(f"{where}: data_offsets {offsets} is not two integers")
    dtype = ST_DTYPES[e["dtype"]]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: shape {shape} x {e['dtype']} is {nbytes} bytes, data_offsets {offsets} span "
                         f"{offsets[1] - offsets[0]}")  # fmt: skip
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_layout(path: Path, entries: dict, data_bytes: int) -> None:
    """The tensors' byte ranges tile the data section exactly, in order, as the safetensors format requires: no
    gap, no overlap, nothing before it (the header) or after the file's end."""
    end = 0
    for name, (_, _, (start, stop)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if start != end:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {start} of the data section, expected {end} "
                             "(offsets must be contiguous, without overlap)")  # fmt: skip
        end = stop
    if end != data_bytes:
        raise ValueError(f"{path}: the tensors cover {end} bytes, the data section holds {data_bytes}")


class SafetensorsFile:
    """Header-only parse of a ``.safetensors`` file; ``read`` fetches bytes with ``os.preadv``."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():  # a FIFO or a device would block the read forever
            raise ValueError(f"{path}: not a regular file")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > min(100 * 1024 * 1024, size - 8):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self._fd_: int | None = None
        self._lock = threading.Lock()
        self.entries = {name: _entry(path, name, e) for name, e in header.items()}
        _check_layout(path, self.entries, size - self.data_start)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        dtype, shape, (start, end) = self.entries[name]
        R, C = row_shape(shape)
        item = torch.empty((), dtype=dtype).element_size()
        if rows is None:
            r0, r1, out_shape = 0, R, shape
        else:
            r0, r1 = rows
            out_shape = (r1 - r0, C)
        nbytes = (r1 - r0) * C * item
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view, got, offset = memoryview(buf.numpy()), 0, self.data_start + start + r0 * C * item
            fd = self._fd()
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise ValueError(f"{self.path}: tensor {name!r} is truncated")
                got += n
        return buf.view(dtype).reshape(out_shape)

    def _fd(self) -> int:
        """One read-only descriptor per file, opened on first use (``preadv`` is safe from several threads)."""
        with self._lock:
            if self._fd_ is None:
                self._fd_ = os.open(self.path, os.O_RDONLY)
                weakref.finalize(self, os.close, self._fd_)
            return self._fd_


def torch_save_format(path: Path) -> str | None:
    """``"zip"`` (torch >= 1.6), ``"legacy"`` (a pickle stream; torch.save's old format) or None (neither), from
    the first bytes only."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle PROTO opcode
        return "legacy"
    return None


def dense_state(path: Path, state) -> dict[str, torch.Tensor]:
    """``state`` when it maps names to dense tensors holding data; else an error naming the first key that does
    not (a sparse, quantized or meta tensor, a nested dict, a list)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint), got a "
                         f"{type(state).__name__}")  # fmt: skip
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"{path}: state dict key {k!r} is a {type(k).__name__}, expected a tensor name (str)")
        if not torch.is_tensor(v):
            raise ValueError(f"{path}: {k!r} is a {type(v).__name__}, expected a tensor")
        check_shape_bounds(tuple(v.shape), f"{path}: tensor {k!r}")
        if v.layout != torch.strided or v.is_quantized or v.is_meta:
            kind = "meta" if v.is_meta else "quantized" if v.is_quantized else str(v.layout).removeprefix("torch.")
            raise ValueError(f"{path}: tensor {k!r} is {kind}; expected dense tensors holding their values (save "
                             "t.to_dense() / t.dequantize())")  # fmt: skip
    return state


class StateDictFile:
    """A ``torch.save``d state dict or Lightning checkpoint, loaded with ``weights_only=True``."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():  # a FIFO or a device would block the read forever
            raise ValueError(f"{path}: not a regular file")
        kind = torch_save_format(path)
        if kind is None:
            raise ValueError(f"{path}: not a torch.save checkpoint (neither a zip archive nor a legacy pickle; "
                             "expected a Lightning .ckpt or a state dict)")  # fmt: skip
        try:  # the zip format is memory-mapped; the legacy format (torch < 1.6) is read whole, never executed
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
        except Exception as e:  # an unpickling error names the refused global
            raise ValueError(f"{path}: cannot be loaded with weights_only=True ({e})") from e
        self.hparams = {}
        self.lightning = isinstance(obj, dict) and "state_dict" in obj
        if self.lightning:
            self.hparams = obj.get("hyper_parameters") or {}
            if not isinstance(self.hparams, dict):
                raise ValueError(f"{path}: hyper_parameters is a {type(self.hparams).__name__}, expected a mapping")
            state = obj["state_dict"]
            if isinstance(state, dict) and any(isinstance(k, str) and k.startswith(LIGHTNING_PREFIX) for k in state):
                state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
        else:
            state = obj
        self.state = dense_state(path, state)
        self.entries = {k: (v.dtype, tuple(v.shape), None) for k, v in state.items()}
        self.metadata = {}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.state[name]
        if rows is None:
            return t.clone()
        return t.reshape(row_shape(t.shape))[rows[0] : rows[1]].clone()


def link_roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really lie: inside it, and for a Hugging Face hub cache snapshot
    (``models--org--name/snapshots/<revision>/``, whose files are symlinks into ``../../blobs/``) in that repo's
    ``blobs/``. Real paths, for ``Path.is_relative_to``."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent / "blobs")
    return roots


class Checkpoint:
    """One model: a ``.safetensors``/``.ckpt``/``.pt``/``.bin`` file, or a directory (export or HF-style).

    ``names``, ``shape(name)``, ``dtype(name)``, ``read(name, rows)``; ``folder``: where config and tokenizer
    files live; ``hparams``: a Lightning checkpoint's hyper-parameters.
    """

    def __init__(self, path: str | os.PathLike, base: Checkpoint | None = None):
        if self._open_lora(path, base):
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        self.path = p
        self.hparams: dict = {}
        files: dict[str, SafetensorsFile | StateDictFile] = {}
        self.where: dict[str, str] = {}
        if p.is_dir():
            self.folder = p
            if (p / INDEX_NAME).is_file():
                try:
                    weight_map = json.loads((p / INDEX_NAME).read_text())["weight_map"]
                    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                                   for k, v in weight_map.items()):  # fmt: skip
                        raise TypeError("weight_map must map tensor names to shard file names (strings)")
                except (KeyError, TypeError, ValueError, RecursionError) as e:  # a list, a number, bad UTF-8, ...
                    raise ValueError(f"{p / INDEX_NAME}: not a safetensors index ({e})") from e
                # Shards are named inside the directory and their real paths lie there too, or, in a Hugging Face
                # hub cache snapshot, in its repo's blobs/ (link_roots)
                roots = link_roots(p)
                outside = [f for f in set(map(str, weight_map.values()))
                           if Path(f).is_absolute() or ".." in Path(f).parts
                           or not any((p / f).resolve().is_relative_to(r) for r in roots)]  # fmt: skip
                if outside:
                    raise ValueError(f"{p / INDEX_NAME}: shards {sorted(outside)[:3]} lie outside {p}")
                for fname in sorted(set(weight_map.values())):
                    if not (p / fname).is_file():
                        raise FileNotFoundError(f"{p / INDEX_NAME}: lists shard {fname}, which does not exist")
                    files[fname] = SafetensorsFile(p / fname)
                for name, fname in weight_map.items():
                    if name not in files[fname].entries:
                        raise ValueError(f"{p / fname}: lacks tensor {name!r} listed in {INDEX_NAME}")
                    self.where[name] = fname
            elif (p / WEIGHTS_NAME).is_file():
                files[WEIGHTS_NAME] = SafetensorsFile(p / WEIGHTS_NAME)
            else:
                shards = sorted(p.glob("*.safetensors"))
                if not shards:
                    raise FileNotFoundError(
                        f"{path}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors in the directory"
                    )
                files = {s.name: SafetensorsFile(s) for s in shards}
        else:
            self.folder = p.parent
            if p.suffix == ".safetensors":
                files[p.name] = SafetensorsFile(p)
            elif p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
                files[p.name] = StateDictFile(p)
                self.hparams = files[p.name].hparams
            else:
                raise ValueError(f"{path}: expected .safetensors, .ckpt, .pt, .bin or a directory (got {p.suffix!r})")
        if not self.where:
            for fname, f in files.items():
                for name in f.entries:
                    if name in self.where:
                        raise ValueError(f"{path}: tensor {name!r} is in both {self.where[name]} and {fname}")
                    self.where[name] = fname
        self.files = files
        self.names = sorted(self.where)

    def _open_lora(self, path: str | os.PathLike, base: Checkpoint | None) -> bool:
        """A PEFT LoRA adapter directory (given ``base``) or mergekit's ``BASE+ADAPTER`` reference: the base's tensors
        plus ``scale * B @ A`` on the adapter's modules (``moe_merge_common.lora``). False for any other path."""
        from moe_merge_common import lora

        pair = lora.split_reference(path)
        if pair is not None:
            base, adapter = Checkpoint(pair[0]), pair[1]
        elif lora.is_adapter(path):
            if base is None:
                raise ValueError(f"{path}: a LoRA adapter needs its base: give it as BASE+ADAPTER (mergekit's "
                                 "reference) or pass base=")  # fmt: skip
            adapter = Path(path)
        else:
            return False
        f = lora.LoraFile(adapter, base)
        self.path, self.folder, self.hparams = adapter, base.folder, base.hparams
        self.files = {f.path.name: f}
        self.where = {name: f.path.name for name in base.names}
        self.names = sorted(self.where)
        return True

    def file_of(self, name: str) -> Path:
        return self.files[self.where[name]].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.files[self.where[name]].entries[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.files[self.where[name]].read(name, rows)

    def input_paths(self) -> list[Path]:
        return [self.path.resolve(), *(f.path.resolve() for f in self.files.values())]


def parse_size(size: int | str, key: str = "shard_size") -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count, > 0; anything else is refused naming ``key``."""
    s = str(size).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    mult = next((m for u, m in units.items() if s.endswith(u)), 1)
    number = s[: -len(next(u for u in units if s.endswith(u)))] if mult != 1 or s.endswith("B") else s
    try:
        value = int(float(number) * mult) if not isinstance(size, int) else size
    except (ValueError, OverflowError):  # "abc", "inf", "nan"
        value = None
    if value is None or isinstance(size, bool) or not 0 < value < math.inf:
        raise ValueError(f"{key}={size!r}: expected a size > 0 like 5GB, 500MB, 2GiB or a byte count")
    return value


OWNER = "owner.json"  # in a staging directory (moe_merge_common.outputs.STAGE_PREFIX ... STAGE_SUFFIX): its process


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove the staging directories that merges into ``out`` left when they were killed (SIGKILL, a lost node):
    only ``.merge-*.tmp`` directories whose ``owner.json`` names a process of this host that no longer runs."""
    removed = []
    for stage in out.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}"):
        try:
            owner = json.loads((stage / OWNER).read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or not readable: leave it
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardedWriter:
    """Writes ``entries`` ([(name, shape, dtype)]) as safetensors shards of at most ``shard_bytes`` each (a larger
    tensor gets a shard to itself): ``model.safetensors`` when one shard holds everything, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.

    Every shard's header, and so every tensor's byte range, is fixed up front: ``write(name, chunk)`` appends the
    next bytes of one tensor at its own position, so different tensors may be written in any order and from
    several threads (each tensor's chunks in order, from one thread). ``commit`` checks that every byte arrived and
    moves the staged files into ``out`` (replacing the earlier output there as a whole:
    ``moe_merge_common.outputs``, whose
    manifest it writes); ``abort`` (or any
    failure) removes the staging directory, so an interrupted merge never leaves a partial output.
    """

    def __init__(self, out: Path, entries, shard_bytes: int, metadata: dict[str, str]):
        self.out = out
        self.entries = entries
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(self.out)
        self.stage = Path(tempfile.mkdtemp(dir=self.out, prefix=STAGE_PREFIX, suffix=STAGE_SUFFIX))
        (self.stage / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        sizes = [_nbytes(shape, dtype) for _, shape, dtype in entries]
        shards: list[list[int]] = [[]]
        used = 0
        for i, size in enumerate(sizes):
            if shards[-1] and used + size > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(i)
            used += size
        n = len(shards)
        self.names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.metadata = metadata
        self.total = sum(sizes)
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, int, torch.dtype]] = {}  # name -> (fd, file offset, bytes, dtype)
        self._done: dict[str, int] = {}  # bytes written per tensor
        try:
            for s, idx in enumerate(shards):
                header, offset = {}, 0
                for i in idx:
                    name, shape, dtype = entries[i]
                    header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                                    "data_offsets": [offset, offset + sizes[i]]}  # fmt: skip
                    offset += sizes[i]
                header["__metadata__"] = {"format": "pt", **metadata}
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                fd = os.open(self.stage / self.names[s], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.write(fd, len(raw).to_bytes(8, "little") + raw)
                start = 8 + len(raw)
                for i in idx:
                    name, _, dtype = entries[i]
                    self._where[name] = (fd, start + header[name]["data_offsets"][0], sizes[i], dtype)
                    self._done[name] = 0
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (already in its output dtype)."""
        if name not in self._where:
            raise RuntimeError(f"writer: tensor {name!r} is not in the planned output")
        fd, start, size, dtype = self._where[name]
        if data.dtype != dtype:
            raise RuntimeError(f"writer: tensor {name!r} has dtype {data.dtype}, planned {dtype}")
        raw = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        done = self._done[name]
        if done + len(raw) > size:
            raise RuntimeError(f"writer: tensor {name!r} got more bytes than its shape holds")
        got = 0
        while got < len(raw):
            got += os.pwrite(fd, raw[got:], start + done + got)
        self._done[name] = done + len(raw)

    def patch(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite entries ``index`` (flat, into tensor ``name``, already written) with ``values``: the span
        they cover is read back, changed and written again (callers patch one chunk's span at a time)."""
        fd, start, size, dtype = self._where[name]
        item = torch.empty((), dtype=dtype).element_size()
        lo, hi = int(index.min()), int(index.max()) + 1
        if lo < 0 or hi * item > self._done[name]:
            raise RuntimeError(f"writer: patch of tensor {name!r} at entries {lo}..{hi - 1} before they were written")
        span = torch.empty((hi - lo) * item, dtype=torch.uint8)
        view, got = memoryview(span.numpy()), 0
        while got < len(view):
            got += os.preadv(fd, [view[got:]], start + lo * item + got)
        span.view(dtype)[index - lo] = values.to(dtype)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + lo * item + done)

    def add_file(self, name: str, src: Path | None = None, text: str | None = None) -> None:
        """Stage an extra file (config, tokenizer, report) to be committed with the weights."""
        if src is not None:
            shutil.copyfile(src, self.stage / name)
            shutil.copymode(src, self.stage / name)  # a private file stays private
        else:
            (self.stage / name).write_text(text)

    def commit(self) -> Path:
        short = [n for n, (_, _, size, _) in self._where.items() if self._done[n] != size]
        if short:
            raise RuntimeError(f"writer: tensor {short[0]!r} was not written completely ({len(short)} tensors short)")
        self._close()
        if len(self.names) > 1:
            weight_map = {self.entries[i][0]: self.names[s] for s, idx in enumerate(self.shards) for i in idx}
            index = {"metadata": {"total_size": self.total, **self.metadata}, "weight_map": weight_map}
            (self.stage / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.stage / OWNER).unlink()
        new = {p.name for p in self.stage.iterdir()}
        replace_previous(self.out, new)  # the previous output's files (its manifest's) that this one does not write
        for p in sorted(self.stage.iterdir(), key=lambda p: p.name == INDEX_NAME):  # the index last
            os.replace(p, self.out / p.name)
        self.stage.rmdir()
        write_manifest(self.out, new)
        return self.out / (WEIGHTS_NAME if len(self.names) == 1 else INDEX_NAME)

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.stage, ignore_errors=True)

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()
