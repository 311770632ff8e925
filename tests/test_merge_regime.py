"""The papers'-regime merging benchmark (benchmarks/merge_regime.py) at CI size, and its Optuna sweep on the CLI.

No quality is asserted: the models train for a few steps. What is asserted can fail: the gain share is exactly 1
for a fine-tune and 0 for the base, a one-model merge at lambda 1 keeps the whole gain, the tables hold every
method x N x seed, tuned parameters stay in their search space, and the tuning split is disjoint from training and
from the reported split.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import merge_regime as mr  # noqa: E402

TARGETS = ("email", "json", "xml")
SIZES = [2, 3]
SEEDS = [0]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    work = tmp_path_factory.mktemp("regime")
    try:
        res = mr.run(mr.TINY, TARGETS, SIZES, SEEDS, list(mr.METHODS), work)
    finally:
        torch.set_num_threads(threads)
    return work, res


def test_tuning_split_is_apart_from_training_and_the_reported_split():
    from dataclasses import replace

    from moe.data.pycode import PyCodeDataModule

    cfg = mr.data_cfg(mr.TINY, list(TARGETS), list(TARGETS))
    dm, plain = PyCodeDataModule(cfg), PyCodeDataModule(replace(cfg, tune_fraction=0.0))
    dm.setup()
    plain.setup()
    train, val, tune = ({f.path for f in files} for files in (dm.train_files, dm.val_files, dm.tune_files))
    assert not train & tune and not val & tune and not train & val
    assert val == {f.path for f in plain.val_files}  # the reported split is the usual one
    assert {f.domain for f in dm.tune_files} >= set(TARGETS)
    assert set(dm.tune_split.task_id.tolist()) == set(dm.val_split.task_id.tolist())


def test_gain_share_is_one_for_the_fine_tune_and_zero_for_the_base(bench):
    work, _ = bench
    scorer = mr.Scorer(mr.TINY, TARGETS)
    base = work / "base"
    for task in TARGETS:
        ft = work / f"ft_{task}_s0"
        gap = scorer(base, "val")[task] - scorer(ft, "val")[task]
        assert gap != 0
        assert mr.share(scorer, ft, base, [ft], [task], "val") == 1.0
        assert mr.share(scorer, base, base, [ft], [task], "val") == 0.0
        merged = mr.merge_one("task_arithmetic", base, [ft], [task], {"lam": 1.0}, work / "one", scorer)
        assert mr.share(scorer, merged, base, [ft], [task], "search") == pytest.approx(1.0, abs=1e-3)


def test_tables_hold_every_method_n_and_seed(bench):
    work, res = bench
    assert list(res["defaults"]) == list(mr.METHODS)
    assert set(res["tuned"]) == set(mr.SPACES)
    for key in ("defaults", "tuned"):
        for method, by_n in res[key].items():
            assert sorted(by_n) == SIZES, method
            assert all(len(v) == len(SEEDS) and all(math.isfinite(x) for x in v) for v in by_n.values()), method
        lines = mr.table(res, key, SIZES).splitlines()
        assert len(lines) == 2 + len(res[key]) and all(line.count("|") == len(SIZES) + 2 for line in lines)
    for name, best in res["params"].items():
        space = mr.SPACES[name.split("/")[0]]
        assert set(best) == set(space) and all(space[k][0] <= v <= space[k][1] for k, v in best.items()), name
    assert all(len(res["subsets"][f"{s}/{n}"]) == n for s in SEEDS for n in SIZES)
    assert set(res["gap"]) == set(SEEDS) and all(set(g) == set(TARGETS) for g in res["gap"].values())
    mr.plot(res, SIZES, work / "plot.png")
    assert (work / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper is not installed")  # fmt: skip
def test_optuna_sweep_on_the_cli_returns_the_search_split_objective(bench, tmp_path):
    work, _ = bench
    models = f"[{work / 'ft_email_s0'},{work / 'ft_json_s0'}]"
    cmd = [sys.executable, "-m", "merging", "-m", "hydra/sweeper=merge_optuna", "hydra.sweeper.n_trials=2",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"base={work / 'base'}", f"models={models}", "tasks=[email,json]",
           f"out={tmp_path / 'merged'}", "method=ties", "progress=false",
           "adapter._target_=moe.adapters.pycode_adapter.PyCodeAdapter", "data=pycode", "data.pycode.tune_fraction=0.1",
           f"data.pycode.seq_len={mr.TINY.seq_len}", f"data.pycode.val_windows_per_domain={mr.TINY.windows}",
           "data.pycode.eval_domains=[email,json]"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"method.params.lam", "method.params.density"}
    assert 0.1 <= result["best_params"]["method.params.lam"] <= 2.5
    assert 0.05 <= result["best_params"]["method.params.density"] <= 1.0
    assert math.isfinite(result["best_value"])
    assert done.stdout.count("merged (ties)") == 2


def test_sweep_score_cache_keys_on_the_files_not_only_their_paths(tmp_path):
    """A sweep caches the inputs' scores across its jobs; an input rewritten at the same path (a file, or a file
    inside an export directory) must get a new key, an untouched one the same key."""
    from merging.search import _identity

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"a" * 10)
    export = tmp_path / "export"
    export.mkdir()
    (export / "weights.safetensors").write_bytes(b"b" * 10)
    before = _identity(ckpt), _identity(export)
    assert (_identity(ckpt), _identity(export)) == before
    ckpt.write_bytes(b"a" * 11)
    (export / "weights.safetensors").write_bytes(b"c" * 12)
    assert _identity(ckpt) != before[0] and _identity(export) != before[1]
