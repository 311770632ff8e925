"""What a new user ran into (issue 11 item 11, issue 13 items 8 and 11), each checked where it showed: the progress
bar, the last step, metrics.csv, refusals that name the key and leave no run directory, and the merge CLI's exit,
directories, help and progress."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from moe.callbacks.run import short_metric_name
from moe.config import DataConfig, ModelConfig, RouterConfig
from moe.data.tasks import ALL_TASKS
from moe.export import export_model
from moe.nn.model import MoETransformer
from moe.train.checks import check_train_config

from .conftest import ROOT
from .test_configs import compose_train

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline", "COLUMNS": "120"}


def cli(*args, cwd=ROOT, ok=True):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---- one training run: progress bar, the last step, metrics.csv, warnings ----------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """23 steps (validation every 10, last.ckpt every 100): the last step is neither's multiple."""
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = cli("train.py", "experiment=smoke", "trainer.max_steps=23", "trainer.enable_progress_bar=true",
               f"hydra.run.dir={run_dir}")  # fmt: skip
    with (run_dir / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return run_dir, proc, rows


@pytest.mark.slow
def test_progress_bar_counts_steps_with_short_metric_names_that_fit(smoke):
    _, proc, _ = smoke
    line = next(line for line in proc.stdout.splitlines() if line.startswith("step "))
    assert "23/23" in line and "Epoch" not in proc.stdout
    assert len(line.rstrip()) <= 120 and "…" not in line
    for name in ("loss:", "em:", "val_acc:", "val_loss:"):  # on the one line: nothing wrapped or cut
        assert name in line, line
    assert "train/" not in line and "v_num" not in line


def test_short_metric_names():
    assert [short_metric_name(k) for k in ("train/loss", "train/exact_match", "val/mean_accuracy", "val/loss")] == [
        "loss", "em", "val_acc", "val_loss"]  # fmt: skip


@pytest.mark.slow
def test_the_last_step_is_validated_and_checkpointed(smoke):
    run_dir, _, rows = smoke
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 23
    val_steps = [int(r["step"]) for r in rows if r.get("val/mean_accuracy")]
    assert val_steps == [9, 19, 22]  # after steps 10, 20 and 23 (Lightning logs the step index)
    assert len(list((run_dir / "checkpoints").glob("best-step*.ckpt"))) == 1


@pytest.mark.slow
def test_csv_logger_writes_the_final_metrics(smoke):
    run_dir, _, rows = smoke
    results = json.loads((run_dir / "results.json").read_text())
    final = [r for r in rows if r.get("final/mean_accuracy")]
    assert len(final) == 1 and float(final[0]["final/mean_accuracy"]) == pytest.approx(results["mean_accuracy"])
    assert float(final[0]["final/acc/lookup"]) == pytest.approx(results["tasks"]["lookup"])


@pytest.mark.slow
def test_no_avoidable_warnings(smoke):
    _, proc, _ = smoke
    output = proc.stdout + proc.stderr
    for noise in ("litlogger", "LeafSpec", "anonymous", "register_new_resolver"):
        assert noise not in output, noise


# ---- refusals: named, before any work, without a run directory ----------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("optim.min_lr_ratio=-1", r"optim.min_lr_ratio=-1.0: expected in \[0, 1\]"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps=-5: expected >= 0"),
    ("trainer.max_steps=0", r"trainer.max_steps=0: expected >= 1"),
    ("trainer.max_steps=-1", r"trainer.max_steps=-1: expected >= 1"),
    ("optim.lr=nan", r"optim.lr=nan: expected > 0"),
    ("model.dropout=2", r"model.dropout=2.0: expected in \[0, 1\)"),
    ("trainer.gradient_clip_val=nan", r"trainer.gradient_clip_val=nan: expected a finite value >= 0"),
    ("data.val_per_task=0", r"data.val_per_task=0: expected >= 1 \(the final evaluation"),
    ("data.train_per_task=0", r"data.train_per_task=0: expected >= 1"),
    ("data.batch_size=0", r"data.batch_size=0: expected >= 1"),
    ("data=pycode data.pycode.batch_size=0", r"data.pycode.batch_size=0: expected >= 1"),
])  # fmt: skip
def test_unsafe_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        check_train_config(compose_train(override.split()))


