"""The data-aware merges' protocols (``merging.protocols``) for ``MoETransformer``: the one place they meet our model.

``MoEAdapter`` loads, builds and runs the model (DivMerge: any configuration) and describes its units (PLeaS); as
``merging.protocols.TaskAdapter`` it also evaluates, searches on, measures and writes models for ``python -m merging``
(its ``data`` node: ``moe.config.DataConfig`` fields). ``unlabeled_batches`` turns a ``moe.data.tasks`` split into
unlabeled input batches.

PLeaS units, on the canonical form (each RMSNorm gain folded into the maps that read the normalised stream, gains
then 1: the same function, with no per-channel gain left between the stacked activations and the maps refit):

- ``res``: the d_model channels of the residual stream (embedding columns, token shift, every map reading or
  writing the stream, the head's input), matched on the stream at every block boundary. Fully merged: RMSNorm
  normalises over the whole stream and attention's inner width is d_model, so a wider stream would change both.
- ``blocks.{i}.heads``: attention heads as wholes (their q, k, v rows of qkv and columns of proj), matched on their
  attention patterns. Fully merged (the head count is tied to d_model). Dims within a head do not permute: RoPE
  ties each q/k pair to its frequency.
- ``blocks.{i}.experts``: experts (router rows, selection bias, expert weights), matched on the router's
  distribution over experts per token. Fully merged (more experts would change what top-k routing selects).
- ``blocks.{i}.hidden``: each expert's SwiGLU hidden units (w_gate/w_up columns, w_down rows), matched within
  matched experts on dense activations (every token through every expert). These widen: d_ff -> d_ff + round(r d_ff).

Least squares refits the token shift, qkv, proj, router, w_gate, w_up (their pre-activations) and w_down and the
head; each expert's maps weight tokens by the two models' mean routing weight for it. The embedding, the gains (1)
and the selection bias follow PLeaS's block rule. Supported for PLeaS: ``model.moe.kind=sparse`` without shared or
residual experts, ``router.kind=topk`` without a learned ssmax scale.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merging.protocols import Group, Layer, Layout, Spec
from moe.config import DataConfig, ModelConfig, PyCodeConfig, RouterConfig, TextConfig
from moe.data.tasks import ALL_TASKS, PAD, SEP, TaskSplit, build_splits
from moe.export import LoadedCheckpoint, _from_dict, export_model, load_weights_into, read_config
from moe.nn.model import MoETransformer, apply_rope
from moe.train.evaluate import evaluate_tasks
from moe_merge_common.io import Checkpoint


def architecture(path: str | os.PathLike, ck: Checkpoint | None = None) -> tuple[ModelConfig, RouterConfig]:
    """The configs of the model a checkpoint holds: ``config.json`` beside the weights, else the checkpoint's
    hyper-parameters."""
    ck = ck if ck is not None else Checkpoint(path)
    if (ck.folder / "config.json").is_file():
        return read_config(ck.folder / "config.json")
    if ck.hparams.get("model"):
        model_cfg = _from_dict(ModelConfig, dict(ck.hparams["model"]), f"{path}:hyper_parameters.model")
        router_cfg = _from_dict(RouterConfig, dict(ck.hparams.get("router") or {}), f"{path}:hyper_parameters.router")
        return model_cfg, router_cfg
    raise FileNotFoundError(f"{path}: no config.json beside the weights and no hyper-parameters in the checkpoint")


def model_bytes(model_cfg: ModelConfig, router_cfg: RouterConfig) -> int:
    """Parameter and buffer bytes of ``MoETransformer(model_cfg, router_cfg)``, built on the meta device."""
    with torch.device("meta"):
        model = MoETransformer(model_cfg, router_cfg)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def load_any(path: str | os.PathLike) -> MoETransformer:
    """Any checkpoint ``merging`` reads (export or sharded directories, safetensors, Lightning ``.ckpt``) as a model:
    the architecture from ``config.json`` beside the weights, else from the checkpoint's hyper-parameters. A model
    too large for the memory available is refused before it is built (``moe_merge_common.resources.check_memory``)."""
    from moe_merge_common.resources import check_memory

    ck = Checkpoint(path)
    model_cfg, router_cfg = architecture(path, ck)
    check_memory(model_bytes(model_cfg, router_cfg), f"{path}: the model its config declares")
    model = MoETransformer(model_cfg, router_cfg)
    load_weights_into(model, LoadedCheckpoint(Path(path), {n: ck.read(n) for n in ck.names}, model_cfg))
    return model.eval()


def data_config(data: DataConfig | Mapping | None) -> DataConfig:
    """The merge config's opaque ``data`` node as a ``DataConfig`` (None: the defaults); unknown keys are named."""
    if data is None or isinstance(data, DataConfig):
        return data or DataConfig()
    data = dict(data)
    if "kind" in data:  # before data._target_ (issue 21)
        raise ValueError(f"data.kind={data['kind']!r}: renamed; use data._target_=moe.data.tasks.MultiTaskDataModule "
                         "or moe.data.pycode.PyCodeDataModule")  # fmt: skip
    try:
        if isinstance(data.get("pycode"), Mapping):
            data["pycode"] = PyCodeConfig(**data["pycode"])
        if isinstance(data.get("text"), Mapping):
            data["text"] = TextConfig(**data["text"])
        return DataConfig(**data)
    except TypeError as e:
        raise ValueError(f"data: {e} (expected moe.config.DataConfig fields, data.pycode / data.text: theirs)") from e


