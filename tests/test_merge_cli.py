"""The merge CLI's model-agnostic core: merging imports nothing from moe (the adapter node plugs the model in),
Lightning ``.ckpt`` inputs evaluate, and the data-aware methods (DivMerge, PLeaS) run from ``python -m merging``."""

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from merging.__main__ import evaluate_merge, run
from merging.config import register_configs
from moe.adapters.moe_adapter import load_any
from moe.config import DataConfig, ModelConfig, OptimConfig, RouterConfig
from moe.data.tasks import Vocab, max_example_len
from moe.export import export_model, load_checkpoint
from moe.nn.model import MoETransformer
from moe.train.module import MoELitModule

from .conftest import CONF, ROOT

register_configs()
DATA = ["data.train_per_task=16", "data.val_per_task=4"]
TINY = DataConfig(train_per_task=16, val_per_task=4)
MODEL = ModelConfig(vocab_size=Vocab(TINY.num_symbols).size, max_seq_len=max_example_len(TINY) - 1, d_model=16,
                    n_layer=1, n_head=2, num_experts=2, d_ff=8)  # fmt: skip


def _models(n: int = 2) -> list[MoETransformer]:
    torch.manual_seed(0)
    base = MoETransformer(MODEL, RouterConfig(k=1))
    fts = []
    for _ in range(n):
        ft = MoETransformer(MODEL, RouterConfig(k=1))
        ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        fts.append(ft)
    return [base, *fts]


def _cli(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("merge", overrides=[*overrides, *DATA, "progress=false"]))
    return cfg, run(cfg)


def test_merging_imports_nothing_from_moe():
    code = "import merging, merging.__main__, merging.evaluate, merging.search, merging.assemble, sys\n"
    code += "assert not [m for m in sys.modules if m == 'moe' or m.startswith('moe.')], sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_merge_and_evaluate_lightning_checkpoints(tmp_path):
    """The nested ``model.moe`` config of a ``.ckpt``'s hyper-parameters is rebuilt (it was left a dict)."""
    paths = []
    for i, model in enumerate(_models()):
        lit = MoELitModule(MODEL, RouterConfig(k=1), OptimConfig(), max_steps=1)
        lit.model.load_state_dict(model.state_dict())
        paths.append(tmp_path / f"m{i}.ckpt")
        torch.save({"state_dict": lit.state_dict(), "hyper_parameters": dict(lit.hparams)}, paths[-1])
    assert load_any(paths[0]).cfg.moe == MODEL.moe
    assert load_checkpoint(paths[0]).model == MODEL
    cfg, out = _cli([f"base={paths[0]}", f"models=[{paths[1]},{paths[2]}]", f"out={tmp_path / 'out'}", "eval=true",
                     "tasks=[copy,sort]"])  # fmt: skip
    scores = evaluate_merge(cfg)
    assert set(scores) == {"merged", "base", "model0", "model1"} and len(scores["merged"]) == 6


def test_divmerge_from_the_cli(tmp_path):
    dirs = [tmp_path / name for name in ("base", "ft0", "ft1")]
    for model, d in zip(_models(), dirs):
        export_model(model, d)
    cfg, out = _cli(["method=divmerge", f"base={dirs[0]}", f"models=[{dirs[1]},{dirs[2]}]", "tasks=[copy,sort]",
                     f"out={tmp_path / 'out'}", "method.params.epochs=1"])  # fmt: skip
    assert load_any(out.parent).cfg == MODEL
    assert set(evaluate_merge(cfg)) == {"merged", "base", "model0", "model1"}
    with pytest.raises(ValueError, match="tasks"):
        _cli(["method=divmerge", f"base={dirs[0]}", f"models=[{dirs[1]},{dirs[2]}]", f"out={tmp_path / 'x'}"])


def test_pleas_from_the_cli(tmp_path):
    dirs = [tmp_path / name for name in ("ft0", "ft1", "ft2")]
    for model, d in zip(_models(), dirs):
        export_model(model, d)
    cfg, out = _cli(["method=pleas", f"models=[{dirs[0]},{dirs[1]}]", f"out={tmp_path / 'out'}",
                     "method.params.max_batches=2"])  # fmt: skip
    merged = load_any(out.parent)
    assert merged.blocks[0].moe.experts.w_gate.shape[-1] == MODEL.d_ff + round(0.5 * MODEL.d_ff)  # widened
    assert set(evaluate_merge(cfg)) == {"merged", "model0", "model1"}  # no base
    with pytest.raises(ValueError, match="models"):
        _cli(["method=pleas", f"models=[{dirs[0]},{dirs[1]},{dirs[2]}]", f"out={tmp_path / 'x'}"])


def test_search_and_router_stats_from_the_cli(tmp_path):
    """search=true and assemble.router_init=stats reach the task data through the adapter node."""
    dirs = [tmp_path / name for name in ("base", "ft0", "ft1")]
    for model, d in zip(_models(), dirs):
        export_model(model, d)
    common = [f"base={dirs[0]}", f"models=[{dirs[1]},{dirs[2]}]", "tasks=[copy,sort]"]
    cfg, out = _cli([*common, "method=pcb", "search=true", f"out={tmp_path / 'pcb'}"])
    assert out.is_file()
    cfg, out = _cli([*common, "assemble.enabled=true", "assemble.router_init=stats", f"out={tmp_path / 'moe'}"])
    assert load_any(out.parent).cfg.num_experts == 4