@pytest.mark.slow
def test_finetune_without_init_from_fails_naming_it_and_leaves_no_run_directory(tmp_path):
    proc = cli("train.py", "experiment=finetune", f"hydra.run.dir={tmp_path / 'run'}", ok=False)
    assert "init_from is required" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_failed_run_removes_only_a_run_directory_it_created_and_left_empty(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from moe.train.run import RunDirGuard

    def job(run_dir, status=JobStatus.FAILED, files=(".hydra/config.yaml", "train.log")):
        config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}, "output_subdir": ".hydra",
                                             "runtime": {"output_dir": str(run_dir)}}})  # fmt: skip
        guard = RunDirGuard()
        guard.on_run_start(config)
        for name in files:  # what Hydra (and the run) wrote
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text("x")
        guard.on_job_end(config, JobReturn(status=status))
        return run_dir.exists()

    assert not job(tmp_path / "refused")
    assert job(tmp_path / "ok", status=JobStatus.COMPLETED)
    assert job(tmp_path / "failed_in_training", files=(".hydra/config.yaml", "train.log", "csv/version_0/m.csv"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert job(tmp_path / "mine") and (tmp_path / "mine" / "notes.txt").read_text() == "mine"  # was there before


# ---- the merge CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    vocab = 4 + len(ALL_TASKS) + 10 + DataConfig().num_symbols
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=32, d_model=16, n_layer=1, n_head=2, num_experts=2, d_ff=8)
    torch.manual_seed(0)
    base = MoETransformer(cfg, RouterConfig(k=1))
    export_model(base, root / "base")
    for i in range(2):
        ft = MoETransformer(cfg, RouterConfig(k=1))
        ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        export_model(ft, root / f"ft{i}")
    return root


@pytest.mark.slow
def test_merge_with_eval_writes_only_its_output_and_exits_quietly(exports, tmp_path):
    proc = cli("-m", "merging", f"base={exports / 'base'}", f"models=[{exports / 'ft0'},{exports / 'ft1'}]",
               f"out={tmp_path / 'out'}", "eval=true", "data.val_per_task=16", cwd=tmp_path)  # fmt: skip
    assert "normalized" in proc.stdout  # the evaluation table
    assert "nanobind" not in proc.stderr  # gc.freeze() at exit made nanobind report leaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no outputs/merge/<date>/<time>/__main__.log


def test_merge_evaluation_reports_progress(exports, monkeypatch):
    from rich.progress import Progress

    from merging.evaluate import evaluate_paths
    from moe.adapters.moe_adapter import MoEAdapter

    seen, update = [], Progress.update
    monkeypatch.setattr(Progress, "update", lambda self, task, **kw: (seen.append(kw.get("description")),
                                                                      update(self, task, **kw))[1])  # fmt: skip
    models = [str(exports / "ft0"), str(exports / "ft1")]
    evaluate_paths(str(exports / "ft0"), str(exports / "base"), models, DataConfig(val_per_task=8), MoEAdapter(),
                   progress=True)
    assert seen == ["evaluating merged", "evaluating base", "evaluating model0", "evaluating model1", "evaluated"]


@pytest.mark.slow
def test_each_help_lists_its_own_config_groups():
    train = cli("train.py", "--help").stdout
    merge = cli("-m", "merging", "--help").stdout
    groups = train.split("== Config ==")[0]  # the group list (the config below may hold merge.method: ties)
    assert "\nrouter: " in groups and "\nexperiment: " in groups and "\nmethod: " not in groups
    assert "method: " in merge and "ties" in merge
    assert not any(g in merge for g in ("router: ", "trainer: ", "model: ", "data: "))
    assert "powered by Hydra" not in train + merge and "__main__" not in merge
    assert merge.startswith("python -m merging") and train.startswith("python train.py")


# ---- issue 19 item 4 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, close", [(["train.py", "model.d_modle=64"], "model.d_model"),
                                         (["-m", "merging", "methd.name=ties"], "method.name")])  # fmt: skip
def test_a_mistyped_key_is_refused_with_the_closest_keys_not_hydras_append_hint(args, close, tmp_path):
    proc = cli(*args, cwd=ROOT, ok=False)
    assert proc.returncode == 1 and f"did you mean {close}" in proc.stderr
    assert "To append" not in proc.stderr and "+model" not in proc.stderr
    assert proc.stderr.startswith("Error: unknown config key(s)") and "Hint: " in proc.stderr


