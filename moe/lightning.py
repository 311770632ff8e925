"""LightningModule for the MoE transformer: target-token loss + router losses, per-task accuracy, routing stats."""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from moe.config import ModelConfig, OptimConfig, RouterConfig
from moe.data import ALL_TASKS
from moe.evaluate import target_loss_and_correct
from moe.model import MoETransformer
from moe.stats import routing_stats


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MoELitModule(L.LightningModule):
    def __init__(
        self,
        model: ModelConfig,
        router: RouterConfig,
        optim: OptimConfig,
        max_steps: int,
        eval_tasks: list[str] | None = None,
        log_expert_fractions: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(
            {"model": asdict(model), "router": asdict(router), "optim": asdict(optim), "max_steps": max_steps}
        )
        self.model = MoETransformer(model, router)
        self.router_cfg, self.optim_cfg, self.max_steps = router, optim, max_steps
        self.eval_tasks = list(eval_tasks or ALL_TASKS)
        self.log_expert_fractions = log_expert_fractions
        self.val_acc = nn.ModuleDict({t: MeanMetric() for t in self.eval_tasks})
        self.val_loss = MeanMetric()

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    def _step(self, batch):
        tokens, mask = batch["tokens"], batch["target_mask"]
        logits, routings = self.model(tokens[:, :-1])
        loss_B, correct_B = target_loss_and_correct(logits, tokens, mask)
        return loss_B.mean(), correct_B, routings

    def training_step(self, batch, batch_idx):
        ce, correct, routings = self._step(batch)
        aux = torch.stack([r.aux_loss for r in routings]).sum()
        z = torch.stack([r.z_loss for r in routings]).sum()
        extra = sum((v for r in routings for v in r.extra_losses.values()), torch.zeros((), device=ce.device))
        loss = ce + self.router_cfg.aux_loss_coef * aux + self.router_cfg.z_loss_coef * z + extra
        bs = batch["tokens"].shape[0]
        self.log_dict(
            {"train/loss": loss, "train/ce": ce, "train/exact_match": correct.float().mean()},
            prog_bar=True,
            batch_size=bs,
        )
        if self.global_step % self.trainer.log_every_n_steps == 0:
            stats = {}
            for i, r in enumerate(routings):
                stats.update(routing_stats(r, f"moe/layer{i}", per_expert=self.log_expert_fractions))
            self.log_dict(stats, batch_size=bs)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        for m in self.model.modules():
            if hasattr(m, "anneal"):  # Gumbel routers: temperature schedule by optimizer step
                m.anneal(self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for m in self.model.modules():
            if hasattr(m, "update_bias"):  # auxiliary-loss-free bias: sign rule after the optimizer step
                m.update_bias()

    def validation_step(self, batch, batch_idx):
        ce, correct, _ = self._step(batch)
        self.val_loss.update(ce, weight=batch["tokens"].shape[0])
        for t in self.eval_tasks:
            sel = batch["task_id"] == ALL_TASKS.index(t)
            if sel.any():
                self.val_acc[t].update(correct[sel].float())

    def on_validation_epoch_end(self):
        accs = {f"val/acc/{t}": m.compute() for t, m in self.val_acc.items() if m.update_called}
        if not accs:  # e.g. a sanity check that saw no full task
            return
        # torchmetrics has already summed the metrics over ranks; sync_dist averages equal values (no-op)
        self.log_dict(accs, sync_dist=True)
        self.log("val/mean_accuracy", torch.stack(list(accs.values())).mean(), prog_bar=True, sync_dist=True)
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        for m in [*self.val_acc.values(), self.val_loss]:
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
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, cfg.warmup_steps, self.max_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