def search_split(data: DataConfig, val_tokens: torch.Tensor) -> TaskSplit:
    """Examples drawn with another seed, minus any row of the reported validation split (``merging.search``)."""
    _, split = build_splits(replace(data, seed=data.seed + 7919))
    seen = {row.numpy().tobytes() for row in val_tokens}
    keep = torch.tensor([row.numpy().tobytes() not in seen for row in split.tokens], dtype=torch.bool)
    return TaskSplit(split.tokens[keep], split.target_mask[keep], split.task_id[keep])


class MoEAdapter:
    """``merging.protocols.DivMergeAdapter`` and ``PleasAdapter`` for models of one ``(ModelConfig, RouterConfig)``
    (``d_ff`` may differ: PLeaS widens it), and ``merging.protocols.TaskAdapter``. Built without configs (as the
    CLI's ``adapter`` node does), the first model ``load`` reads fixes the architecture ``build`` makes."""

    def __init__(self, model_cfg: ModelConfig | None = None, router_cfg: RouterConfig | None = None):
        self.model_cfg, self.router_cfg = model_cfg, router_cfg
        self._splits: dict[str, tuple[TaskSplit, TaskSplit]] = {}

    @classmethod
    def of(cls, source: str | os.PathLike | MoETransformer) -> MoEAdapter:
        """The adapter for a model or an export directory's architecture."""
        if isinstance(source, MoETransformer):
            return cls(source.cfg, source.router_cfg)
        return cls(*read_config(Path(source) / "config.json"))

    def load(self, source: str | os.PathLike | nn.Module) -> nn.Module:
        """Any checkpoint ``load_any`` reads, or a model, in eval mode."""
        model = source if isinstance(source, nn.Module) else load_any(source)
        if self.model_cfg is None and isinstance(model, MoETransformer):
            self.model_cfg, self.router_cfg = model.cfg, model.router_cfg
        return model.eval()

    def model_bytes(self, source: str | os.PathLike) -> int:
        return model_bytes(*architecture(source))

    def build(self, state: Mapping[str, torch.Tensor]) -> MoETransformer:
        if self.model_cfg is None:
            raise ValueError("model_cfg: unknown until a model is loaded; pass it or use MoEAdapter.of(model)")
        d_ff = {t.shape[-1] for k, t in state.items() if k.endswith("experts.w_gate")}
        if len(d_ff) != 1:
            raise ValueError(f"state: expected one expert width (w_gate's last dim) over the layers, got {d_ff}")
        model = MoETransformer(replace(self.model_cfg, d_ff=d_ff.pop()), self.router_cfg)
        model.load_state_dict(dict(state))
        return model.eval()

    def logits(self, model, tokens, params=None) -> torch.Tensor:
        if params is None:
            return model(tokens)[0]
        return torch.func.functional_call(model, dict(params), (tokens,))[0]

    def layers(self, model: nn.Module) -> dict[str, list[str]]:
        """One layer per parameter tensor (AdaMerging's layer-wise granularity)."""
        return {name: [name] for name, p in model.named_parameters() if p.is_floating_point()}

    # ------------------------------------------------------------------------------------------------ TaskAdapter

    def splits(self, data) -> tuple[TaskSplit, TaskSplit]:
        """(train, val) of ``data``, built once per configuration."""
        cfg = data_config(data)
        if repr(cfg) not in self._splits:
            self._splits[repr(cfg)] = build_splits(cfg)
        return self._splits[repr(cfg)]

    def evaluate(self, model: nn.Module, data, split: str = "val") -> dict[str, float]:
        if split not in ("val", "search"):
            raise ValueError(f"split={split!r}: expected 'val' or 'search'")
        val = self.splits(data)[1]
        if split == "search":
            key = f"search {data_config(data)!r}"
            if key not in self._splits:
                self._splits[key] = (val, search_split(data_config(data), val.tokens))
            val = self._splits[key][1]
        return evaluate_tasks(model, val)

    @torch.no_grad()
    def task_means(self, model: nn.Module, tasks: Sequence[str], data, per_task: int = 256) -> list[torch.Tensor]:
        """Per MoE layer ``[N, d]``: the mean ``norm_moe`` output over the non-padding tokens of each task spec."""
        wanted = sorted({t for spec in tasks for t in spec.split("+")}, key=ALL_TASKS.index)
        cfg = replace(data_config(data), tasks=wanted, eval_tasks=wanted, train_per_task=per_task, val_per_task=8)
        split, _ = build_splits(cfg)
        captured: dict[int, torch.Tensor] = {}
        hooks = [block.norm_moe.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out))
                 for i, block in enumerate(model.blocks)]  # fmt: skip
        try:
            model(split.tokens[:, :-1])
        finally:
            for h in hooks:
                h.remove()
        real = (split.tokens[:, :-1] != PAD).unsqueeze(-1).float()
        means = []
        for i in range(len(model.blocks)):
            h, rows = captured[i] * real, []
            for spec in tasks:
                sel = torch.isin(split.task_id, torch.tensor([ALL_TASKS.index(t) for t in spec.split("+")]))
                rows.append(h[sel].sum((0, 1)) / real[sel].sum().clamp_min(1))
            means.append(torch.stack(rows))
        return means

    def unlabeled(self, data, task: str | None = None, prompts: bool = False, batch_size: int = 64) -> list:
        """The training split's inputs (of the tasks in spec ``task``, e.g. "copy+add"), see ``unlabeled_batches``."""
        train = self.splits(data)[0]
        if task is None:
            return unlabeled_batches(train, batch_size, prompts)
        return [b for t in task.split("+") for b in unlabeled_batches(train, batch_size, prompts, t)]

    def answer_length(self, data, task: str) -> int:
        """The longest answer (target tokens, EOS included) of the tasks in spec ``task`` in the training split."""
        train = self.splits(data)[0]
        ids = [ALL_TASKS.index(t) if t in ALL_TASKS else _unknown_task(t) for t in task.split("+")]
        rows = train.target_mask[torch.isin(train.task_id, torch.tensor(ids))]
        if not len(rows):
            raise ValueError(f"tasks: {task!r} has no rows in data.tasks={data_config(data).tasks}")
        return int(rows.sum(1).max())

    def save(self, model: nn.Module, out: str | os.PathLike) -> Path:
        return export_model(model, out)

    # ------------------------------------------------------------------------------------------------ PLeaS

    def canonical(self, model: MoETransformer) -> MoETransformer:
        """A copy with every RMSNorm gain folded into the maps reading the normalised stream (gains set to 1)."""
        _check_pleas(model.cfg, model.router_cfg)
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            for blk in m.blocks:
                blk.attn.qkv.weight.mul_(blk.norm_attn.weight)
                moe, g = blk.moe, blk.norm_moe.weight
                moe.router.weight.mul_(g)
                moe.experts.w_gate.mul_(g[:, None])
                moe.experts.w_up.mul_(g[:, None])
                blk.norm_attn.weight.fill_(1.0)
                g.fill_(1.0)
            m.head.weight.mul_(m.norm.weight)
            m.norm.weight.fill_(1.0)
        return m

    def spec(self, model: MoETransformer) -> Spec:
        cfg = model.cfg
        _check_pleas(cfg, model.router_cfg)
        d, H, E, V, L = cfg.d_model, cfg.n_head, cfg.num_experts, cfg.vocab_size, cfg.n_layer
        f, hd = model.blocks[0].moe.experts.w_gate.shape[-1], d // H
        groups = [Group("res", d, tuple(f"resid.{k}" for k in range(2 * L + 1)))]
        points: dict[str, tuple] = {f"resid.{k}": ("res",) for k in range(2 * L + 1)}
        points |= {"shift.in": ("res",), "shift.out": ("res",), "final": ("res",), "logits": (None,)}
        layouts = {"embed.weight": Layout((V, d), (None, "res"), (1,)),
                   "norm.weight": Layout((d,), ("res",), (0,)),
                   "head.weight": Layout((V, d), (None, "res"), (0,))}  # fmt: skip
        layers = [Layer("head.weight", "final", "logits", inputs=(1,), outputs=(0,))]
        if cfg.token_shift:
            layouts["shift.weight"] = Layout((d, d), ("res", "res"), (0,))
            layers.append(Layer("shift.weight", "shift.in", "shift.out", inputs=(1,), outputs=(0,)))
        for i in range(L):
            b, heads, ex, hid = f"blocks.{i}", f"blocks.{i}.heads", f"blocks.{i}.experts", f"blocks.{i}.hidden"
            groups += [Group(heads, H, (f"{b}.attn.probs",)), Group(ex, E, (f"{b}.probs",))]
            points |= {
                f"{b}.attn.in": ("res",), f"{b}.attn.qkv": (None, heads, None), f"{b}.attn.probs": (heads, None),
                f"{b}.attn.y": (heads, None), f"{b}.attn.out": ("res",), f"{b}.moe.in": ("res",),
                f"{b}.router": (ex,), f"{b}.probs": (ex,), f"{b}.route": (ex,), f"{b}.gate": (ex, hid),
                f"{b}.up": (ex, hid), f"{b}.hidden": (ex, hid), f"{b}.down": (ex, "res"),
            }  # fmt: skip
            layouts |= {
                f"{b}.norm_attn.weight": Layout((d,), ("res",), (0,)),
                f"{b}.attn.qkv.weight": Layout((3, H, hd, d), (None, heads, None, "res"), (0, 1, 2)),
                f"{b}.attn.proj.weight": Layout((d, H, hd), ("res", heads, None), (0,)),
                f"{b}.norm_moe.weight": Layout((d,), ("res",), (0,)),
                f"{b}.moe.router.weight": Layout((E, d), (ex, "res"), (0,)),
                f"{b}.moe.router.expert_bias": Layout((E,), (ex,), (0,)),
                f"{b}.moe.experts.w_gate": Layout((E, d, f), (ex, "res", hid), (2,)),
                f"{b}.moe.experts.w_up": Layout((E, d, f), (ex, "res", hid), (2,)),
                f"{b}.moe.experts.w_down": Layout((E, f, d), (ex, hid, "res"), (2,)),
            }
            w = f"{b}.moe.experts"
            layers += [
                Layer(f"{b}.attn.qkv.weight", f"{b}.attn.in", f"{b}.attn.qkv", inputs=(3,), outputs=(0, 1, 2)),
                Layer(f"{b}.attn.proj.weight", f"{b}.attn.y", f"{b}.attn.out", inputs=(1, 2), outputs=(0,)),
                Layer(f"{b}.moe.router.weight", f"{b}.moe.in", f"{b}.router", inputs=(1,), outputs=(0,)),
                Layer(f"{w}.w_gate", f"{b}.moe.in", f"{b}.gate", (1,), (2,), batch=0, weight=f"{b}.route"),
                Layer(f"{w}.w_up", f"{b}.moe.in", f"{b}.up", (1,), (2,), batch=0, weight=f"{b}.route"),
                Layer(f"{w}.w_down", f"{b}.hidden", f"{b}.down", (1,), (2,), batch=0, weight=f"{b}.route"),
            ]
        groups += [
            Group(f"blocks.{i}.hidden", f, (f"blocks.{i}.hidden",), True, f"blocks.{i}.experts") for i in range(L)
        ]
        return Spec(tuple(groups), points, layouts, tuple(layers))

    @torch.no_grad()
    def activations(
        self, model: MoETransformer, tokens: torch.Tensor, points: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Runs the model with hooks; the experts' points are computed densely (every token through every expert)."""
        cap: dict[str, torch.Tensor] = {}
        hooks = []

        def on(module: nn.Module, inp: str | None = None, out: str | None = None):
            def hook(_, args, output):
                if inp:
                    cap[inp] = args[0]
                if out:
                    cap[out] = output

            hooks.append(module.register_forward_hook(hook))

        if model.shift is not None:
            on(model.shift, "shift.in", "shift.out")
        for i, blk in enumerate(model.blocks):
            b = f"blocks.{i}"
            on(blk.norm_attn, f"resid.{2 * i}", f"{b}.attn.in")
            on(blk.attn.qkv, None, f"{b}.attn.qkv")
            on(blk.attn.proj, f"{b}.attn.y", f"{b}.attn.out")
            on(blk.norm_moe, f"resid.{2 * i + 1}", f"{b}.moe.in")
            on(blk.moe.router, None, f"{b}.routing")
        on(model.norm, f"resid.{2 * len(model.blocks)}", "final")
        on(model.head, None, "logits")
        try:
            model(tokens)
        finally:
            for h in hooks:
                h.remove()

        S, H = tokens.shape[1], model.cfg.n_head
        out = {}
        for i, blk in enumerate(model.blocks):
            b, ex = f"blocks.{i}", blk.moe.experts
            q, k, _ = cap[f"{b}.attn.qkv"].unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4)  # [B, H, S, hd] each
            cos, sin = model.rope_cos[:S], model.rope_sin[:S]
            scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(S, S, dtype=torch.bool).triu(1)
            out[f"{b}.attn.probs"] = scores.masked_fill(causal, float("-inf")).softmax(-1).transpose(1, 2)
            out[f"{b}.attn.qkv"] = cap[f"{b}.attn.qkv"].unflatten(-1, (3, H, -1))
            out[f"{b}.attn.y"] = cap[f"{b}.attn.y"].unflatten(-1, (H, -1))
            x = cap[f"{b}.moe.in"]
            r = cap.pop(f"{b}.routing")
            out[f"{b}.router"] = blk.moe.router.logits(x)
            out[f"{b}.probs"] = r.probs.view(*x.shape[:2], -1)
            route = torch.zeros_like(r.probs).scatter_add_(1, r.ids, r.weights.float())
            out[f"{b}.route"] = route.view(*x.shape[:2], -1)
            gate = torch.einsum("...d,edf->...ef", x, ex.w_gate)
            up = torch.einsum("...d,edf->...ef", x, ex.w_up)
            hidden = F.silu(gate) * up
            out |= {f"{b}.gate": gate, f"{b}.up": up, f"{b}.hidden": hidden,
                    f"{b}.down": torch.einsum("...ef,efd->...ed", hidden, ex.w_down)}  # fmt: skip
        cap = {**cap, **out}
        unknown = [p for p in points if p not in cap]
        if unknown:
            raise ValueError(f"points: unknown {unknown}; this model has {sorted(cap)}")
        return {p: cap[p].flatten(0, 1).float() for p in points}  # [B, S, ...] -> [N, ...]