def test_override_keys_under_open_nodes_and_group_choices_pass_the_key_check():
    from moe.config import TrainConfig
    from moe_merge_common.cli import config_groups, unknown_overrides

    groups = config_groups(ROOT / "conf")
    assert {"experiment", "model/moe", "hydra/launcher", "method"} <= groups
    ok = ["model=tiny", "model/moe=capacity", "experiment=smoke", "hydra/launcher=slurm", "+extra=1",
          "~callbacks.rich_progress", "hydra.run.dir=x", "-m",
          "trainer.strategy.stage=3", "callbacks.model_checkpoint.save_top_k=3", "logger.mode=online",
          "trainer.extra.limit_val_batches=2", "merge.params.density=0.2", "router.k=1"]  # fmt: skip
    assert unknown_overrides(TrainConfig, ok, groups) == []
    bad = unknown_overrides(TrainConfig, ["optim.lrr=1", "zzz=1", "experiment.x=1"], groups)
    assert bad == ["optim.lrr (did you mean optim.lr or optim.impl or optim?)", "zzz", "experiment.x"]


def test_merge_table_means_say_over_which_tasks():
    from merging.evaluate import accuracy_table
    from moe_merge_common.cli import table_console

    results = {"merged": {"a": 0.5, "b": 1.0, "c": 0.0}, "base": {"a": 0.2, "b": 0.4, "c": 0.6}}
    console = table_console(record=True, file=open(os.devnull, "w"))  # not a terminal: full-width headers
    console.print(accuracy_table(results, {"a": 0.5, "b": 1.0}, {"a": "model0", "b": "model1"}))
    text = console.export_text()
    assert "mean, all 3 tasks" in text and "0.500" in text.split("mean, all 3 tasks")[1].splitlines()[0]
    tuned = text.split("mean, 2 fine-tuned tasks")[1].splitlines()[0].split()
    assert tuned[:4] == ["│", "0.750", "│", "0.300"] and "0.750" in tuned[-2:]  # merged, base ... normalized
    assert "normalized" in text and "…" not in text


def test_merge_refuses_a_plus_added_unknown_key_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = cli("-m", "merging", "base=/nonexistent/base", "models=[/nonexistent/a,/nonexistent/b]", f"out={out}",
               "+assemble.enabld=true", cwd=tmp_path, ok=False)  # fmt: skip
    assert proc.returncode == 1 and "unknown config key(s): assemble.enabld" in proc.stderr
    assert not out.exists()


def test_report_of_a_missing_run_is_one_line_and_creates_nothing(tmp_path, capsys):
    from moe.report import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no_run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("Error: ") and "routing/stats.jsonl" in err
    assert "Traceback" not in err and not (tmp_path / "no_run").exists()


def test_a_new_run_into_a_directory_holding_a_run_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"their checkpoint")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("their config")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = cli("train.py", "experiment=smoke", f"hydra.run.dir={run}", ok=False)
    assert proc.returncode == 1 and f"hydra.run.dir={run} holds a run" in proc.stderr
    assert "ckpt_path=last" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing replaced, nothing added


def test_a_new_run_into_a_directory_holding_foreign_files_is_refused_naming_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "export").mkdir()
    (run / "export" / "model.safetensors").write_bytes(b"someone else's weights")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = cli("train.py", "experiment=smoke", f"hydra.run.dir={run}", ok=False)
    assert proc.returncode == 1 and "holds files no run of this command wrote (export, notes.txt)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == ["export", "notes.txt"]


def test_a_second_run_into_a_directory_being_written_fails_at_once_naming_the_first(tmp_path):
    """The run directory's lock is taken before Hydra writes its config; held here by this process, a run (even a
    resume, which the holds-a-run check lets through) is refused with this pid and adds nothing."""
    from moe_merge_common.outputs import acquire_lock, release_lock

    run = tmp_path / "run"
    fd = acquire_lock(run)
    try:
        for extra in ([], ["ckpt_path=last"]):
            proc = cli("train.py", "experiment=smoke", f"hydra.run.dir={run}", *extra, ok=False)
            assert proc.returncode == 1 and f"another job (pid {os.getpid()}) is writing here" in proc.stderr
            assert "Traceback" not in proc.stderr and [p.name for p in run.iterdir()] == [".moe.lock"]
    finally:
        release_lock(run, fd)
    assert not any(run.iterdir())
