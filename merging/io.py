"""Streaming checkpoint I/O: read one tensor name at a time (mmap), write the output atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
COPY_FROM_BASE = ("config.json",)


def resolve_weights(path: str | os.PathLike) -> Path:
    """A ``.safetensors`` file, or a directory holding ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{path}: expected a .safetensors file or a directory with {WEIGHTS_NAME}")
    if p.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file (got {p.suffix!r})")
    return p


class TensorReader:
    """Lazy, memory-mapped access to the tensors of one safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_weights(path)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self.names = list(self._file.keys())

    def get(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


class AtomicOutputDir:
    """Collects output tensors; ``commit()`` writes ``model.safetensors`` to a temp file, then renames it in place.

    Nothing is left behind if the merge fails before ``commit``.
    """

    def __init__(self, out: str | os.PathLike, inputs: list[Path], overwrite: bool = False):
        self.out = Path(out).resolve()
        protected = {p.resolve() for p in inputs} | {p.resolve().parent for p in inputs}
        if self.out in protected or (self.out / WEIGHTS_NAME).resolve() in protected:
            raise ValueError(f"out={out}: refuses to overwrite an input checkpoint")
        if (self.out / WEIGHTS_NAME).exists() and not overwrite:
            raise FileExistsError(f"out={out}: {WEIGHTS_NAME} exists; pass overwrite=true to replace it")
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.contiguous()

    def commit(self, base_dir: Path, metadata: dict[str, str]) -> Path:
        """Write the weights and copy ``COPY_FROM_BASE`` files from ``base_dir`` when present."""
        self.out.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        try:
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
            os.close(fd)
            staged.append((Path(tmp), self.out / WEIGHTS_NAME))
            save_file(self.tensors, tmp, metadata={"format": "pt", **metadata})
            for name in COPY_FROM_BASE:
                if (base_dir / name).is_file():
                    fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.", suffix=".tmp")
                    os.close(fd)
                    staged.append((Path(tmp), self.out / name))
                    shutil.copyfile(base_dir / name, tmp)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
        return self.out / WEIGHTS_NAME
