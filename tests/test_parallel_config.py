"""Parallel setups refused before any work, the rank layout, and which modules may import torch.distributed."""

import ast
from pathlib import Path

import pytest

from moe.config import TrainConfig
from moe.parallel import layout
from moe.train.checks import check_parallel
from tests.test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_parallel_comm_modules_import_torch_distributed_and_model_files_never_deepspeed():
    importers, deepspeed = [], []
    for path in sorted((ROOT / "moe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            rel = str(path.relative_to(ROOT))
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                importers.append(rel)
            if any(n.split(".")[0] == "deepspeed" for n in names):
                deepspeed.append(rel)
    assert sorted(set(importers)) == ["moe/parallel/all_to_all.py", "moe/parallel/comm.py"]
    assert all(p.startswith("moe/parallel/") for p in deepspeed), deepspeed


def test_deepspeed_asked_for_gpus_on_a_cpu_only_machine_points_to_the_cpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg: TrainConfig = compose_train(["trainer=deepspeed", "trainer.accelerator=gpu", "parallel.ep_size=2"])
    with pytest.raises(ValueError, match=r"accelerator=gpu: no CUDA GPU is visible.*trainer\.accelerator=cpu"):
        check_parallel(cfg)
    check_parallel(compose_train(["trainer=deepspeed", "parallel.ep_size=2"]))  # accelerator=auto: the CPU here
    check_parallel(compose_train(["trainer=deepspeed", "trainer.accelerator=cpu", "parallel.ep_size=2"]))


def test_expert_parallel_without_a_distributed_strategy_is_refused():
    with pytest.raises(ValueError, match=r"parallel.ep_size=2 needs an expert-parallel strategy.*trainer=ddp"):
        check_parallel(compose_train(["parallel.ep_size=2"]))
    check_parallel(compose_train(["trainer=ddp", "parallel.ep_size=2"]))  # accepted


def test_layout_matches_deepspeeds_groups_world_8_ep_4():
    rows = layout(8, 4)
    assert rows[5] == {"rank": 5, "ep_group": [4, 5, 6, 7], "ep_rank": 1, "edp_group": [1, 5], "experts": 1}
    assert [r["ep_group"] for r in rows[:4]] == [[0, 1, 2, 3]] * 4
    assert rows[0]["edp_group"] == [0, 4]
    with pytest.raises(ValueError, match="divisor"):
        layout(6, 4)


def test_slurm_launcher_follows_the_trainer_shape():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    overrides = ["output_dir=/tmp/x", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                 "trainer.devices=4", "parallel.ep_size=4"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
