"""Every router and MoE-layer option trains through the real entry point (Hydra compose -> moe.train.run.run)."""

import csv

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe.config import register_configs
from moe.train.run import run

from .conftest import CONF

register_configs()
pytestmark = pytest.mark.slow

# router=from_model reads a Hugging Face checkpoint's routing: it trains in tests/test_hf_train.py (model=hf)
ROUTERS = sorted(p.stem for p in (CONF / "router").glob("*.yaml") if p.stem != "from_model")
MOE_KINDS = sorted(p.stem for p in (CONF / "model" / "moe").glob("*.yaml"))
QUICK = ["model=tiny", "model.num_experts=4", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=12",
         "trainer.val_check_interval=12", "trainer.log_every_n_steps=1", "data.train_per_task=64",
         "data.val_per_task=8", "data.batch_size=32", "optim.lr=0.01", "optim.warmup_steps=1"]  # fmt: skip


def train(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[*QUICK, f"output_dir={tmp_path}", *overrides]))
    results = run(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    ce = [float(r["train/ce"]) for r in rows if r.get("train/ce")]
    return results, ce, rows


def check_learns(ce):
    # 12 steps at lr 1e-2 on a fixed data stream: the target loss must fall clearly below where it started.
    assert len(ce) == 12
    assert sum(ce[-3:]) / 3 < 0.85 * sum(ce[:3]) / 3, ce


@pytest.mark.parametrize("router", ROUTERS)
def test_router_option_trains(tmp_path, router):
    extra = ["router.expert_choice.allow_noncausal=true"] if router == "expert_choice" else []
    results, ce, rows = train(tmp_path, [f"router={router}", *extra])
    check_learns(ce)
    assert set(results["tasks"]) == {"copy", "reverse", "sort", "add", "lookup", "count"}
    assert any(r.get("routing/train/layer0/entropy") for r in rows)


@pytest.mark.parametrize("moe", [m for m in MOE_KINDS if m != "soft"])
def test_moe_layer_option_trains(tmp_path, moe):
    _, ce, rows = train(tmp_path, [f"model/moe={moe}"])
    check_learns(ce)
    if moe == "capacity":
        assert any(r.get("routing/train/layer0/dropped_frac") for r in rows)


def test_refused_options_say_why(tmp_path):
    with pytest.raises(ValueError, match="future tokens"):
        train(tmp_path / "soft", ["model/moe=soft"])
    with pytest.raises(ValueError, match="allow_noncausal"):
        train(tmp_path / "ec", ["router=expert_choice"])


def test_optimizer_impls_train_alike(tmp_path):
    """``optim.impl``: the fused AdamW ("auto" on the CPU) and torch's per-tensor loop are the same update, so the
    same run's losses agree to rounding; "auto" resolves to fused for CPU float parameters only."""
    import torch

    from moe.train.module import adamw_impl

    assert adamw_impl("auto", [torch.zeros(2)]) == {"fused": True}
    assert adamw_impl("auto", [torch.zeros(2, device="meta")]) == {}
    assert adamw_impl("for_loop", [torch.zeros(2)]) == {"foreach": False}
    _, ce_fused, _ = train(tmp_path / "fused", ["optim.impl=auto"])
    _, ce_loop, _ = train(tmp_path / "loop", ["optim.impl=for_loop"])
    check_learns(ce_fused)
    assert ce_fused == pytest.approx(ce_loop, rel=1e-4)
