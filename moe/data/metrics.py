"""Next-token loss per position, and what the task data measures: exact match per task (``TaskMetrics`` during
training, ``task_metrics`` / ``evaluate_tasks`` after it). Bits per byte, what text data measures, is in
``moe.data.text``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from moe.data.tasks import ALL_TASKS, TaskSplit


def next_token_nll(
    logits_BSV: torch.Tensor, tokens_BL: torch.Tensor, target_mask_BL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy in nats at each predicted position ``[B, S]`` (0 off the targets) and exact match ``[B]``.

    The model saw ``tokens[:, :-1]`` (``L = S + 1``); position s predicts ``tokens[:, s+1]``, scored where
    ``target_mask[:, s+1]``. Teacher-forced exact match equals greedy-decoding exact match: if every target token
    is right given the true prefix, greedy decoding reproduces that prefix."""
    labels_BS, mask_BS = tokens_BL[:, 1:], target_mask_BL[:, 1:]
    nll_BS = F.cross_entropy(logits_BSV.float().transpose(1, 2), labels_BS, reduction="none") * mask_BS
    wrong_BS = (logits_BSV.argmax(-1) != labels_BS) & mask_BS
    return nll_BS, ~wrong_BS.any(dim=1)


def per_example_loss(nll_BS: torch.Tensor, target_mask_BL: torch.Tensor) -> torch.Tensor:
    """``[B]``: each example's mean loss over its target tokens. The training loss is the mean of this over the
    batch: every example weighs the same whatever its target length, so the one-token tasks (lookup, count) are
    not drowned by the eight-token ones."""
    return nll_BS.sum(1) / target_mask_BL[:, 1:].sum(1).clamp_min(1)


class TaskMetrics(nn.Module):
    """``moe.data.Metrics`` of the task data: ``val/acc/<task>``, ``val/mean_accuracy``,
    ``val/mean_accuracy_trained`` (over the evaluated tasks in ``train_tasks``: what a fine-tune's best checkpoint
    is chosen by) and ``val/loss`` (mean per-example target loss). ``task_names``: what ``task_id`` indexes."""

    prog_bar = ("val/mean_accuracy", "val/loss")

    def __init__(self, task_names: list[str], eval_tasks: list[str], train_tasks: list[str] | None = None):
        super().__init__()
        self.task_names, self.eval_tasks = list(task_names), list(eval_tasks)
        self.trained_tasks = [t for t in self.eval_tasks if t in (train_tasks or self.eval_tasks)] or self.eval_tasks
        self.acc = nn.ModuleDict({t: MeanMetric() for t in self.eval_tasks})
        self.loss = MeanMetric()

    def update(self, batch, nll_BS, correct_B) -> None:
        loss_B = per_example_loss(nll_BS, batch["target_mask"])
        self.loss.update(loss_B.mean(), weight=loss_B.shape[0])
        for t in self.eval_tasks:
            sel = batch["task_id"] == self.task_names.index(t)
            if sel.any():
                self.acc[t].update(correct_B[sel].float())

    def compute(self) -> dict[str, torch.Tensor]:
        per = {t: m.compute() for t, m in self.acc.items() if m.update_called}
        if not per:  # e.g. a sanity check that saw no full task
            return {}
        out = {f"val/acc/{t}": v for t, v in per.items()}
        out["val/mean_accuracy"] = torch.stack(list(per.values())).mean()
        trained = [per[t] for t in self.trained_tasks if t in per]
        if trained:
            out["val/mean_accuracy_trained"] = torch.stack(trained).mean()
        return {**out, "val/loss": self.loss.compute()}

    def reset(self) -> None:
        for m in [*self.acc.values(), self.loss]:
            m.reset()

    def train_values(self, batch, nll_BS, correct_B) -> dict[str, torch.Tensor]:
        return {"train/exact_match": correct_B.float().mean()}


@torch.no_grad()
def task_metrics(model: nn.Module, split: TaskSplit, batch_size: int = 512) -> dict[str, dict[str, float]]:
    """Per task present in ``split``: ``{"accuracy": exact match, "loss": mean per-example target CE}``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(ALL_TASKS)
    correct, loss_sum, total = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for i in range(0, split.tokens.shape[0], batch_size):
        tokens = split.tokens[i : i + batch_size].to(device)
        mask = split.target_mask[i : i + batch_size].to(device)
        task = split.task_id[i : i + batch_size]
        nll_BS, ok_B = next_token_nll(model(tokens[:, :-1])[0], tokens, mask)
        correct.index_add_(0, task, ok_B.float().cpu())
        loss_sum.index_add_(0, task, per_example_loss(nll_BS, mask).cpu())
        total.index_add_(0, task, torch.ones_like(task, dtype=torch.float32))
    model.train(was_training)
    return {
        ALL_TASKS[t]: {"accuracy": (correct[t] / total[t]).item(), "loss": (loss_sum[t] / total[t]).item()}
        for t in range(n)
        if total[t] > 0
    }


def evaluate_tasks(model: nn.Module, split: TaskSplit, batch_size: int = 512) -> dict[str, float]:
    """Exact-match accuracy per task present in ``split``."""
    return {t: m["accuracy"] for t, m in task_metrics(model, split, batch_size).items()}
