"""Resume: `python train.py ckpt_path=last hydra.run.dir=<run>` continues a run killed with SIGKILL, in its own
directory, and ends with the weights of an uninterrupted run, bit for bit (CPU, trainer.deterministic=true)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from moe.data.tasks import ResumableDataLoader
from moe.train.checks import check_resume_config, check_train_config

from .conftest import ROOT
from .test_configs import compose_train

# 60 steps over 48-batch epochs: the resumed run crosses an epoch boundary. Dropout draws from the global RNG
# every step, so the RNG states must be restored too; last.ckpt every 5 steps, validation every 7.
ARGS = ["experiment=smoke", "trainer.max_steps=60", "trainer.val_check_interval=7", "trainer.log_every_n_steps=1",
        "trainer.deterministic=true", "model.dropout=0.1", "callbacks.last_checkpoint.every_n_train_steps=5",
        "+logger.flush_logs_every_n_steps=1"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def train(run_dir, *extra):
    cmd = [sys.executable, "train.py", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def rows(run_dir):
    with (run_dir / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        return [json.dumps({k: v for k, v in r.items() if v != ""}, sort_keys=True) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_uninterrupted_weights(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    reference = train(full)
    victim = train(run)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert victim.poll() is None, "the run ended before it wrote a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not (run / "results.json").exists()  # killed mid-training
    finish(reference)

    out = finish(train(run, "ckpt_path=last"))
    assert "resuming from" in out

    a, b = load_file(full / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((run / "results.json").read_text())["steps"] == 60

    # One set of checkpoints and one logger version, continued: no last-v1.ckpt, no csv/version_1.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (full / "checkpoints").iterdir()
    )
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    # metrics.csv continues: every row is one the uninterrupted run logged (those logged after the checkpoint
    # and before the kill were dropped, then logged again), and every validation and final row is there. (The
    # train row of the checkpoint's own step is logged just after the checkpoint; a kill in between loses it.)
    got, want = rows(run), rows(full)
    assert len(got) == len(set(got)) and set(got) <= set(want)
    assert {r for r in want if "val/" in r or "final/" in r} <= set(got)


def test_init_from_and_ckpt_path_are_exclusive():
    with pytest.raises(ValueError, match=r"ckpt_path=last and init_from=/a.ckpt"):
        check_train_config(compose_train(["ckpt_path=last", "init_from=/a.ckpt"]))
    resumed_finetune = compose_train(["experiment=finetune", "ckpt_path=last"])  # needs no init_from to resume
    assert resumed_finetune.init_from is None and resumed_finetune.ckpt_path == "last"


def test_resuming_with_another_configuration_is_refused_naming_the_keys(tmp_path):
    saved = asdict(compose_train(["model=tiny"]))  # what the checkpoint holds (moe.callbacks.RunState)
    here = compose_train(["model=tiny", "model.d_model=48", "optim.lr=0.01", "trainer.max_steps=5"])
    with pytest.raises(ValueError, match=r"model.d_model=32 there, 48 here; optim.lr=0.003 there, 0.01 here\."):
        check_resume_config(here, saved, tmp_path / "last.ckpt")
    check_resume_config(compose_train(["model=tiny", "trainer=ddp"]), saved, tmp_path / "last.ckpt")  # may change


def loader(n=10, batch=3):
    data = TensorDataset(torch.arange(n))
    return ResumableDataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                               generator=torch.Generator().manual_seed(7))  # fmt: skip


def take(dl, count, served=0):
    """Batches as Lightning takes them from a sized loader: the rest of the epoch (len(dl) - served: its own
    progress counter says how many it had), never asking for one more."""
    out = []
    while len(out) < count:
        it = iter(dl)
        for _ in range(min(len(dl) - served, count - len(out))):
            out.append(next(it)[0].tolist())
        served = 0
    return out


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 6])  # 3 batches an epoch: mid-epoch and at epoch boundaries
def test_loader_state_continues_the_shuffled_order(stop):
    want = take(loader(), 12)
    first = loader()
    seen = take(first, stop)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + take(resumed, 12 - stop, served=state["served"]) == want
