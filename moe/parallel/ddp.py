"""Lightning's DDP with expert parallelism: ``ExpertParallelDDPStrategy(ep_size=P)``.

What it adds to ``lightning.pytorch.strategies.DDPStrategy`` (gloo on the CPU, NCCL on GPUs):

- ``setup`` shards the LightningModule's MoE layers with ``moe.parallel.expert_parallel`` before DDP wraps the
  model and before ``configure_optimizers`` runs (so the optimizer holds the shards), and tells DDP to leave the
  expert parameters out of its all-reduce and its start-up broadcast;
- after the closure's backward, expert gradients are summed over their expert-data-parallel group and divided by
  the world size: the same scaling DDP gives the dense ones (a mean over all ranks' losses);
- gradient clipping by norm (``trainer.gradient_clip_val``) counts every dense parameter once and every expert
  once, over the EP group: the norm of the unsharded model's gradient. The strategy clips itself and sets the
  Trainer's own clipping off;
- checkpoints hold the full experts (gathered on save, cut to this rank's on load, optimizer state included), so a
  checkpoint written at one EP size resumes at any other, or loads in one process.

``ep_size=1`` is plain DDP whose routers count their load over all ranks (global load balancing).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from moe.parallel import (
    expert_parallel,
    gather_state_dict,
    is_expert_param,
    layout,
    shard_state_dict,
    sharded_layers,
)
from moe.parallel.comm import all_gather_dim0, global_grad_norm, make_groups, reduce_expert_grads


class ExpertParallelDDPStrategy(DDPStrategy):
    strategy_name = "ddp_expert_parallel"

    def __init__(self, ep_size: int = 1, **ddp_kwargs: Any):
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"parallel.ep_size={ep_size!r}: expected an int >= 1")
        super().__init__(**ddp_kwargs)
        self.ep_size = ep_size
        self.ep_groups = None
        self._clip_norm: float | None = None
        self.last_grad_norm: torch.Tensor | None = None

    def setup(self, trainer) -> None:
        module = self.lightning_module
        if self.world_size % self.ep_size:
            raise ValueError(
                f"parallel.ep_size={self.ep_size}: must divide the number of processes "
                f"(trainer.devices x trainer.num_nodes = {self.world_size})"
            )
        if self.ep_groups is None:
            self.ep_groups = make_groups(self.ep_size)
            expert_parallel(module, self.ep_size, self.ep_groups)
            names = [n for n, p in module.named_parameters() if is_expert_param(p)]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
            rank_zero_info(describe_layout(self.world_size, self.ep_size))
        if self._expert_params() and trainer.gradient_clip_val:
            if trainer.gradient_clip_algorithm in (None, GradClipAlgorithmType.NORM):  # None means norm
                if str(trainer.precision) == "16-mixed":
                    raise ValueError("expert-parallel gradient clipping: use precision bf16-mixed or 32-true")
                self._clip_norm = float(trainer.gradient_clip_val)
                trainer.gradient_clip_val = None  # clipped here, with the norm of the whole model
        super().setup(trainer)

    def _expert_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lightning_module.parameters() if is_expert_param(p)]

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        experts = self._expert_params()
        if not experts:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_reduce():
            loss = closure()  # forward + backward (DDP has all-reduced the dense gradients)
            reduce_expert_grads(experts, self.ep_groups)
            if self._clip_norm:
                params = [p for p in self.lightning_module.parameters() if p.requires_grad]
                dense = [p for p in params if not is_expert_param(p)]
                self.last_grad_norm = global_grad_norm(dense, experts, self.ep_groups)
                torch.nn.utils.clip_grads_with_norm_(params, self._clip_norm, self.last_grad_norm)
            return loss

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    # ---- checkpoints: full experts on disk, shards in memory ----------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return gather_state_dict(self.lightning_module, super().lightning_module_state_dict())

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        state = checkpoint["state_dict"]
        if sharded_layers(self.lightning_module):
            state = shard_state_dict(self.lightning_module, state)
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        state = {**state, "state": dict(state["state"])}  # state_dict() shares the live per-parameter dicts
        for idx, p in self._indexed_expert_params(optimizer):
            if idx in state["state"]:
                state["state"][idx] = {  # exp_avg, exp_avg_sq, ... gathered; step counts as they are
                    key: all_gather_dim0(t, self.ep_groups.ep_group)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape
                    else t
                    for key, t in state["state"][idx].items()
                }
        return state

    def load_optimizer_state_dict(self, checkpoint) -> None:
        P, i = (self.ep_groups.ep_size, self.ep_groups.ep_rank) if self.ep_groups else (1, 0)
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            for idx, p in self._indexed_expert_params(optimizer):
                L = p.shape[0]
                for key, t in opt_state["state"].get(idx, {}).items():
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == L * P:
                        opt_state["state"][idx][key] = t[i * L : (i + 1) * L].clone()
        super().load_optimizer_state_dict(checkpoint)

    @staticmethod
    def _indexed_expert_params(optimizer) -> list[tuple[int, torch.nn.Parameter]]:
        """(index in ``optimizer.state_dict()``, parameter) of every expert parameter."""
        inner = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        return [(i, p) for i, p in enumerate(params) if is_expert_param(p)]

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn == TrainerFn.FITTING and self._expert_params():
            held = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
            named = self.lightning_module.named_parameters()
            missing = [n for n, p in named if is_expert_param(p) and id(p) not in held]
            if missing:
                raise RuntimeError(
                    f"the optimizer does not hold the sharded expert parameters {missing[:3]}...: build it in "
                    "configure_optimizers from self.parameters(), not before the strategy's setup"
                )


def describe_layout(world_size: int, ep_size: int) -> str:
    """One line per rank: its EP group, its expert slice, its expert-data-parallel group."""
    rows = [
        f"  rank {r['rank']}: EP group {r['ep_group']} (index {r['ep_rank']}, expert slice {r['experts']} of "
        f"{ep_size}), EDP group {r['edp_group']}, DP group: all {world_size} ranks"
        for r in layout(world_size, ep_size)
    ]
    return f"expert parallelism: world {world_size}, ep_size {ep_size}\n" + "\n".join(rows)
