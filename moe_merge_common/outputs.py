"""Where a command may write: one output policy for the merge, assembly, DivMerge / PLeaS and their reports.

Rules (each refusal names the path and what was expected):

- ``out`` is not empty text, and not a file;
- ``out`` is never an input, nor an ancestor or a descendant of one (resolved real paths of every input file:
  shards, index files and adapters included);
- ``out`` is new or empty; with ``overwrite=true`` it may also hold a previous output of this library, which a
  manifest (``MANIFEST``, listing the files written) proves: a file it does not list is never deleted or replaced,
  so such a directory is refused, naming the file;
- an overwrite replaces the previous output as a whole: files of the old manifest that the new output does not
  write (an old report, shards of another count, a config.json) are removed (``replace_previous``);
- ``output_lock``: a second job writing the same directory fails at once, naming the first job's pid.

A merge's own staging directories (``.merge-*.tmp``, ``moe_merge_common.io``) and the lock file belong to the policy and
never count as foreign files.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = ".moe-merge-output.json"  # {"files": [names]} of the last output written into the directory
LOCK = ".moe.lock"  # held by the job writing the directory (merge or training run)
STAGE_PREFIX, STAGE_SUFFIX = ".merge-", ".tmp"  # staging directories inside an output (io, write_staged)


def _own(name: str) -> bool:
    staging = name.startswith(STAGE_PREFIX) and name.endswith(STAGE_SUFFIX)
    return staging or name in (MANIFEST, LOCK, f"{MANIFEST}.tmp")


def manifest_files(out: Path) -> set[str] | None:
    """The file names the manifest in ``out`` lists (None: no readable manifest)."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(f) for f in files} if isinstance(files, list) else None


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], overwrite: bool,
                 key: str = "out") -> Path:  # fmt: skip
    """The resolved output directory, or an error naming ``key`` when the rules above refuse it."""
    if not str(out).strip():
        raise ValueError(f"{key}: empty; name the directory to write into")
    path = Path(out).resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key}={out}: a file, not a directory")
    for p in inputs:
        real = Path(p).resolve()
        if real == path or path in real.parents or real in path.parents:
            relation = "is" if real == path else "holds" if path in real.parents else "lies inside"
            raise ValueError(f"{key}={out}: {relation} the input {real}; write the output to a directory apart")
    if not path.exists():
        return path
    present = sorted(p.name for p in path.iterdir() if not _own(p.name))
    if not present:
        return path
    if not overwrite:
        listing = ", ".join(present[:5]) + ", ..." * (len(present) > 5)
        raise FileExistsError(f"{key}={out}: not empty ({listing}); pass overwrite=true to replace an earlier "
                              "output, or choose a new directory")  # fmt: skip
    listed = manifest_files(path)
    foreign = [n for n in present if listed is None or n not in listed]
    if foreign:
        raise FileExistsError(f"{key}={out}: holds {foreign[0]}, which no earlier output of this library wrote "
                              f"({len(foreign)} such files); overwrite=true replaces only its own outputs")  # fmt: skip
    return path


def replace_previous(out: Path, new_files: Iterable[str]) -> None:
    """Before the new files move in: remove the previous output's files (its manifest's) that the new output does
    not write, so nothing stale stays beside the new weights."""
    keep = set(new_files)
    for name in manifest_files(out) or ():
        p = out / name
        if name not in keep and Path(name).name == name and (p.is_file() or p.is_symlink()):
            p.unlink()


def write_manifest(out: Path, files: Iterable[str]) -> None:
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": sorted(set(files))}, indent=1))
    os.replace(tmp, out / MANIFEST)


def acquire_lock(out: Path, key: str = "out") -> int:
    """Take the exclusive ``fcntl`` lock of directory ``out`` (created if needed) and return its descriptor; a
    second job is refused at once with the holder's pid. The lock goes with the process: a killed job leaves no
    lock that binds. ``release_lock`` gives it back."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{key}={out}: another job (pid {holder}) is writing here; wait for it or choose "
                                  "another directory") from None  # fmt: skip
        try:  # the holder before us may have removed the file between our open and our flock: lock the new one
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def release_lock(out: Path, fd: int) -> None:
    """Remove the lock file while still holding it (a job that opened it meanwhile sees a stale inode and
    retries), then close it."""
    try:
        (out / LOCK).unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def output_lock(out: Path, key: str = "out") -> Iterator[None]:
    """``acquire_lock`` for the block."""
    fd = acquire_lock(out, key)
    try:
        yield
    finally:
        release_lock(out, fd)


def write_staged(out: Path, write: Callable[[Path], Path]) -> Path:
    """Run ``write(stage)`` (it writes an output into the empty directory ``stage`` and returns one of its files),
    then replace ``out``'s previous output with what it wrote, as a whole, and record the manifest; returns the
    returned file's path in ``out``. A failure leaves ``out`` as it was. Call under ``output_lock``."""
    stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE_PREFIX, suffix=STAGE_SUFFIX))
    try:
        result = Path(write(stage)).resolve().relative_to(stage.resolve())
        names = [p.name for p in stage.iterdir()]
        replace_previous(out, names)
        for name in names:
            os.replace(stage / name, out / name)
        write_manifest(out, names)
        return out / result
    finally:
        shutil.rmtree(stage, ignore_errors=True)
