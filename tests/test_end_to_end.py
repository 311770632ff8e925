"""End to end: `python train.py` smoke run, wandb offline logging, fine-tune from a checkpoint, merge, evaluate."""

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from merging import merge
from merging.__main__ import evaluate_merge
from merging.config import MergeConfig
from moe.config import DataConfig, TrainConfig, register_configs
from moe.data.tasks import build_splits
from moe.export import load_model
from moe.report import metric_series, read_stats
from moe.train.evaluate import task_metrics
from moe.train.run import run

from .conftest import CONF, ROOT

register_configs()
pytestmark = pytest.mark.slow


def cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - start


def test_train_cli_smoke_run(tmp_path):
    proc, seconds = cli("train.py", "experiment=smoke", f"hydra.run.dir={tmp_path}")
    assert seconds <= 30, f"smoke run took {seconds:.1f}s"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"copy", "reverse", "sort", "add", "lookup", "count"}
    assert results["mean_accuracy"] == pytest.approx(sum(results["tasks"].values()) / 6)
    assert "mean" in proc.stdout and "lookup" in proc.stdout  # the printed table
    model = load_model(tmp_path / "export")
    torch.load(results["checkpoint"], weights_only=True)  # loadable without unpickling code
    assert model.cfg.d_model == 32
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "val/loss",
        "val/acc/sort",
        "val/mean_accuracy",
        "routing/train/layer0/max_mean",
        "routing/train/layer0/cv",
        "routing/train/layer0/eff_experts",
        "routing/train/layer0/top1_share",
        "routing/train/layer0/entropy",
        "routing/train/layer0/aux_loss",
        "routing/train/layer0/z_loss",
        "routing/train/layer0/mi_task",
        "routing/val/layer0/cv",
    ):
        assert key in header, key
    # python -m moe.report: every curve ends at the final validation, whose accuracy is results.json's
    report_proc, _ = cli("-m", "moe.report", str(tmp_path))
    assert (tmp_path / "report" / "accuracy.png").is_file() and (tmp_path / "report" / "loss.png").is_file()
    rows = [r for r in read_stats(tmp_path) if r.get("kind") == "metrics"]
    steps, accs = metric_series(rows, "val/mean_accuracy")
    assert steps == [10, 20] and accs[-1] == pytest.approx(results["mean_accuracy"], abs=1e-6)
    logged = {}
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):  # Lightning's CSV step is the step index, one less than the steps done
            logged.update({int(row["step"]) + 1: float(row["train/loss"])} if row.get("train/loss") else {})
    steps, losses = metric_series(rows, "train/loss")
    assert steps[-1] == 20 and losses == pytest.approx([logged[s] for s in steps], abs=1e-6)


