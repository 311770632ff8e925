"""What the data-aware merges (``merging.divmerge``, ``merging.pleas``) need from the data and from the model.

They import nothing model-specific: unlabeled data comes as ``UnlabeledData`` (any re-iterable of token batches, a
list of tensors will do) and the model-specific parts come from an adapter (``moe.adapters.moe_adapter.MoEAdapter`` for
this library's ``MoETransformer``):

- ``ModelAdapter``: build a model from a checkpoint or a state dict, and run it (logits, optionally with
  substituted parameters, for gradients with respect to merge coefficients).
- ``DivMergeAdapter``: plus the model's layers (the granularity of DivMerge's layer-wise coefficients).
- ``TaskAdapter``: evaluation, the lambda search, MoE assembly's task statistics and task data for the CLI.
- ``PleasAdapter``: plus PLeaS's permutation spec: which units permute together (``Group``), how every tensor's
  axes carry them (``Layout``), which linear maps are refit by least squares (``Layer``), and the activations at
  named points (``Spec.points``) that match the units and feed the least-squares fits.

Shapes: ``N`` rows (tokens: batch x sequence flattened), ``V`` vocabulary. A point's activation is ``[N, *axes]``,
an axis named by a group holding that group's units in the model's own order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class UnlabeledData(Protocol):
    """Input batches without labels: each a LongTensor ``[B, S]`` of token ids. Must be re-iterable: PLeaS makes
    several passes (a list of tensors, or a dataset-backed iterable that restarts on ``iter``)."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...


class ModelAdapter(Protocol):
    def load(self, source: str | os.PathLike | nn.Module) -> nn.Module:
        """The model a checkpoint path holds (an ``nn.Module`` passes through), in eval mode."""

    def build(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A model of the adapter's architecture holding ``state``; widths are read from the tensors' shapes."""

    def logits(
        self, model: nn.Module, tokens: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """tokens ``[B, S]`` -> next-token logits ``[B, S, V]``; ``params`` replace the model's parameters of those
        names (``torch.func.functional_call``), so gradients flow to whatever they were computed from."""


class DivMergeAdapter(ModelAdapter, Protocol):
    def layers(self, model: nn.Module) -> dict[str, list[str]]:
        """layer name -> the names of its parameters; every floating-point parameter in exactly one layer."""


@dataclass(frozen=True)
class Group:
    """Units that permute together (channels of the residual stream, attention heads, experts, hidden units).

    ``size`` units, matched from the activations at ``points``. ``widen``: PLeaS may keep matched pairs unmerged
    (both units stay, the merged model is wider); False: always fully merged. ``parent``: a nested group, one
    permutation per unit of the parent (e.g. an expert's hidden units); the parent must not widen.
    """

    name: str
    size: int
    points: tuple[str, ...]
    widen: bool = False
    parent: str | None = None


@dataclass(frozen=True)
class Layout:
    """How a state tensor carries units: the tensor reshaped to ``view``, ``axes[i]`` the group of view axis i
    (None: not permuted). ``out``: the view axes that are the map's outputs (the rest are inputs); a tensor that
    maps nothing (an embedding's rows, a gain vector) lists its grouped axes."""

    view: tuple[int, ...]
    axes: tuple[str | None, ...]
    out: tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """A linear map refit by least squares: ``y = x @ W`` with W = the tensor's view, inputs ``inputs`` axes and
    outputs ``outputs`` axes, one independent map per index of view axis ``batch`` (experts) if set.

    x, y: points holding the map's input and its pre-activation output (with the batch axis first when it varies
    by batch index; an ``x`` without it is shared). weight: a point ``[N]`` or ``[N, batch]`` of row weights (e.g.
    routing weights: an expert is fitted on the tokens it serves).
    """

    tensor: str
    x: str
    y: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    batch: int | None = None
    weight: str | None = None


@dataclass(frozen=True)
class Spec:
    """groups: in matching order (parents first). points: point name -> its axes (a group name or None each,
    after the row axis). layouts: one per tensor of the canonical state. layers: the maps PLeaS refits."""

    groups: tuple[Group, ...]
    points: Mapping[str, tuple[str | None, ...]]
    layouts: Mapping[str, Layout]
    layers: tuple[Layer, ...] = field(default=())


class PleasAdapter(ModelAdapter, Protocol):
    def canonical(self, model: nn.Module) -> nn.Module:
        """An equivalent model in the form ``spec`` describes (the same function; e.g. norm gains folded into the
        maps that read them, so that averaging activations commutes with normalising them)."""

    def spec(self, model: nn.Module) -> Spec:
        """The permutation spec of a canonical model."""

    def activations(self, model: nn.Module, tokens: torch.Tensor, points: Sequence[str]) -> dict[str, torch.Tensor]:
        """tokens ``[B, S]`` -> {point: ``[N, *axes]``} for the requested points (fp32, no grad)."""


class TaskAdapter(Protocol):
    """What ``python -m merging`` needs beyond the weights: ``eval=true``, ``search=true``, assemble's
    ``router_init=stats`` and the data-aware methods. ``data``: the merge config's ``data`` node, opaque here (the
    adapter interprets it). The CLI builds the adapter from its ``adapter`` node (``_target_``)."""

    def load(self, source: str | os.PathLike | nn.Module) -> nn.Module:
        """The model any checkpoint ``merging`` reads holds (an ``nn.Module`` passes through), in eval mode."""

    def model_bytes(self, source: str | os.PathLike) -> int:
        """The bytes ``load(source)`` allocates for the model's parameters and buffers, from its config alone (no
        weights read, nothing allocated): the CLI checks them against free memory before merging."""

    def evaluate(self, model: nn.Module, data, split: str = "val") -> dict[str, float]:
        """Per-task accuracy on the validation split ("val"), or on a "search" split disjoint from it."""

    def task_means(self, model: nn.Module, tasks: Sequence[str], data) -> list[torch.Tensor]:
        """Per MoE layer ``[len(tasks), d]``: the mean input of that layer over each task spec's tokens."""

    def unlabeled(self, data, task: str | None = None, prompts: bool = False) -> UnlabeledData:
        """Unlabeled training inputs (of task spec ``task`` only, if given; ``prompts``: cut before the answer)."""

    def answer_length(self, data, task: str) -> int:
        """The longest answer of task spec ``task``, in tokens (DivMerge's ``max_new_tokens``)."""

    def save(self, model: nn.Module, out: str | os.PathLike) -> Path:
        """Write ``model`` as a checkpoint directory ``out`` that ``load`` reads back; returns the weights path."""
