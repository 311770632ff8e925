"""Per-example target loss and exact match (the training loss of ``moe.train.module``); the per-task evaluation
lives with the task data (``moe.data.metrics``) and is re-exported here."""

from __future__ import annotations

import torch

from moe.data.metrics import evaluate_tasks, next_token_nll, per_example_loss, task_metrics

__all__ = ["evaluate_tasks", "next_token_nll", "per_example_loss", "target_loss_and_correct", "task_metrics"]


def target_loss_and_correct(
    logits_BSV: torch.Tensor, tokens_BL: torch.Tensor, target_mask_BL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy ``[B]`` (mean over that example's target tokens) and exact match ``[B]``
    (``moe.data.metrics.next_token_nll``, ``per_example_loss``)."""
    nll_BS, correct_B = next_token_nll(logits_BSV, tokens_BL, target_mask_BL)
    return per_example_loss(nll_BS, target_mask_BL), correct_B
