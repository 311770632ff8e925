"""The one LightningModule: target-token loss + router losses, for our model or a wrapped Hugging Face one.

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

from moe.config import ModelConfig, OptimConfig, RouterConfig
from moe.data.metrics import TaskMetrics, next_token_nll, per_example_loss
from moe.data.tasks import ALL_TASKS
from moe.nn.losses import router_loss
from moe.nn.routers import Router
from moe.nn.routing import raise_router_faults

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
    """Next-token cross-entropy on the target tokens plus the router losses (``moe.nn.losses.router_loss``), for
    any model ``model._target_`` names whose forward maps tokens ``[B, S]`` to ``(logits [B, S, V], routing results
    per MoE layer)``: ours (``moe.nn.model.MoETransformer``) or a wrapped Hugging Face model (``moe.hf``).

    What is measured is the data's business: ``metrics`` is the data module's ``moe.data.Metrics``
    (``dm.metrics()``: exact match per task, or bits per byte per file group). Without it, the task data's
    (``moe.data.metrics.TaskMetrics`` over ``task_names`` / ``eval_tasks`` / ``train_tasks``).
    """

    def __init__(
        self,
        model: ModelConfig,
        router: RouterConfig,
        optim: OptimConfig,
        max_steps: int,
        metrics: nn.Module | None = None,
        eval_tasks: list[str] | None = None,
        train_tasks: list[str] | None = None,
        task_names: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            {"model": asdict(model), "router": asdict(router), "optim": asdict(optim), "max_steps": max_steps}
        )
        self.model = build_model(model, router)
        for m in self.model.modules():  # non-finite router logits: raised once per step, not one sync per layer
            if isinstance(m, Router):
                m.defer_checks = True
        self.router_cfg, self.optim_cfg, self.max_steps = router, optim, max_steps
        if metrics is None:
            names = list(task_names or ALL_TASKS)
            metrics = TaskMetrics(names, list(eval_tasks or names), train_tasks)
        self.val_metrics = metrics

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    def _step(self, batch):
        tokens, mask = batch["tokens"], batch["target_mask"]
        logits, routings = self.model(tokens[:, :-1])
        nll_BS, correct_B = next_token_nll(logits, tokens, mask)
        return nll_BS, correct_B, routings

    def training_step(self, batch, batch_idx):
        nll_BS, correct_B, routings = self._step(batch)
        raise_router_faults([r.aux.faults for r in routings if r.aux.faults is not None])  # one sync for all layers
        ce = per_example_loss(nll_BS, batch["target_mask"]).mean()
        loss = ce + router_loss(routings, self.router_cfg.aux_loss_coef, self.router_cfg.z_loss_coef).to(ce)
        quality = self.val_metrics.train_values(batch, nll_BS, correct_B)
        self.log_dict({"train/loss": loss, "train/ce": ce, **quality}, prog_bar=True,
                      batch_size=batch["tokens"].shape[0])  # fmt: skip
        return loss

    def validation_step(self, batch, batch_idx):
        nll_BS, correct_B, _ = self._step(batch)
        self.val_metrics.update(batch, nll_BS, correct_B)

    def on_validation_epoch_end(self):
        # torchmetrics has already summed the metrics over ranks; sync_dist averages equal values (no-op)
        values = self.val_metrics.compute()
        shown = set(self.val_metrics.prog_bar)
        if values:
            self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=True)
            self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def _optim_impl(self) -> str:
        """``optim.impl``; "auto" is not "fused" under mixed precision: Lightning's AMP plugin clips gradients
        itself, which a fused AdamW (unscaling inside its step) does not allow."""
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        return "foreach" if self.optim_cfg.impl == "auto" and mixed else self.optim_cfg.impl

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]  # frozen ones (a LoRA base) are not optimized
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            ],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            **adamw_impl(self._optim_impl(), params),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, cfg.warmup_steps, self.max_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
