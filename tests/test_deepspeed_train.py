"""`python train.py trainer=deepspeed` end to end on the CPU: 2 gloo processes under Lightning, DeepSpeed's CPU
accelerator, our ExpertParallelDeepSpeedStrategy.

One ZeRO-2 EP=2 fp32 run (20 steps, module fixture) is checked against ``trainer=ddp`` EP=2 (loss at every step,
exported weights), against ``python -m moe.parallel.ds_checkpoint`` of its own checkpoint, against a run whose
rank 1 was killed with SIGKILL after its step-10 checkpoint and resumed with ``ckpt_path=last``, and against
ZeRO-3 at EP=1.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from moe.export import load_model

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMMON = ["experiment=smoke", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
          "trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=10"]  # fmt: skip
DEEPSPEED = ["trainer=deepspeed", "trainer.strategy.timeout=60", *COMMON]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def train(run_dir, *args) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def losses(run_dir) -> dict[int, float]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def weights(directory):
    return load_file(directory / "model.safetensors")


def assert_close_weights(got, want, rtol):
    assert sorted(got) == sorted(want)
    worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    assert worst <= rtol, f"worst tensor differs by {worst:.2e} (relative norm)"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("deepspeed") / "run"
    finish(train(run, *DEEPSPEED, "parallel.ep_size=2"))
    return run


def test_zero2_expert_parallel_trains_like_ddp(zero2_run, tmp_path):
    finish(train(tmp_path, "trainer=ddp", *COMMON, "parallel.ep_size=2"))
    got, want = losses(zero2_run), losses(tmp_path)
    assert sorted(got) == sorted(want) == list(range(20))  # a loss at every step
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    export = weights(zero2_run / "export")
    assert export["blocks.0.moe.experts.w_gate"].shape[0] == 4  # every expert, gathered from both ranks
    assert_close_weights(export, weights(tmp_path / "export"), rtol=1e-5)  # measured: 2.3e-7
    results = json.loads((zero2_run / "results.json").read_text())
    assert results["steps"] == 20 and (zero2_run / "checkpoints" / "final.ckpt" / "latest").is_file()


def test_converter_writes_the_runs_own_export(zero2_run, tmp_path):
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "moe.parallel.ds_checkpoint", str(zero2_run / "checkpoints" / "final.ckpt"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = weights(out), weights(zero2_run / "export")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert load_model(out).cfg == load_model(zero2_run / "export").cfg
    # the checkpoint directory itself is a valid init_from / load_checkpoint source
    direct = load_model(zero2_run / "export", weights=zero2_run / "checkpoints" / "final.ckpt").state_dict()
    assert all(torch.equal(direct[k], want[k]) for k in want)


def test_rank_killed_fails_the_other_and_the_run_resumes_to_the_same_weights(zero2_run, tmp_path):
    """SIGKILL to rank 1 right after the step-10 checkpoint: rank 0 (the launcher) exits with an error within
    the collective timeout (60 s) instead of hanging; ``ckpt_path=last`` then ends where the uninterrupted run
    ended."""
    victim = train(tmp_path, *DEEPSPEED, "parallel.ep_size=2")
    latest = tmp_path / "checkpoints" / "last.ckpt" / "latest"  # DeepSpeed writes it once the tag is complete
    deadline = time.monotonic() + 180
    while not latest.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.01)
    ranks = [c for c in psutil.Process(victim.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
    assert len(ranks) == 1, ranks  # Lightning starts rank 1 as a child of the command
    ranks[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = victim.communicate(timeout=90)
    assert victim.returncode != 0 and time.monotonic() - killed < 60 + 15, err[-2000:]
    assert not (tmp_path / "results.json").exists()

    out = finish(train(tmp_path, *DEEPSPEED, "parallel.ep_size=2", "ckpt_path=last"))
    assert "resuming from" in out and "(step 10)" in out
    assert_close_weights(weights(tmp_path / "export"), weights(zero2_run / "export"), rtol=1e-6)
    got, want = losses(tmp_path), losses(zero2_run)
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in range(10, 20))


def test_zero3_trains_and_exports(zero2_run, tmp_path):
    """ZeRO-3 partitions every weight (experts whole, EP=1): the export gathers them; the run computes what
    ZeRO-2 at EP=2 does (measured: 2.6e-7)."""
    finish(train(tmp_path, *DEEPSPEED, "trainer.strategy.stage=3"))
    names = {p.name for p in (tmp_path / "checkpoints" / "final.ckpt" / "checkpoint").iterdir()}
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in names  # partitioned per rank
    assert_close_weights(weights(tmp_path / "export"), weights(zero2_run / "export"), rtol=1e-5)
    assert losses(tmp_path)[19] == pytest.approx(losses(zero2_run)[19], rel=1e-5)


def test_resuming_a_deepspeed_checkpoint_at_another_layout_is_refused(zero2_run, tmp_path):
    proc = train(zero2_run, *DEEPSPEED, "parallel.ep_size=1", "ckpt_path=last")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "parallel.ep_size=2 there, 1 here" in out + err


def test_converter_stays_inside_the_checkpoint_and_never_replaces_an_export(zero2_run, tmp_path):
    """Hostile or clumsy inputs to ``python -m moe.parallel.ds_checkpoint``: one ``Error:`` line each, nothing
    written, nothing read from outside the checkpoint directory, no wait on a FIFO."""
    import shutil

    from moe.parallel.ds_checkpoint import main

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        assert str(exit_.value.code).startswith("Error: "), exit_.value.code
        return str(exit_.value.code)

    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero2_run / "checkpoints" / "final.ckpt", ckpt)
    outside = tmp_path / "other" / "checkpoint"
    shutil.copytree(ckpt / "checkpoint", outside)
    (ckpt / "latest").write_text("../other/checkpoint")
    assert "names the tag '../other/checkpoint'" in refused(ckpt, tmp_path / "out")
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(tmp_path / "secret")
    (tmp_path / "secret").write_text("checkpoint")
    assert "leads outside the checkpoint directory" in refused(ckpt, tmp_path / "out")
    (ckpt / "latest").unlink()
    (ckpt / "latest").write_text("checkpoint")
    expert = next((ckpt / "checkpoint").glob("layer_*_expert_*_model_states.pt"))
    expert.unlink()
    os.mkfifo(expert)
    start = time.monotonic()
    assert "is not a regular file" in refused(ckpt, tmp_path / "out")
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()
    expert.unlink()
    shutil.copy(zero2_run / "checkpoints" / "final.ckpt" / "checkpoint" / expert.name, expert)

    export = tmp_path / "export"
    shutil.copytree(zero2_run / "export", export)
    before = (export / "model.safetensors").read_bytes()
    assert "pass --overwrite" in refused(ckpt, export)
    assert "inside the checkpoint" in refused(ckpt, ckpt / "checkpoint" / "out")
    assert "out_dir: empty" in refused(ckpt, " ")
    assert (export / "model.safetensors").read_bytes() == before
    main([str(ckpt), str(export), "--overwrite"])  # said so: replaced by the same weights
    assert (export / "model.safetensors").read_bytes() != b"" and not (ckpt / "checkpoint" / "out").exists()
