"""RoutingStatsCallback: per-layer routing statistics, pictures and warnings, for any LightningModule whose model
holds ``moe`` layers.

The callback hooks the MoE layers' forward (every layer returns ``(y, RoutingResult)``) and adds up, per layer,
what the routers did during training and validation batches: the load per expert, the expert x task counts (when
batches carry ``task_id``), the expert x token-class counts (when the datamodule has ``token_classes``), the
router entropy, the aux and z losses and the dropped slots. The module itself does nothing for it.

The router entropy needs the full ``[T, E]`` distribution, which a fused router never writes
(``moe.nn.routing.RouterAux.probs`` computes it when read): the callback reads it on validation batches and on the
training batches of logging steps only, so ``entropy`` is the mean over the tokens of those batches.

Every ``every_n_steps`` training steps (default: the Trainer's ``log_every_n_steps``) and at each validation
end it logs, per layer, under ``routing/{train,val}/layer{i}/``: ``util_min``, ``max_mean``, ``cv``,
``dead_frac``, ``eff_experts``, ``entropy``, ``aux_loss``, ``z_loss``, ``dropped_frac``, ``mi_task`` and the
top-3 / bottom-3 experts
(``moe.report.stats.load_summary``): a bounded number of keys whatever E is. With wandb it also logs the load as a
histogram, and every ``plot_every_n_steps`` and at the end, images: expert x task and expert x token-class
heatmaps, and the load over training (step x expert). Counts are summed over data-parallel ranks.

Layer kinds: ``sparse`` (token or expert choice) has a discrete load; SMEAR's "load" is the argmax of its
router (keys ``argmax_*``); Soft MoE has none (entropy and losses only).

Everything logged is also appended to ``<save_dir>/routing/stats.jsonl`` (rank 0), which ``python -m moe.report``
renders without wandb; ``trace_max_rows > 0`` adds per-token decisions to ``routing/trace.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import torch
from rich.console import Console

from moe.nn.layers import MoELayer
from moe.nn.smear import SMEARLayer
from moe.nn.soft_moe import SoftMoELayer
from moe.report import plots
from moe.report.stats import load_summary, mean_entropy, mutual_information

LAYER_KINDS = ((MoELayer, "sparse"), (SMEARLayer, "smear"), (SoftMoELayer, "soft"))


def layer_kind(module) -> str | None:
    return next((kind for cls, kind in LAYER_KINDS if isinstance(module, cls)), None)


@dataclass
class _Window:
    """One layer's routing added up since the last log, on this rank (tensors stay on the model's device)."""

    load: torch.Tensor | None = None  # [E] slots per expert; already global when ``load_global``
    load_global: bool = False
    joint: torch.Tensor | None = None  # [E, tasks]
    classes: torch.Tensor | None = None  # [E, token classes]
    # sums: entropy (over the tokens of the batches that read probs), tokens (those tokens), aux, z, dropped, batches
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double().reshape(())
        self.scalars[name] = self.scalars[name] + value if name in self.scalars else value


def _bincount2(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    flat = rows.reshape(-1).long() * n_cols + cols.reshape(-1).long()
    return torch.bincount(flat, minlength=n_rows * n_cols).reshape(n_rows, n_cols).double()


class RoutingStatsCallback(L.Callback):
    def __init__(self, every_n_steps: int | None = None, plot_every_n_steps: int = 500, hot_share: float = 0.5,
                 dead_patience: int = 5, top_k: int = 3, save_dir: str | None = None, trace_max_rows: int = 0,
                 trace_tokens_per_step: int = 32):  # fmt: skip
        if (every_n_steps is not None and every_n_steps < 1) or plot_every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}, plot_every_n_steps={plot_every_n_steps}: expected >= 1")
        if not 0 < hot_share <= 1:
            raise ValueError(f"hot_share={hot_share}: expected a share in (0, 1]")
        self.every_n_steps, self.plot_every_n_steps = every_n_steps, plot_every_n_steps
        self.hot_share, self.dead_patience, self.top_k = hot_share, dead_patience, top_k
        self.save_dir, self.trace_max_rows, self.trace_tokens_per_step = save_dir, trace_max_rows, trace_tokens_per_step
        self.console = Console(stderr=True)

    # ---- wiring ------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.every_n_steps is None:  # Lightning hands logged scalars to the loggers at this interval
            self.every_n_steps = trainer.log_every_n_steps
        self.layers = [(name, m, layer_kind(m)) for name, m in pl_module.named_modules() if layer_kind(m)]
        self.handles = [m.register_forward_hook(partial(self._capture, i)) for i, (_, m, _) in enumerate(self.layers)]
        dm = trainer.datamodule
        self.task_names = list(getattr(dm, "task_names", None) or [])
        self.class_fn = getattr(dm, "token_classes", None)
        self.class_names = list(getattr(dm, "class_names", None) or [])
        self.windows: dict[str, list[_Window]] = {}
        self.split, self.batch, self.trace_rows = None, None, 0
        self.history: list[list[tuple[int, list[float]]]] = [[] for _ in self.layers]  # per layer: (step, load)
        self.plot_joint: list[_Window] = [_Window() for _ in self.layers]  # counts since the last pictures
        self.dead_runs = [None] * len(self.layers)
        self.hot: set[tuple[int, int]] = set()
        self.pending_metrics: int | None = None  # a train logging step whose "metrics" record is not written yet
        root = Path(self.save_dir or trainer.default_root_dir) / "routing"
        self.out = root if trainer.is_global_zero else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for h in getattr(self, "handles", []):
            h.remove()
        self.handles = []

    def _start(self, split: str, batch) -> None:
        self.split, self.batch = split, batch
        self.windows.setdefault(split, [_Window() for _ in self.layers])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush_metrics(trainer)
        self._start("train", batch)
        self.step_now = trainer.global_step + 1  # the step this batch's optimizer step will complete
        # the router's [T, E] distribution is materialised for the entropy on logging steps only
        self.read_probs = self.step_now % self.every_n_steps == 0 or self.step_now >= (trainer.max_steps or 0) > 0
        self.tracing = self.trace_rows < self.trace_max_rows and (trainer.global_step + 1) % self.every_n_steps == 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._start("val", batch)
            self.tracing, self.read_probs = False, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.split = None
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step >= (trainer.max_steps or 0) > 0:
            self._log(trainer, pl_module, "train")
        if step % self.plot_every_n_steps == 0:
            self._pictures(trainer, step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.split = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val" in self.windows:
            self._log(trainer, pl_module, "val")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._flush_metrics(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """The run's scalars once this validation's epoch-level values are in ``callback_metrics`` (they are not
        yet at ``on_validation_epoch_end``, where callbacks run before the module logs its own)."""
        if not trainer.sanity_checking:
            self._write([], {"step": trainer.global_step, "split": "val", "kind": "metrics",
                             "values": self._scalars(trainer)})  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush_metrics(trainer)
        self._pictures(trainer, trainer.global_step)

    def _flush_metrics(self, trainer) -> None:
        """Write the last train logging step's "metrics" record: Lightning moves a step's logged values into
        ``callback_metrics`` after ``on_train_batch_end``, so they are read at the next hook."""
        if self.pending_metrics is not None:
            self._write([], {"step": self.pending_metrics, "split": "train", "kind": "metrics",
                             "values": self._scalars(trainer)})  # fmt: skip
            self.pending_metrics = None

    # ---- accumulation (inside the layers' forward) ----------------------------------------------------------------

    def _batch_field(self, key: str):
        return self.batch.get(key) if isinstance(self.batch, dict) else None

    @torch.no_grad()
    def _capture(self, idx: int, module, inputs, output) -> None:
        if self.split is None:
            return
        r, kind, lead = output[1], self.layers[idx][2], inputs[0].shape[:-1]
        w, E, T = self.windows[self.split][idx], r.counts.shape[0], r.ids.shape[0]
        device = r.counts.device
        if self.read_probs or kind != "sparse":  # soft and SMEAR layers hold their probs anyway
            w.add("entropy", mean_entropy(r.probs))
            w.add("tokens", torch.tensor(T, device=device))
        w.add("aux", r.aux_loss)
        w.add("z", r.z_loss)
        w.add("batches", torch.tensor(1, device=device))
        if r.dropped_fraction is not None:
            w.add("dropped", r.dropped_fraction)
        if kind == "soft":
            return
        load = r.load.double() if kind == "sparse" else torch.bincount(r.probs.argmax(-1), minlength=E).double()
        w.load = load if w.load is None else w.load + load
        w.load_global = kind == "sparse" and r.global_counts is not None
        if r.expert_tokens is not None:  # expert choice: expert e took tokens expert_tokens[e]
            tokens = r.expert_tokens
            experts = torch.arange(E, device=load.device).repeat_interleave(tokens.shape[1])
        elif kind == "smear":
            experts, tokens = r.probs.argmax(-1), torch.arange(T, device=load.device)
        else:
            k = r.ids.shape[1]
            experts, tokens = r.ids, torch.arange(T, device=load.device).repeat_interleave(k)
        task = self._batch_field("task_id")
        if task is not None and len(lead) == 2 and task.shape[0] == lead[0] and self.task_names:
            task_T = task.to(load.device).repeat_interleave(lead[1])
            joint = _bincount2(experts, task_T[tokens.reshape(-1)], E, len(self.task_names))
            w.joint = joint if w.joint is None else w.joint + joint
        tok = self._batch_field("tokens")
        if self.class_fn is not None and tok is not None and len(lead) == 2 and tok.shape[1] >= lead[1]:
            cls_T = self.class_fn(tok[:, : lead[1]]).reshape(-1).to(load.device)
            classes = _bincount2(experts, cls_T[tokens.reshape(-1)], E, len(self.class_names))
            w.classes = classes if w.classes is None else w.classes + classes
        if self.tracing and self.out is not None and kind == "sparse" and r.expert_tokens is None:
            self._trace(idx, r, tok)

    def _trace(self, idx: int, r, tok) -> None:
        n = min(self.trace_tokens_per_step, r.ids.shape[0], self.trace_max_rows - self.trace_rows)
        flat = tok[:, :-1].reshape(-1) if tok is not None and tok.dim() == 2 else None
        with open(self.out / "trace.jsonl", "a") as f:
            for t in range(n):
                token = int(flat[t]) if flat is not None and t < flat.numel() else None
                row = {"step": self.step_now, "layer": idx, "token_index": t, "token": token,
                       "experts": r.ids[t].tolist(), "weights": r.weights[t].float().tolist()}  # fmt: skip
                f.write(json.dumps(row) + "\n")
        self.trace_rows += n

    # ---- logging ------------------------------------------------------------------------------------------------

    @staticmethod
    def _reduce_all(trainer, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every tensor of ``parts`` summed over the data-parallel ranks in one collective (one fp64 buffer: counts
        stay exact below 2**53), each returned in its own shape and dtype."""
        if not parts:
            return []
        flat = torch.cat([t.detach().reshape(-1).to(parts[0].device, torch.float64) for t in parts])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        return [x.view(t.shape).to(t.dtype) for x, t in zip(flat.split([t.numel() for t in parts]), parts)]

    def _log(self, trainer, pl_module, split: str) -> None:
        step, metrics, records = trainer.global_step, {}, []
        windows = self.windows.pop(split, [])
        # What this step reduces (every rank alike, in this order): the scalars, then the loads not yet global,
        # then the joint / class matrices, for every layer.
        keys = [sorted(w.scalars) for w in windows]
        wanted = [w.scalars[k] for w, ks in zip(windows, keys) for k in ks]
        wanted += [w.load for w in windows if w.load is not None and not w.load_global]
        wanted += [m for w in windows for m in (w.joint, w.classes) if m is not None]
        reduced = iter(self._reduce_all(trainer, wanted))
        scalars = [{k: next(reduced).item() for k in ks} for ks in keys]
        loads = [next(reduced) if w.load is not None and not w.load_global else w.load for w in windows]
        mats = [[next(reduced) if m is not None else None for m in (w.joint, w.classes)] for w in windows]
        for i, w in enumerate(windows):
            name, _, kind = self.layers[i]
            s = scalars[i]
            if not s:
                continue
            per = {"aux_loss": s["aux"] / s["batches"], "z_loss": s["z"] / s["batches"]}
            if "entropy" in s:  # read on the window's logging step (every rank alike: the keys match)
                per["entropy"] = s["entropy"] / max(s["tokens"], 1)
            if "dropped" in s:
                per["dropped_frac"] = s["dropped"] / s["batches"]
            rec = {"step": step, "split": split, "layer": i, "name": name, "kind": kind}
            if w.load is not None:
                load = loads[i]
                prefix = "argmax_" if kind == "smear" else ""
                per.update({prefix + k: v for k, v in load_summary(load, self.top_k).items()})
                rec["load"] = load.tolist()
                if split == "train":
                    self._warn(i, load, step)
                    self.history[i].append((step, load.tolist()))
            for key, mat in zip(("joint", "classes"), mats[i]):
                if mat is not None:
                    rec[key] = mat.tolist()
                    rec["task_names" if key == "joint" else "class_names"] = (
                        self.task_names if key == "joint" else self.class_names
                    )
                    if key == "joint":
                        per["mi_task"] = mutual_information(mat)
                    if split == "train":
                        setattr(self.plot_joint[i], key, mat if getattr(self.plot_joint[i], key) is None
                                else getattr(self.plot_joint[i], key) + mat)  # fmt: skip
            rec["metrics"] = per
            records.append(rec)
            metrics.update({f"routing/{split}/layer{i}/{k}": v for k, v in per.items()})
        if not metrics:
            return
        train = split == "train"  # values are already global: sync_dist only averages equal numbers
        pl_module.log_dict(metrics, on_step=train, on_epoch=not train, batch_size=1, sync_dist=not train)
        self._log_wandb(trainer, {f"routing/{split}/layer{r['layer']}/load_hist": r["load"] for r in records
                                  if "load" in r}, histogram=True)  # fmt: skip
        self._write(records)
        if train:
            self.pending_metrics = step

    def _scalars(self, trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if not k.startswith("routing/") and torch.as_tensor(v).numel() == 1}  # fmt: skip

    def _write(self, records: list[dict], metrics: dict | None = None) -> None:
        if self.out is None:
            return
        with open(self.out / "stats.jsonl", "a") as f:
            for rec in [*records, *([metrics] if metrics else [])]:
                f.write(json.dumps(rec) + "\n")

    def _warn(self, i: int, load: torch.Tensor, step: int) -> None:
        share = load / load.sum().clamp_min(1)
        if len(share) == 1:  # one expert (a dense model) always takes every slot
            return
        for e in torch.nonzero(share > self.hot_share).flatten().tolist():
            if (i, e) not in self.hot:
                self.hot.add((i, e))
                self.console.print(f"[yellow]routing: layer {i} expert {e} took {share[e]:.0%} of the slots at step "
                                   f"{step} (routing_stats.hot_share={self.hot_share:.0%})[/yellow]")  # fmt: skip
        self.hot -= {(i, e) for e in torch.nonzero(share <= self.hot_share).flatten().tolist()}
        dead = load == 0
        runs = self.dead_runs[i]
        runs = torch.where(dead, (runs if runs is not None else torch.zeros_like(load)) + 1, torch.zeros_like(load))
        self.dead_runs[i] = runs
        for e in torch.nonzero(runs == self.dead_patience).flatten().tolist():
            self.console.print(f"[yellow]routing: layer {i} expert {e} got no tokens for {self.dead_patience} "
                               f"logging steps in a row (step {step})[/yellow]")  # fmt: skip

    def _log_wandb(self, trainer, values: dict, histogram: bool = False) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers or not values or not trainer.is_global_zero:
            return
        import numpy as np
        import wandb

        if histogram:
            values = {k: wandb.Histogram(np_histogram=(np.asarray(v), np.arange(len(v) + 1) - 0.5))
                      for k, v in values.items()}  # fmt: skip
        for lg in loggers:
            lg.log_metrics(values, step=trainer.global_step)

    def _pictures(self, trainer, step: int) -> None:
        if not trainer.is_global_zero:
            return
        images = {}
        for i in range(len(self.layers)):
            pj = self.plot_joint[i]
            E = next((m.shape[0] for m in (pj.joint, pj.classes) if m is not None), 0)
            experts = [f"e{e}" for e in range(E)]
            if pj.joint is not None:
                images[f"routing/layer{i}/expert_task"] = plots.heatmap(
                    pj.joint.cpu().numpy(), experts, self.task_names, f"layer {i}: experts per task (step {step})",
                    "task", "expert")  # fmt: skip
            if pj.classes is not None:
                images[f"routing/layer{i}/expert_token_class"] = plots.heatmap(
                    pj.classes.cpu().numpy(), experts, self.class_names,
                    f"layer {i}: experts per token class (step {step})", "token class", "expert")  # fmt: skip
            if self.history[i]:
                steps = [s for s, _ in self.history[i]]
                images[f"routing/layer{i}/load_over_training"] = plots.load_over_training(
                    steps, [ld for _, ld in self.history[i]], f"layer {i}: load over training"
                )
            self.plot_joint[i] = _Window()
        if images:
            import wandb

            self._log_wandb(trainer, {k: wandb.Image(plots.to_rgb(fig)) for k, fig in images.items()})
