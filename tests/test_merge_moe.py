"""MoE-aware merging of our MoETransformer exports, and assembling an MoE from dense (1-expert) fine-tunes."""

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from merging import merge
from merging.assemble import assemble, router_statistics
from merging.search import GRID, search_lambdas
from moe.adapters.moe_adapter import MoEAdapter, search_split
from moe.config import DataConfig, ModelConfig, RouterConfig, register_configs
from moe.data.tasks import ALL_TASKS, build_splits
from moe.export import export_model, load_model
from moe.nn.model import MoETransformer

from .conftest import CONF

register_configs()
DATA = DataConfig(train_per_task=64, val_per_task=16)


def make_models(tmp_path, experts: int, n: int):
    vocab = 4 + len(ALL_TASKS) + 10 + DATA.num_symbols
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=32, d_model=16, n_layer=2, n_head=2, num_experts=experts, d_ff=8)
    torch.manual_seed(0)
    base = MoETransformer(cfg, RouterConfig(k=1))
    export_model(base, tmp_path / "base")
    dirs = []
    for i in range(n):
        ft = MoETransformer(cfg, RouterConfig(k=1))
        ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        export_model(ft, tmp_path / f"ft{i}")
        dirs.append(tmp_path / f"ft{i}")
    return tmp_path / "base", dirs


def test_assemble_dense_finetunes_into_experts(tmp_path):
    base, fts = make_models(tmp_path, experts=1, n=3)
    out = assemble(base, fts, tmp_path / "moe", method="ties", scope="tensor", k=2, progress=False)
    model = load_model(out.parent)
    assert model.cfg.num_experts == 3 and model.router_cfg.k == 2
    got = load_file(out)
    parts = [load_file(f / "model.safetensors") for f in fts]
    for name in ("blocks.0.moe.experts.w_gate", "blocks.1.moe.experts.w_down"):
        assert torch.equal(got[name], torch.cat([p[name] for p in parts]))  # expert t = fine-tune t's FFN
    assert torch.equal(got["blocks.1.moe.router.weight"], torch.zeros(3, 16))
    # per-tensor thresholds: a global scope's population would differ (the experts are not merged here)
    merged = load_file(merge(base, fts, tmp_path / "plain", method="ties", scope="tensor", progress=False))
    for name in ("blocks.0.attn.qkv.weight", "embed.weight", "norm.weight"):
        assert torch.equal(got[name], merged[name])  # the rest is the chosen merge
    with pytest.raises(ValueError, match="tasks"):
        assemble(base, fts, tmp_path / "x", router_init="stats", progress=False)


def test_router_from_statistics_prefers_each_models_tasks(tmp_path):
    base, fts = make_models(tmp_path, experts=1, n=2)
    tasks = ["sort", "add"]
    out = assemble(base, fts, tmp_path / "moe", router_init="stats", tasks=tasks, scale=3.0, data=DATA,
                   adapter=MoEAdapter(), progress=False)  # fmt: skip
    router = load_file(out)["blocks.0.moe.router.weight"]
    # on the mean (non-padding) input of each model's task, measured with the base, that model's expert scores
    # 3 * (1 - 1/2) and the other 3 * (-1/2)
    means = router_statistics(base, tasks, DATA, MoEAdapter())[0]
    torch.testing.assert_close(means @ router.T, torch.tensor([[1.5, -1.5], [-1.5, 1.5]]), atol=1e-4, rtol=1e-4)
    # checked independently: hooks on the base model over the same tokens
    model = load_model(base)
    train, _ = build_splits(replace(DATA, tasks=tasks, eval_tasks=tasks, train_per_task=256, val_per_task=8))
    seen = {}
    model.blocks[0].norm_moe.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    with torch.no_grad():
        model(train.tokens[:, :-1])
    real = train.tokens[:, :-1] != 0
    for e, task in enumerate(tasks):
        rows = (train.task_id == ALL_TASKS.index(task))[:, None] & real
        logits = seen["h"][rows] @ router.T
        assert logits.mean(0).argmax() == e
    with pytest.raises(ValueError, match="router_init"):
        assemble(base, fts, tmp_path / "x", router_init="random", progress=False)


def test_merging_moe_exports_expert_by_expert_keeps_them_loadable(tmp_path):
    base, fts = make_models(tmp_path, experts=4, n=2)
    out = merge(base, fts, tmp_path / "m", method="dare", combine="ties", router_source="0", progress=False)
    model = load_model(out.parent)
    router = load_file(fts[0] / "model.safetensors")["blocks.0.moe.router.weight"]
    assert torch.equal(model.blocks[0].moe.router.weight.detach(), router)
    logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_train_py_trains_the_assembled_router(tmp_path):
    from moe.train.run import run

    base, fts = make_models(tmp_path, experts=1, n=2)
    out = assemble(base, fts, tmp_path / "moe", k=2, progress=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["logger=csv", "trainer.enable_progress_bar=false", "data.train_per_task=64",
                                          "data.val_per_task=16", "data.batch_size=16", "trainer.max_steps=3",
                                          "router.k=2", f"init_from={out.parent}",
                                          f"output_dir={tmp_path / 'train'}"])  # fmt: skip
    run(OmegaConf.to_object(cfg))
    trained = load_file(tmp_path / "train" / "export" / "model.safetensors")
    assert trained["blocks.0.moe.router.weight"].shape == (2, 16)
    assert trained["blocks.0.moe.router.weight"].abs().sum() > 0  # moved away from its zero init


def test_pcb_lambda_search_uses_a_split_disjoint_from_the_reported_one(tmp_path):
    base, fts = make_models(tmp_path, experts=2, n=2)
    _, val = build_splits(DATA)
    split = search_split(DATA, val.tokens)
    reported = {row.numpy().tobytes() for row in val.tokens}
    assert len(split.tokens) > 0 and not any(row.numpy().tobytes() in reported for row in split.tokens)
    lams, best = search_lambdas(base, fts, ["sort", "add"], DATA, MoEAdapter(), rounds=1)
    assert len(lams) == 2 and all(x in GRID for x in lams)
    start, initial = search_lambdas(base, fts, ["sort", "add"], DATA, MoEAdapter(), rounds=0)
    assert start == [1.0, 1.0] and best >= initial  # coordinate ascent never loses ground
