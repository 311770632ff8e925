"""LightningModule for the MoE transformer: target-token loss + router losses, per-task accuracy.

Routing statistics and router schedules live in callbacks (``moe.callbacks``), which read the layers' routing
results themselves; this module only adds the router losses to the training loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from hydra.utils import get_class
from torch import nn
from torchmetrics import MeanMetric

from moe.config import ModelConfig, OptimConfig, RouterConfig
from moe.data.tasks import ALL_TASKS
from moe.nn.losses import router_loss
from moe.nn.routers import Router
from moe.nn.routing import raise_router_faults
from moe.train.evaluate import target_loss_and_correct

_ADAMW_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
OPTIM_IMPLS = ("auto", *_ADAMW_KWARGS)


def adamw_impl(impl: str, params: list[torch.Tensor]) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword for ``optim.impl``: "fused" / "foreach" / "for_loop", or "auto" = fused when
    every parameter is a CPU float tensor (torch's CPU default is the per-tensor loop), else torch's default."""
    if impl == "auto":
        on_cpu = all(p.device.type == "cpu" and p.is_floating_point() for p in params)
        return {"fused": True} if params and on_cpu else {}
    if impl not in _ADAMW_KWARGS:
        raise ValueError(f"optim.impl={impl!r}: expected one of {OPTIM_IMPLS}")
    return _ADAMW_KWARGS[impl]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))



def model_class(model: ModelConfig) -> type[nn.Module]:
    """The model class ``model._target_`` names: built as ``cls(model, router)``, its forward maps tokens
    ``[B, S]`` to ``(logits [B, S, V], routing results per MoE layer)``, as ``moe.nn.model.MoETransformer``'s."""
    try:
        cls = get_class(model._target_)
    except Exception as e:
        raise ValueError(f"model._target_={model._target_!r}: not an importable class ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model._target_={model._target_!r}: expected a torch.nn.Module class")
    return cls


def build_model(model: ModelConfig, router: RouterConfig) -> nn.Module:
    return model_class(model)(model, router)


class MoELitModule(L.LightningModule):
    """Target-token cross-entropy plus the router losses (``moe.nn.losses.router_loss``).

    objective "tasks" (the embedded multi-task data): validation logs ``val/acc/<task>``, ``val/mean_accuracy``,
    ``val/mean_accuracy_trained`` (over the evaluated tasks in ``train_tasks``) and ``val/loss``. objective "lm"
    (byte-level text, ``moe.data.pycode``): ``val/bpb/<domain>``, ``val/bpb`` and ``val/loss`` (bits per byte = nats /
    ln 2; every scored token is one byte). ``task_names``: what a batch's ``task_id`` indexes.
    """

    def __init__(
        self,
        model: ModelConfig,
        router: RouterConfig,
        optim: OptimConfig,
        max_steps: int,
        eval_tasks: list[str] | None = None,
        train_tasks: list[str] | None = None,
        task_names: list[str] | None = None,
        objective: str = "tasks",
    ):
        super().__init__()
        if objective not in ("tasks", "lm"):
            raise ValueError(f"objective={objective!r}: expected 'tasks' or 'lm'")
        self.save_hyperparameters(
            {"model": asdict(model), "router": asdict(router), "optim": asdict(optim), "max_steps": max_steps}
        )
        self.model = build_model(model, router)
        for m in self.model.modules():  # non-finite router logits: raised once per step, not one sync per layer
            if isinstance(m, Router):
                m.defer_checks = True
        self.router_cfg, self.optim_cfg, self.max_steps = router, optim, max_steps
        self.task_names, self.objective = list(task_names or ALL_TASKS), objective
        self.eval_tasks = list(eval_tasks or self.task_names)
        # val/mean_accuracy_trained averages the evaluated tasks the run trains on (all evaluated ones if none is)
        self.trained_tasks = [t for t in self.eval_tasks if t in (train_tasks or self.eval_tasks)] or self.eval_tasks
        self.val_task = nn.ModuleDict({t: MeanMetric() for t in self.eval_tasks})  # accuracy, or loss for "lm"
        self.val_loss = MeanMetric()

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    def _step(self, batch):
        tokens, mask = batch["tokens"], batch["target_mask"]
        logits, routings = self.model(tokens[:, :-1])
        loss_B, correct_B = target_loss_and_correct(logits, tokens, mask)
        return loss_B, correct_B, routings

    def training_step(self, batch, batch_idx):
        loss_B, correct, routings = self._step(batch)
        raise_router_faults([r.aux.faults for r in routings if r.aux.faults is not None])  # one sync for all layers
        ce = loss_B.mean()
        loss = ce + router_loss(routings, self.router_cfg.aux_loss_coef, self.router_cfg.z_loss_coef).to(ce)
        quality = {"train/bpb": ce / math.log(2)} if self.objective == "lm" else {
            "train/exact_match": correct.float().mean()}  # fmt: skip
        self.log_dict({"train/loss": loss, "train/ce": ce, **quality}, prog_bar=True,
                      batch_size=batch["tokens"].shape[0])  # fmt: skip
        return loss

    def validation_step(self, batch, batch_idx):
        loss_B, correct, _ = self._step(batch)
        self.val_loss.update(loss_B.mean(), weight=batch["tokens"].shape[0])
        value = loss_B if self.objective == "lm" else correct.float()
        for t in self.eval_tasks:
            sel = batch["task_id"] == self.task_names.index(t)
            if sel.any():
                self.val_task[t].update(value[sel])

    def on_validation_epoch_end(self):
        per = {t: m.compute() for t, m in self.val_task.items() if m.update_called}
        if not per:  # e.g. a sanity check that saw no full task
            return
        # torchmetrics has already summed the metrics over ranks; sync_dist averages equal values (no-op)
        val_loss = self.val_loss.compute()
        if self.objective == "lm":
            self.log_dict({f"val/bpb/{t}": v / math.log(2) for t, v in per.items()}, sync_dist=True)
            self.log("val/bpb", val_loss / math.log(2), prog_bar=True, sync_dist=True)
        else:
            self.log_dict({f"val/acc/{t}": v for t, v in per.items()}, sync_dist=True)
            self.log("val/mean_accuracy", torch.stack(list(per.values())).mean(), prog_bar=True, sync_dist=True)
            trained = [per[t] for t in self.trained_tasks if t in per]
            if trained:  # what a fine-tune's best checkpoint is chosen by
                self.log("val/mean_accuracy_trained", torch.stack(trained).mean(), sync_dist=True)
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        for m in [*self.val_task.values(), self.val_loss]:
            m.reset()

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            ],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            **adamw_impl(cfg.impl, list(self.parameters())),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, cfg.warmup_steps, self.max_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
