"""Next-token loss and exact-match accuracy on target tokens, and per-task evaluation of a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.data.tasks import ALL_TASKS, TaskSplit


def target_loss_and_correct(
    logits_BSV: torch.Tensor, tokens_BL: torch.Tensor, target_mask_BL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy ``[B]`` (mean over that example's target tokens) and exact match ``[B]``.

    The training loss is the mean of the first over the batch: averaging per example first gives every example
    the same weight whatever its target length, so the one-token tasks (lookup, count) are not drowned by the
    eight-token ones. The model saw ``tokens[:, :-1]``; position s predicts ``tokens[:, s+1]``. Teacher-forced
    exact match equals greedy-decoding exact match: if every target token is right given the true prefix,
    greedy decoding reproduces that prefix.
    """
    labels_BS, mask_BS = tokens_BL[:, 1:], target_mask_BL[:, 1:]
    ce_BS = F.cross_entropy(logits_BSV.float().transpose(1, 2), labels_BS, reduction="none") * mask_BS
    loss_B = ce_BS.sum(1) / mask_BS.sum(1).clamp_min(1)
    wrong_BS = (logits_BSV.argmax(-1) != labels_BS) & mask_BS
    return loss_B, ~wrong_BS.any(dim=1)


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
        logits, _ = model(tokens[:, :-1])
        loss_B, ok_B = target_loss_and_correct(logits, tokens, mask)
        correct.index_add_(0, task, ok_B.float().cpu())
        loss_sum.index_add_(0, task, loss_B.cpu())
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
