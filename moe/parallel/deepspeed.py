"""Expert parallelism under DeepSpeed ZeRO-1/2 (and Lightning's DeepSpeedStrategy), applied from outside the model.

DeepSpeed 0.19 treats a model as MoE only if some module is a ``deepspeed.moe.layer.MoE``; only then does ZeRO
reduce expert gradients over the expert-data-parallel (EDP) groups (tagging the parameters is not enough: the
first backward fails in ``stage_1_and_2.py::average_tensor``). ``deepspeed_expert_parallel(model, ep_size)``:

1. creates DeepSpeed's EP/EDP groups (``deepspeed.utils.groups._create_expert_and_data_parallel``, the layout of
   ``moe.parallel.all_to_all``) and shards every sparse ``MoELayer`` on them (``moe.parallel.expert_parallel``);
2. attaches to each sharded layer, as ``layer.ds_bridge``, a ``DeepSpeedMoEBridge``: a ``MoE`` subclass that owns
   no parameters and answers what the engine reads (``num_experts``, ``num_local_experts``, ``ep_size``,
   ``expert_group_name``, ``set_deepspeed_parallelism``, and ``state_dict()`` / ``_load_from_state_dict`` in
   DeepSpeed's per-expert key format, so checkpoints get ``layer_{i}_expert_{j}_*`` files with every expert).

Optimizer groups (``moe_param_groups``, or ``split_optimizer`` on an optimizer made elsewhere) are split with
DeepSpeed's helper and named uniquely (``decay``, ``no_decay``, ``decay/experts_ep_size_2``): DeepSpeed gives every
expert group the name ``ep_size_N`` (#4448), which breaks per-group LR monitoring. ZeRO-1/2 looks a MoE group's
EDP group up by the group's name (``stage_1_and_2.py``: ``expert_dp_process_group[group['name']]``), so each unique
name is registered as an alias of ``ep_size_N`` in DeepSpeed's EDP group table.

``ep_size=1`` shards nothing (whole experts, reduced like dense weights; no bridge) and only makes the routers'
counts global. ZeRO-3 refuses ``MoE`` modules ("Native DeepSpeed MoE is not supported with ZeRO Stage 3"): there
only ``ep_size=1`` is accepted, and ``MoELayer`` is made a ZeRO-3 leaf module (``set_z3_leaf_modules``), so a rank
whose experts get no tokens does not hang the parameter gathering.

Gradient norm: DeepSpeed had EP bugs (#5259 bf16, #8475 fp32). With deepspeed 0.19.8, fp32 ZeRO-2, EP=2 on 2 gloo
ranks, ``engine.get_global_grad_norm()`` is the single-process norm of the whole model (1.2422525 vs 1.2422525,
1.9972292 vs 1.9972289; counting only a rank's own experts would give 1.2390/1.2396) and clipping matches
``clip_grad_norm_`` (tests/test_deepspeed_ep.py), so nothing is patched. bf16 ZeRO-1/2 gives 1.2489 and 2.0168 on
both ranks (bf16 rounding; not tested).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from deepspeed import comm as ds_comm
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import set_z3_leaf_modules
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from moe.nn.layers import MoELayer
from moe.parallel import EXPERT_WEIGHTS, expert_parallel, gather_state_dict, sharded_layers
from moe.parallel.comm import groups_from
from moe.parallel.ds_checkpoint import BRIDGE, DS_EXPERTS, convert_deepspeed_checkpoint

__all__ = [
    "DeepSpeedMoEBridge",
    "ExpertParallelDeepSpeedStrategy",
    "convert_deepspeed_checkpoint",
    "deepspeed_expert_parallel",
    "moe_param_groups",
    "split_moe_groups",
    "split_optimizer",
]

class DeepSpeedMoEBridge(MoE):
    """What DeepSpeed's engine sees of one sharded ``MoELayer``. Owns no parameters and is never run.

    ``state_dict()`` called on the bridge itself (as ``engine._save_moe_checkpoint`` does) returns this rank's
    experts one by one, ``deepspeed_moe.experts.deepspeed_experts.<local j>.<w>`` -> ``w[j]``; nested inside the
    model's ``state_dict()`` it adds nothing, so the model's names stay those of the unsharded model.
    """

    def __init__(self, layer: MoELayer):
        nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own gate and experts
        g = layer.ep_groups
        self.num_experts, self.ep_size, self.num_local_experts = layer.num_experts, g.ep_size, layer.experts.num_experts
        self.expert_group_name = g.group_name
        self.use_residual = self.enable_expert_tensor_parallelism = False
        self.__dict__["_layer"] = layer  # a plain reference: the layer owns the bridge, not the other way round

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; the groups already exist (the experts were sharded on them)."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_: the experts were sharded on the E + D layout")
        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"DeepSpeed group {self.expert_group_name} is gone; call deepspeed_expert_parallel")

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEBridge only describes its MoELayer to DeepSpeed; run the layer itself")

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if args or destination is not None:  # nested in the model's state_dict
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        weights = {w: getattr(self._layer.experts, w) for w in EXPERT_WEIGHTS}
        if not keep_vars:
            weights = {w: t.detach() for w, t in weights.items()}
        return {
            f"{prefix}{DS_EXPERTS}.{j}.{w}": t[j] for j in range(self.num_local_experts) for w, t in weights.items()
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # engine.load_checkpoint adds the per-expert entries (local ids) to the module state: copy them into this
        # rank's shard (the bridge is the layer's last child, so this runs after the shard's own key is loaded)
        experts = self._layer.experts
        with torch.no_grad():
            for j in range(self.num_local_experts):
                for w in EXPERT_WEIGHTS:
                    key = f"{prefix}{DS_EXPERTS}.{j}.{w}"
                    if key in state_dict:
                        getattr(experts, w)[j].copy_(state_dict[key])


def deepspeed_expert_parallel(model: nn.Module, ep_size: int, zero_stage: int = 2) -> nn.Module:
    """Shard ``model``'s sparse MoE layers over DeepSpeed's EP groups and bridge them; in place, returns ``model``.

    Call after ``deepspeed.init_distributed`` and before any optimizer is built, on every rank. Idempotent for the
    same ``ep_size``. Refused: ``ep_size > 1`` with ZeRO-3; a model already sharded at another ``ep_size``.
    """
    if not ds_comm.is_initialized():
        raise RuntimeError("deepspeed_expert_parallel: call deepspeed.init_distributed first")
    _check_stage(ep_size, zero_stage)
    if zero_stage == 3:
        set_z3_leaf_modules(model, [MoELayer])
    done = sharded_layers(model)
    if done:
        if any(m.ep_groups.ep_size != ep_size for _, m in done):
            raise ValueError(f"parallel.ep_size={ep_size}: the model is already sharded at another EP size")
        return model
    name = f"ep_size_{ep_size}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep_size)  # a collective: every rank, same order
    groups = groups_from(ep_size, ds_groups._get_expert_parallel_group(name),
                         ds_groups._get_expert_data_parallel_group(name))  # fmt: skip
    expert_parallel(model, ep_size, groups=groups)
    for _, layer in sharded_layers(model):
        setattr(layer, BRIDGE, DeepSpeedMoEBridge(layer))
    return model


def _check_stage(ep_size: int, zero_stage: int) -> None:
    if ep_size > 1 and zero_stage == 3:
        raise ValueError(f"parallel.ep_size={ep_size}: DeepSpeed refuses MoE layers under ZeRO-3; use stage 1 or 2")


def split_moe_groups(param_groups: list[dict]) -> tuple[list[dict], list[int]]:
    """Split optimizer param groups into dense and expert groups (DeepSpeed's helper), uniquely named.

    A group keeps its ``name`` (default ``group{i}``); its expert parameters move to a group with the same
    hyperparameters, ``moe: True`` and the name ``<name>/experts_ep_size_N``. Empty groups are dropped. Returns the
    new groups and, for each, the index of the group it came from. Needs ``deepspeed_expert_parallel`` first.
    """
    groups = [{**g, "name": g.get("name", f"group{i}"), "_origin": i} for i, g in enumerate(param_groups)]
    if len({g["name"] for g in groups}) != len(groups):
        raise ValueError(f"param groups: names {[g['name'] for g in groups]} are not unique")
    split = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    edp = ds_groups._get_expert_data_parallel_group_dict()
    edp_ranks = ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS
    chunks: dict[str, int] = {}  # DeepSpeed cuts an expert group above ~179M parameters into several
    for g in split:
        if g.get("moe"):
            ep_name = g["name"]  # DeepSpeed names the expert group after the parameters' group_name
            if ep_name not in edp:
                raise RuntimeError(f"{ep_name}: no DeepSpeed expert group; call deepspeed_expert_parallel first")
            base = f"{groups[g['_origin']]['name']}/experts_{ep_name}"
            chunks[base] = chunks.get(base, -1) + 1
            g["name"] = f"{base}/{chunks[base]}" if chunks[base] else base
            edp[g["name"]], edp_ranks[g["name"]] = edp[ep_name], edp_ranks[ep_name]  # ZeRO looks up by name
    origin = [g.pop("_origin") for g in split]
    return split, origin


def moe_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups of ``model``'s trainable parameters: ``decay`` (dim >= 2) / ``no_decay`` (weight_decay 0),
    each split into dense and expert groups (``split_moe_groups``), e.g. ``decay``, ``no_decay``,
    ``decay/experts_ep_size_2`` (experts are ``[E/ep, d, f]``: they decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return split_moe_groups(groups)[0]


# LR scheduler attributes holding one entry per param group (torch.optim.lr_scheduler)
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs")


def split_optimizer(optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """``split_moe_groups`` applied in place to an optimizer that has not stepped yet, and its scheduler's
    per-group lists (``base_lrs``, ``lr_lambdas``, ...) remapped so every new group keeps its origin's schedule."""
    if any(g.get("moe") for g in optimizer.param_groups):
        return
    if optimizer.state:
        raise ValueError("split_optimizer: the optimizer has already stepped; split its groups before training")
    n = len(optimizer.param_groups)
    new, origin = split_moe_groups(optimizer.param_groups)
    optimizer.param_groups[:] = new
    for s in [scheduler, *getattr(scheduler, "_schedulers", [])] if scheduler is not None else []:
        for attr in _PER_GROUP:
            values = getattr(s, attr, None)
            if isinstance(values, list) and len(values) == n:
                setattr(s, attr, [values[i] for i in origin])


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU communication backend from JIT-compiling its shared-memory all-reduce op.

    ``deepspeed.comm.torch.TorchBackend`` builds ``deepspeed_shm_comm`` in ``init_distributed`` whenever DeepSpeed's
    op table (``deepspeed.ops.__compatible_ops__``) says it can: a C++ build of about a minute on 2 idle cores, more
    under load, whose lock file, if the build is killed, makes every later start wait on it without a word. The op
    serves ``inference_all_reduce`` only; training's collectives go through torch.distributed (gloo) either way.
    Marking it incompatible in that table is how DeepSpeed skips it on machines that cannot build it.
    """
    import deepspeed.ops

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the table's first read probes each op with a compiler, logging every command
    try:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    finally:
        logging.disable(previous)


STALE_LOCK_S = 900  # a JIT op build takes about a minute on 2 idle cores: a lock this old is left by a killed one


def stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Lock files in torch's JIT extension cache (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``)
    older than ``max_age_s``. torch's build waits on such a lock forever, silently: a build killed midway (a
    Ctrl-C during DeepSpeed's op build) leaves one behind, and every later build of that op hangs."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    return sorted(p for p in root.rglob("lock") if p.is_file() and now - p.stat().st_mtime > max_age_s)


def warn_stale_extension_locks() -> None:
    """Say which op builds would hang, and how to clear them, before DeepSpeed may start one."""
    for lock in stale_extension_locks():
        rank_zero_warn(f"{lock}: a lock left by an interrupted build of the '{lock.parent.name}' op; a build of "
                       f"that op waits on it forever. If no build is running, remove it: rm {lock}")  # fmt: skip


def use_cpu_accelerator() -> None:
    """Make DeepSpeed run on the CPU (what ``DS_ACCELERATOR=cpu`` does at import) when it picked a GPU, without the
    ``deepspeed_shm_comm`` build (``skip_shm_comm_op``)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    skip_shm_comm_op()


class ExpertParallelDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (ZeRO-1/2/3) with expert parallelism over ``ep_size`` ranks, on GPUs or on the
    CPU (``trainer.accelerator=cpu``: gloo, DeepSpeed's CPU accelerator, fp32 or bf16).

    At ``setup`` (after the process groups exist, before ``configure_optimizers`` runs) the LightningModule's MoE
    layers are sharded and bridged (``deepspeed_expert_parallel``); the optimizer from ``configure_optimizers`` is
    then split into uniquely named dense / expert groups, its LR scheduler following (``split_optimizer``).
    What Lightning's class hard-wires to CUDA is lifted on the CPU: its accelerator check (``setup_environment``),
    the device-index check (CPU devices have none), and ``device_rank`` for ``deepspeed.initialize`` (the local
    rank instead of the CPU's ``None``). ``timeout`` (seconds, or a ``timedelta``) bounds every collective: a rank
    that dies makes the others fail after it instead of waiting forever. Refused before any work: ``ep_size < 1``,
    ``ep_size > 1`` with ZeRO-3, fp16 on the CPU.
    """

    strategy_name = "deepspeed_ep"

    def __init__(self, ep_size: int = 1, timeout: float | timedelta | None = None, **kwargs):
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"parallel.ep_size={ep_size!r}: expected an int >= 1")
        if timeout is not None:
            kwargs["timeout"] = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        super().__init__(**kwargs)
        self.ep_size = ep_size
        _check_stage(ep_size, self._zero_stage())

    def _zero_stage(self) -> int:
        return (self.config.get("zero_optimization") or {}).get("stage", 0)

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        warn_stale_extension_locks()
        if not self.on_cpu:
            return super().setup_environment()  # Lightning's: CUDA only
        if str(self.precision_plugin.precision) == "16-mixed":
            raise ValueError("trainer=deepspeed on the CPU: trainer.precision=16-mixed is not supported; use 32-true "
                             "or bf16-mixed")  # fmt: skip
        use_cpu_accelerator()
        DDPStrategy.setup_environment(self)  # what Lightning's DeepSpeedStrategy does past its CUDA check

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        reset_seed()  # Lightning's, without _validate_device_index_selection: CPU devices have no index
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def setup(self, trainer) -> None:
        deepspeed_expert_parallel(self.lightning_module, self.ep_size, zero_stage=self._zero_stage())
        super().setup(trainer)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """``deepspeed.initialize`` as Lightning calls it, with ``device_rank`` the local rank on the CPU (Lightning
        passes the device index, None there, which the engine compares with 0)."""
        if not self.on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )  # fmt: skip
        return engine, ds_optimizer

    def lightning_module_state_dict(self) -> dict:
        """The module's state with every expert gathered (a collective over the EP groups): what the run's
        ``export/`` is written from. DeepSpeed's own checkpoints are saved by the engine, per expert."""
        return gather_state_dict(self.lightning_module, super().lightning_module_state_dict())

    def _init_optimizers(self):
        optimizer, scheduler_config = super()._init_optimizers()
        if sharded_layers(self.lightning_module):
            split_optimizer(optimizer, scheduler_config.scheduler if scheduler_config is not None else None)
        return optimizer, scheduler_config


if __name__ == "__main__":
    from moe.parallel.ds_checkpoint import main

    main()
