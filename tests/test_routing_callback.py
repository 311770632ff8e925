"""RoutingStatsCallback on a plain LightningModule with one MoELayer; summaries on hand-worked counts."""

import json
import math
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moe.callbacks import RouterScheduleCallback, RoutingStatsCallback
from moe.config import GumbelConfig, RouterConfig
from moe.nn.layers import MoELayer
from moe.nn.routers import GumbelRouter
from moe.report.stats import load_summary, mutual_information
from tests.distributed import run_distributed

D = 8


def test_load_summary_on_hand_worked_counts():
    s = load_summary(torch.tensor([6.0, 2.0, 0.0, 0.0]), top_k=2)  # mean 2
    assert s["util_min"] == 0 and s["max_mean"] == 3 and s["dead_frac"] == 0.5
    assert s["cv"] == pytest.approx(math.sqrt(((6 - 2) ** 2 + 0 + 4 + 4) / 4) / 2)
    assert s["eff_experts"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert (s["top1_expert"], s["top1_share"], s["top2_expert"]) == (0, 0.75, 1)
    assert (s["bottom1_expert"], s["bottom2_expert"]) == (3, 2)  # ties: the later id is the least loaded
    assert load_summary(torch.ones(5))["eff_experts"] == pytest.approx(5)


def test_mutual_information_on_hand_worked_tables():
    assert mutual_information(torch.tensor([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0)  # routing ignores the task
    assert mutual_information(torch.tensor([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(math.log(2))  # one expert each
    # p = [[.4,.1],[.1,.4]]: I = 2 * (.4 log(.4/.25) + .1 log(.1/.25))
    assert mutual_information(torch.tensor([[4.0, 1.0], [1.0, 4.0]])) == pytest.approx(
        2 * (0.4 * math.log(1.6) + 0.1 * math.log(0.4))
    )


class TaskData(L.LightningDataModule):
    """Batches of random vectors; task t's tokens lean on feature t so routing can follow the task."""

    task_names = ["a", "b"]

    def __init__(self, n=64, batch=16, seq=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        task = torch.arange(n) % 2
        x = torch.randn(n, seq, D, generator=g)
        x[..., 0] += 3 * (1 - 2 * task[:, None].float())
        self.rows = [{"x": x[i], "task_id": task[i]} for i in range(n)]
        self.batch = batch

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.batch)

    def val_dataloader(self):
        return DataLoader(self.rows[:32], batch_size=self.batch)


class OneLayer(L.LightningModule):
    """Any LightningModule: it never mentions routing statistics."""

    def __init__(self, E=4, router=None):
        super().__init__()
        self.moe = MoELayer(D, 16, E, router or RouterConfig(k=2))

    def training_step(self, batch, _):
        y, r = self.moe(batch["x"])
        loss = y.square().mean() + 0.01 * r.aux_loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.moe(batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, module, callback, logger=False, steps=8, data=None, **kw):
    trainer = L.Trainer(max_steps=steps, logger=logger, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=4,
                        default_root_dir=str(tmp_path), accelerator="cpu", log_every_n_steps=1, **kw)  # fmt: skip
    trainer.fit(module, datamodule=data or TaskData())
    return trainer


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("E", [4, 64])
def test_plain_module_gets_bounded_keys_and_saved_records(tmp_path, E):
    cb = RoutingStatsCallback(every_n_steps=2, plot_every_n_steps=4)
    trainer = fit(tmp_path, OneLayer(E), cb)
    keys = sorted(k for k in trainer.callback_metrics if k.startswith("routing/"))
    assert len(keys) == 2 * 21, keys  # per split: 5 balance + 12 top/bottom + entropy, aux, z, mi: whatever E is
    assert "routing/train/layer0/top3_share" in keys and "routing/val/layer0/mi_task" in keys
    records = [r for r in read_jsonl(tmp_path / "routing" / "stats.jsonl") if r.get("kind") == "sparse"]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    # each logged load counts every routed slot of the steps since the last log: 2 batches x 64 tokens x k=2
    assert all(sum(r["load"]) == 2 * 64 * 2 for r in train)
    assert all(sum(map(sum, r["joint"])) == 2 * 64 * 2 for r in train)  # expert x task counts: the same slots
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 2 and sum(val[0]["load"]) == 32 * 4 * 2  # the whole validation set
    for r in train:  # the logged metric is the perplexity of the logged load: exp(H(load / sum))
        p_E = torch.tensor(r["load"], dtype=torch.float64) / sum(r["load"])
        eff = torch.exp(-(p_E[p_E > 0] * p_E[p_E > 0].log()).sum()).item()
        assert r["metrics"]["eff_experts"] == pytest.approx(eff, rel=1e-6)


def test_wandb_offline_run_holds_histogram_image_and_keys(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="t", mode="offline")
    fit(tmp_path, OneLayer(), RoutingStatsCallback(every_n_steps=2, plot_every_n_steps=4), logger=logger)
    logger.experiment.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    run_file = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + 30  # wandb's service process writes the file after finish() returns
    while b"routing/val/layer0/mi_task" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    records = run_file.read_bytes()
    for key in (b"routing/train/layer0/cv", b"routing/val/layer0/mi_task", b"routing/train/layer0/load_hist",
                b"histogram", b"routing/layer0/expert_task", b"routing/layer0/load_over_training"):  # fmt: skip
        assert key in records, key
    images = list((run_dir / "files" / "media" / "images" / "routing").rglob("*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"expert", "load"}, images
    assert b"routing/train/layer0/tokens_frac" not in records  # no per-expert keys


def test_collapse_and_dead_experts_are_warned(tmp_path, capsys):
    module = OneLayer()
    with torch.no_grad():
        module.moe.router.weight.zero_()
        module.moe.router.weight[0, 1] = 50.0  # x[..., 1] > 0 everywhere (below): expert 0 first ...
        module.moe.router.weight[1, 1] = 49.0  # ... expert 1 second; experts 2 and 3 (logit 0) get nothing
    data = TaskData()
    for row in data.rows:
        row["x"][..., 1] = row["x"][..., 1].abs() + 1.0
    cb = RoutingStatsCallback(every_n_steps=1, hot_share=0.2, dead_patience=3)
    fit(tmp_path, module, cb, steps=4, data=data)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "expert 0 took" in err and "routing_stats.hot_share=20%" in err
    assert "layer 0 expert 2 got no tokens for 3" in err and "layer 0 expert 3 got no tokens for 3" in err
    assert "expert 1 got no tokens" not in err


def test_router_schedule_anneals_gumbel_temperature(tmp_path):
    cfg = RouterConfig(kind="gumbel", gumbel=GumbelConfig(tau=2.0, tau_min=0.5, tau_anneal_rate=0.5))
    module = OneLayer(router=cfg)
    fit(tmp_path, module, RouterScheduleCallback(), steps=3)
    router = module.moe.router
    assert isinstance(router, GumbelRouter)
    assert router.tau.item() == pytest.approx(max(0.5, 2.0 * math.exp(-0.5 * 2)))  # set before the last step (2)


def _ddp_counts(rank, world, out):
    module = OneLayer()
    with torch.no_grad():
        module.moe.router.weight.zero_()
        module.moe.router.weight[rank, 0] = 100.0  # rank r routes every token's first choice to expert r
    data = TaskData()
    data.rows = [{"x": torch.full((4, D), 1.0), "task_id": torch.tensor(rank)} for _ in range(16)]
    cb = RoutingStatsCallback(every_n_steps=1, save_dir=out)
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[cb], enable_checkpointing=False, devices=world,
                        strategy="ddp", accelerator="cpu", enable_progress_bar=False, limit_val_batches=0,
                        use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, datamodule=data)


@pytest.mark.distributed
def test_counts_are_summed_over_data_parallel_ranks(tmp_path):
    run_distributed(_ddp_counts, 2, str(tmp_path))
    rec = next(r for r in read_jsonl(tmp_path / "routing" / "stats.jsonl") if r.get("kind") == "sparse")
    load = rec["load"]
    assert load[0] >= 16 * 4 and load[1] >= 16 * 4  # each rank's first choices, seen together
    assert sum(load) == 2 * 16 * 4 * 2
    assert rec["joint"][0][0] >= 64 and rec["joint"][1][1] >= 64  # rank 0 = task 0 on expert 0, rank 1 on 1


def test_report_renders_pngs_and_summary_from_saved_stats(tmp_path):
    from moe.report import render

    module = OneLayer()
    with torch.no_grad():
        module.moe.router.weight.zero_()
        module.moe.router.weight[3, 0] = -50.0  # expert 3 never chosen where x[..., 0] > 0 ...
    fit(tmp_path, module, RoutingStatsCallback(every_n_steps=2, trace_max_rows=10, trace_tokens_per_step=4))
    report = render(tmp_path)
    names = sorted(p.name for p in report.parent.glob("*.png"))
    assert names == ["expert_task_layer0.png", "load_layer0.png", "load_over_training_layer0.png", "loss.png"]
    assert all((report.parent / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    text = report.read_text()
    assert "| 0 | sparse | val |" in text and "![load_layer0.png](load_layer0.png)" in text
    trace = read_jsonl(tmp_path / "routing" / "trace.jsonl")
    assert len(trace) == 10 and all(len(r["experts"]) == 2 and abs(sum(r["weights"]) - 1) < 1e-5 for r in trace)
    # the output policy: a second render replaces its own report as a whole; a directory with other files, or the
    # run's own statistics directory, is refused and left as it was
    (report.parent / "loss.png").unlink()
    manifest = report.parent / ".moe-merge-output.json"  # an earlier report that also wrote stale.png
    manifest.write_text(json.dumps({"files": [*json.loads(manifest.read_text())["files"], "stale.png"]}))
    (report.parent / "stale.png").write_bytes(b"old")
    render(tmp_path)
    assert (report.parent / "loss.png").is_file() and not (report.parent / "stale.png").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"--out=.*mine: holds report.md, which no earlier output"):
        render(tmp_path, mine)
    assert (mine / "report.md").read_text() == "my notes" and len(list(mine.iterdir())) == 1
    with pytest.raises(ValueError, match=r"--out=.*routing: holds the input"):
        render(tmp_path, tmp_path / "routing")
