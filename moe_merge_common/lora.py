"""PEFT LoRA adapters as merge inputs: an adapter on a base is the model base + scale * B @ A on its target modules.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Merging needs the base the
adapter applies to: ``Checkpoint(adapter_dir, base=...)``, or mergekit's model reference ``BASE+ADAPTER`` (a base
checkpoint path, "+", an adapter directory) wherever a checkpoint path is taken. The adapter then reads as a whole
model with exactly the base's tensor names, so every method merges it like any fine-tune (its task vector is
``scale * B @ A`` on the target modules and zero elsewhere).

Names (PEFT's ``save_pretrained`` layout, adapter name removed), mapped to the base's tensor names:

    base_model.model.<module>.lora_A.weight  [r, in],  .lora_B.weight [out, r]  ->  <module>.weight [out, in]
    base_model.model.<module>.lora_embedding_A [r, num], .lora_embedding_B [dim, r]  ->  <module>.weight [num, dim]

delta = scale * B @ A, transposed where the base stores the module as [in, out] (embeddings; GPT-2 Conv1D, PEFT's
``fan_in_fan_out``), with
scale = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora`` (r and alpha per module from ``rank_pattern``
and ``alpha_pattern`` where they match). Anything else is refused, naming the key: DoRA, LoRA biases,
``modules_to_save`` copies, convolution factors, a module the base lacks, shapes that do not fit.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_merge_common.patterns import compile_pattern

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def split_reference(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``BASE+ADAPTER`` -> (base, adapter) when the string is not itself a path, its part before a "+" exists and
    the part after it is an adapter directory; else None."""
    s = os.fspath(path)
    if Path(s).exists():
        return None
    for i, ch in enumerate(s):
        if ch == "+" and Path(s[:i]).exists() and is_adapter(s[i + 1 :]):
            return Path(s[:i]), Path(s[i + 1 :])
    return None


def _read_config(file: Path) -> dict:
    """An adapter's ``adapter_config.json``, its fields used here checked for type: a clear error naming the file."""
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{file}: not a readable JSON adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    cfg.setdefault("lora_alpha", 8)
    cfg["alpha_pattern"] = cfg.get("alpha_pattern") or {}
    if not isinstance(cfg["alpha_pattern"], dict):
        raise ValueError(f"{file}: alpha_pattern: expected an object of pattern -> alpha, got "
                         f"{type(cfg['alpha_pattern']).__name__}")  # fmt: skip
    return cfg


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the module name
    (RE2, ``moe_merge_common.patterns``: linear time, whatever the adapter's config holds)."""
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: key {key!r} is not a pattern (text)")
        if compile_pattern(rf"(.*\.)?({key})$", f"{where}[{key!r}]").match(module):
            return value
    return default


class LoraDelta:
    """The factors of one adapter: ``delta(name, rows)`` is ``scale * B @ A`` (rows of the base tensor ``name``).
    ``base_shapes``: the base's tensor shapes by name."""

    def __init__(self, path: Path, base_shapes: dict[str, tuple[int, ...]]):
        self.path = path
        cfg = _read_config(path / CONFIG_NAME)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path / CONFIG_NAME}: peft_type {cfg['peft_type']!r} is not a LoRA adapter")
        for flag in ("use_dora", "lora_bias"):
            if cfg.get(flag):
                raise ValueError(f"{path / CONFIG_NAME}: {flag}=true is not supported (only plain scale * B @ A)")
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (adapter_model.bin is not read)")
        tensors = load_file(path / WEIGHTS_NAME)
        factors: dict[str, dict] = {}  # module -> {"lora_A": A, "lora_B": B, "embedding": bool}
        for key, value in tensors.items():
            m = _KEY.match(key) or _EMBED_KEY.match(key)
            if m is None:
                expected = f"{PREFIX}<module>.lora_A.weight / .lora_B.weight or .lora_embedding_A / _B"
                raise ValueError(f"{path / WEIGHTS_NAME}: cannot map key {key!r} to a base tensor ({expected})")
            if value.dim() != 2:
                raise ValueError(f"{path / WEIGHTS_NAME}: key {key!r} has shape {tuple(value.shape)}; only 2-D "
                                 "(linear and embedding) LoRA factors are supported")  # fmt: skip
            factors.setdefault(m["module"], {})[m["kind"].replace("embedding_", "")] = value.float()
            factors[m["module"]]["embedding"] = "embedding" in m["kind"]
        self.modules: dict[str, tuple] = {}  # base tensor name -> (A, B, scale, transposed)
        for module, f in factors.items():
            name = f"{module}.weight"
            if "lora_A" not in f or "lora_B" not in f:
                raise ValueError(f"{path / WEIGHTS_NAME}: module {module!r} lacks its lora_A or lora_B factor")
            if name not in base_shapes:
                raise ValueError(f"{path / WEIGHTS_NAME}: key {PREFIX}{module}.lora_A... maps to {name!r}, which the "
                                 "base does not have")  # fmt: skip
            A, B = f["lora_A"], f["lora_B"]
            r = A.shape[0]
            if r == 0:
                raise ValueError(f"{path / WEIGHTS_NAME}: module {module!r}: lora_A {tuple(A.shape)} has rank 0")
            plain, flipped, have = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0]), tuple(base_shapes[name])
            if B.shape[1] != r or have not in (plain, flipped) or (f["embedding"] and have != flipped):
                raise ValueError(f"{path / WEIGHTS_NAME}: module {module!r}: lora_A {tuple(A.shape)} and lora_B "
                                 f"{tuple(B.shape)} do not fit the base tensor {name!r} {have}")  # fmt: skip
            # PEFT transposes embeddings and GPT-2 Conv1D weights ([in, out], fan_in_fan_out); the base's shape says
            # which, except for square matrices, where the flags decide
            transposed = have != plain if plain != flipped else bool(f["embedding"] or cfg.get("fan_in_fan_out"))
            where = path / CONFIG_NAME
            alpha = _pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"], f"{where}: alpha_pattern")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ValueError(f"{where}: module {module!r}: lora_alpha {alpha!r} is not a finite number")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.modules[name] = (A, B, scale, transposed)

    def delta(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        """Rows ``[r0, r1)`` of ``scale * B @ A`` (or of its transpose) in fp32."""
        A, B, scale, transpose = self.modules[name]
        r0, r1 = rows
        if transpose:  # (B A)^T [in, out]: its rows are A's columns
            return (A[:, r0:r1].T @ B.T).mul_(scale)
        return (B[r0:r1] @ A).mul_(scale)


class LoraFile:
    """An adapter read as a whole model over ``base`` (a ``moe_merge_common.io.Checkpoint``): the entries of the
    base, with
    ``read`` = the base's rows + the adapter's delta on the target modules (fp32 there; the base's own bytes
    elsewhere)."""

    def __init__(self, adapter: Path, base):
        self.path = adapter / WEIGHTS_NAME
        self.base = base
        self.lora = LoraDelta(adapter, {name: base.shape(name) for name in base.names})
        self.metadata: dict = {}
        self.entries = {name: (base.dtype(name), base.shape(name), None) for name in base.names}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        data = self.base.read(name, rows)
        if name not in self.lora.modules:
            return data
        r0, r1 = rows if rows is not None else (0, self.entries[name][1][0])
        return data.float() + self.lora.delta(name, (r0, r1))