def wandb_records(path: Path, block: int = 32768):
    """The protobuf records of an offline run's ``run-<id>.wandb`` (a LevelDB-style log: a 7-byte file header,
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer or padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_records_routing_stats(tmp_path):
    proc, _ = cli("train.py", "experiment=smoke", "logger=wandb", f"hydra.run.dir={tmp_path}")
    assert "anonymous" not in proc.stdout + proc.stderr  # Lightning's anonymous=None, which wandb warns about
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The run's config is the whole TrainConfig, so fine-tunes and ablations can be told apart in wandb.
    config = {u.key: json.loads(u.value_json) for r in wandb_records(runs[0]) if r.HasField("config")
              for u in r.config.update}  # fmt: skip
    assert set(config) >= {"model", "router", "data", "optim", "trainer", "seed", "init_from", "ckpt_path"}
    assert config["data"]["train_per_task"] == 256 and config["trainer"]["max_steps"] == 20
    # The offline run file holds the history records as protobuf; metric names appear in it verbatim.
    records = runs[0].read_bytes()
    for key in (
        "routing/train/layer0/entropy",
        "routing/train/layer0/aux_loss",
        "routing/val/layer0/mi_task",
        "routing/train/layer0/load_hist",
        "routing/layer0/expert_task",
        "val/mean_accuracy",
        "val/acc/lookup",
        "final/mean_accuracy",
        "train/loss",
    ):
        assert key.encode() in records, key


SMALL = [
    "model=tiny",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.val_per_task=32",
    "data.batch_size=32",
    "trainer.log_every_n_steps=5",
]


def train_cfg(tmp_path, name, overrides) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, f"output_dir={tmp_path / name}", *overrides])
    return OmegaConf.to_object(cfg)


def test_finetune_then_merge_then_evaluate(tmp_path):
    common = ["data.train_per_task=1024", "trainer.val_check_interval=1000", "model.d_model=48"]
    base = run(train_cfg(tmp_path, "base", [*common, "trainer.max_steps=200", "optim.lr=0.01"]))
    for task in ("copy", "sort"):
        run(train_cfg(tmp_path, task, [*common, "experiment=finetune", f"data.tasks=[{task}]",
                                       f"init_from={base['checkpoint']}", "trainer.max_steps=60", "optim.lr=0.003",
                                       "optim.warmup_steps=5"]))  # fmt: skip
    # A fine-tune's best checkpoint is chosen by the accuracy on the tasks it trains on, not on all six.
    rows = list(csv.DictReader((tmp_path / "copy" / "csv" / "version_0" / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/mean_accuracy_trained")]
    assert val and all(r["val/mean_accuracy_trained"] == r["val/acc/copy"] for r in val)
    assert train_cfg(tmp_path, "x", ["experiment=finetune", "init_from=/a.ckpt"]).callbacks["model_checkpoint"][
        "monitor"] == "val/mean_accuracy_trained"  # fmt: skip
    base_dir, ft_dirs = tmp_path / "base" / "export", [tmp_path / t / "export" for t in ("copy", "sort")]
    cfg = MergeConfig(base=str(base_dir), models=[str(d) for d in ft_dirs], out=str(tmp_path / "merged"),
                      data=DataConfig(val_per_task=64))  # fmt: skip
    merge(cfg.base, cfg.models, cfg.out, method="ties", progress=False)
    scores = evaluate_merge(cfg)
    assert set(scores) == {"merged", "base", "model0", "model1"}
    assert set(scores["merged"]) == {"copy", "reverse", "sort", "add", "lookup", "count"}

    # Each fine-tune learned its task, and the merge keeps both: on each fine-tuned task the merged model is
    # far better than the specialist of the other task (which forgot it).
    _, val = build_splits(DataConfig(val_per_task=64))
    paths = {"base": base_dir, "copy": ft_dirs[0], "sort": ft_dirs[1], "merged": tmp_path / "merged"}
    loss = {name: {t: m["loss"] for t, m in task_metrics(load_model(p), val).items()} for name, p in paths.items()}
    for task, other in (("copy", "sort"), ("sort", "copy")):
        assert loss[task][task] < loss["base"][task]
        assert loss["merged"][task] < loss[other][task] / 2, loss


def test_merge_cli(tmp_path):
    for name, tasks in (("base", "[copy,sort]"), ("a", "[copy]"), ("b", "[sort]")):
        run(train_cfg(tmp_path, name, [f"data.tasks={tasks}", "trainer.max_steps=5", "data.train_per_task=64"]))
    out = tmp_path / "merged"
    cli(
        "-m",
        "merging",
        f"base={tmp_path / 'base' / 'export'}",
        f"models=[{tmp_path / 'a' / 'export'},{tmp_path / 'b' / 'export'}]",
        "method=ties",
        "method.params.density=0.5",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    merged = load_model(out)
    assert merged.cfg == load_model(tmp_path / "base" / "export").cfg


@pytest.mark.distributed
def test_train_cli_ddp_expert_parallel_exports_what_it_reports(tmp_path):
    """`python train.py trainer=ddp trainer.devices=2 parallel.ep_size=2` on 2 gloo processes: one export of the
    full model, written by rank 0, whose EP=1 evaluation is the accuracy results.json reports."""
    common = ["experiment=smoke", "trainer.max_steps=40", "data.train_per_task=512", "optim.lr=0.01"]
    cli("train.py", *common, "trainer=ddp", "trainer.devices=2", "parallel.ep_size=2", f"hydra.run.dir={tmp_path}",
        timeout=180)  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    model = load_model(tmp_path / "export")  # one process, unsharded
    assert model.blocks[0].moe.experts.w_gate.shape[0] == 4
    _, val = build_splits(DataConfig(train_per_task=512, val_per_task=32))
    got = {t: m["accuracy"] for t, m in task_metrics(model, val).items()}
    assert got == pytest.approx(results["tasks"], abs=1e-9)
    assert results["mean_accuracy"] > 0  # non-zero accuracies, so the equality above compares something
    ckpt = torch.load(results["checkpoint"], weights_only=True)
    assert ckpt["state_dict"]["model.blocks.0.moe.experts.w_gate"].shape[0] == 4  # full experts in the checkpoint
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]


def test_pipeline_multirun_over_methods_trains_base_and_finetunes_once(tmp_path):
    """`python train.py -m experiment=pipeline merge.method=ties,task_arithmetic` on a tiny config: two jobs, one
    base and one fine-tune per task in the shared cache, a comparison per job (pipeline.json, printed table)."""
    cache = tmp_path / "cache"
    args = ["-m", "experiment=pipeline", "merge.method=ties,task_arithmetic", "merge.tasks=[copy,sort]",
            "merge.base_steps=40", "merge.finetune_steps=15", f"merge.cache_dir={cache}", "model=tiny", "logger=csv",
            "data.train_per_task=256", "data.val_per_task=32", "data.batch_size=32",
            "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000", "optim.lr=0.01",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc, _ = cli("train.py", *args, timeout=300)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["base", "finetune", "finetune"]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/pipeline.json"))]
    assert [s["method"] for s in summaries] == ["ties", "task_arithmetic"]
    for s in summaries:
        assert set(s["accuracy"]) == {"base", f"merged ({s['method']})", "fine-tune copy", "fine-tune sort"}
        assert set(s["accuracy"]["base"]) == {"copy", "reverse", "sort", "add", "lookup", "count"}
        assert s["base"] == summaries[0]["base"] and s["fine_tunes"] == summaries[0]["fine_tunes"]  # cached
    assert proc.stdout.count("Pipeline: merge =") == 2  # the printed comparison tables
    assert "fine-tune copy" in proc.stdout and "…" not in proc.stdout  # full headers in a pipe, not cut to 80
    for job in sorted((tmp_path / "sweep").glob("*/pipeline.json")):
        assert f"pipeline: {job}" in proc.stdout  # where each job's comparison went