def _unknown_task(task: str):
    raise ValueError(f"tasks: unknown task {task!r}; expected some of {list(ALL_TASKS)}")


def _check_pleas(cfg: ModelConfig, router: RouterConfig) -> None:
    if cfg.moe.kind != "sparse" or cfg.moe.n_shared or cfg.moe.residual:
        raise ValueError(f"model.moe={cfg.moe}: PLeaS supports kind=sparse without shared or residual experts")
    if router.kind != "topk" or router.learn_ssmax_s:
        raise ValueError(f"router.kind={router.kind!r}, learn_ssmax_s={router.learn_ssmax_s}: PLeaS supports "
                         "kind=topk without a learned ssmax scale")  # fmt: skip


def unlabeled_batches(split: TaskSplit, batch_size: int = 64, prompts: bool = False,
                      task: str | None = None) -> list[torch.Tensor]:  # fmt: skip
    """A split's rows (those of ``task`` only, if given) as unlabeled input batches, in order: ``tokens[:, :-1]``
    (what the model reads), or with ``prompts`` each row up to and including its SEP (batches never mix lengths)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if task is not None and task not in ALL_TASKS:
        raise ValueError(f"task={task!r}: expected one of {list(ALL_TASKS)}")
    tokens = split.tokens if task is None else split.tokens[split.task_id == ALL_TASKS.index(task)]
    if not prompts:
        return list(tokens[:, :-1].split(batch_size))
    ends = (tokens == SEP).int().argmax(1) + 1
    return [b for end in ends.unique().tolist() for b in tokens[ends == end, :end].split(batch_size)]
