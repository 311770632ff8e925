"""benchmarks/gpu_check.sh and its Python half, on the CPU: the README's traffic model matches the launchers' tiling,
the report records every outcome (ok, failed, timeout, skipped, unreadable results) and checks the targets, and the
script writes its JSON even when every step is skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]

HAS_TRITON = importlib.util.find_spec("triton") is not None
T, K, SMS = 262_144, 8, 132


def test_traffic_model_figures_of_the_readme():
    """The README's Kernels table, recomputed: any change here must change the README too."""
    by = {E: {r["kernel"].split(" (")[0]: r for r in gpu_check.kernel_traffic(T, E, K, sms=SMS)} for E in (64, 256)}
    assert by[64]["router forward"]["bytes"] == 33_554_432 + 2 * 8_388_608 + 1_048_576 + 512 == 51_380_736
    assert by[256]["router forward"]["bytes"] == 152_045_568
    assert by[64]["slot positions"]["bytes"] == 25_690_368 and by[256]["slot positions"]["bytes"] == 27_317_248
    assert by[64]["router backward"]["bytes"] == 94_372_096 and by[256]["router backward"]["bytes"] == 295_699_456
    assert gpu_check.router_full_floor(T, 64, K, sms=SMS) == (80_218_896, 13)
    assert gpu_check.router_full_floor(T, 256, K, sms=SMS) == (182_516_752, 13)
    assert round(80_218_896 / 4.2e6, 2) == 19.10 and round(182_516_752 / 4.2e6, 2) == 43.46  # us at 4.2 TB/s
    assert by[64]["permute"]["bytes"] == 9_672_065_024 and by[64]["unpermute"]["bytes"] == 9_680_453_632
    assert by[64]["unpermute backward"]["bytes"] == 18_278_776_832


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the launchers' tiling helpers)")
def test_traffic_model_follows_the_launchers(monkeypatch):
    """Programs and slot blocks of the model equal what the launchers compute for a 132-SM GPU."""
    from moe.kernels import triton_permute, triton_router

    monkeypatch.setattr(triton_router, "sm_count", lambda device: SMS)
    monkeypatch.setattr(triton_permute, "sm_count", lambda device: SMS)
    cuda = torch.device("cuda")  # a device object only: nothing is allocated
    for E in (8, 64, 256, 512):
        block_t = triton_router._tiles(E, K, None)[0]
        rpp = triton_router._rows_per_program(T, block_t, cuda, None)
        assert gpu_check.router_programs(T, E, SMS) == -(-T // rpp)
        chunk, _, chunks = triton_permute._slot_tiles(T * K, E, cuda, None, None)
        assert gpu_check.slot_blocks(T * K, E, SMS) == -(-(T * K) // (chunk * chunks))


def _bench(path: Path, bench: str, rows: list[dict]) -> None:
    path.write_text(json.dumps({"bench": bench, "env": {}, "args": {}, "results": rows}))


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    router = [
        {"shape": "T=262144 E=64 k=8", "impl": impl, "us": us, "extra": {"T": T, "E": 64, "k": K, "dtype": "bf16"}}
        for impl, us in [
            ("fused full", 38.0),
            ("fused full (CUDA graph)", 30.0),
            ("eager full", 1883.0),
            ("compiled full", 1746.0),
            ("fused router", 20.0),
            ("triton block_t=16 rounds", 21.0),
            ("triton block_t=8 bitonic", 19.0),
        ]
    ] + [
        {"shape": "T=262144 E=256 k=8", "impl": "fused full", "us": 95.0, "extra": {"T": T, "E": 256, "k": K}},
        {"shape": "T=262144 E=256 k=8", "impl": "deepspeed topkgating", "us": None, "error": "OutOfMemoryError"},
    ]
    _bench(work / "router.json", "router", router)
    layer_extra = {"T": 16384, "d": 2048, "f": 768, "E": 128, "k": 8}
    _bench(
        work / "layer.json",
        "moe_layer",
        [
            {
                "shape": "fine-grained",
                "impl": "moe.kernels + grouped_mm",
                "us": 8000.0,
                "metric": 463.0,
                "metric_name": "TFLOP/s",
                "extra": layer_extra,
            },
            {
                "shape": "fine-grained",
                "impl": "loop over experts",
                "us": 2e5,
                "metric": 17.0,
                "metric_name": "TFLOP/s",
                "extra": layer_extra,
            },
        ],
    )
    (work / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels" name="test_a"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    (work / "train_triton.json").write_text(json.dumps({"steps": 50, "median_ms": 10.0}))
    (work / "versions.json").write_text("{not json")
    (work / "layer.log").write_text("x" * 10_000 + "END")
    lines = [
        ("versions", "ok", "0", "3", "90", "versions.json", "python3 gpu_check.py versions"),
        ("router", "ok", "0", "60", "150", "router.json", "python3 bench_router.py"),
        ("layer", "failed", "1", "70", "150", "layer.json", "python3 bench_moe_layer.py"),
        ("pytest_gpu", "ok", "1", "20", "150", "pytest_gpu.xml", "pytest -m gpu"),
        ("train_triton", "ok", "0", "40", "120", "train_triton.json", "python3 train.py"),
        ("train_torch", "timeout", "124", "120", "120", "train_torch.json", "python3 train.py"),
        ("router_sweep", "skipped", "", "", "120", "", "budget: 5s left"),
    ]
    (work / "steps.tsv").write_text("".join("\t".join(line) + "\n" for line in lines))
    return work


def test_report_records_every_outcome_and_checks_the_targets(tmp_path):
    report = gpu_check.build_report(_work(tmp_path), "gpu")
    json.dumps(report, allow_nan=False)
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["status"] for s in report["steps"]] == ["ok", "ok", "failed", "ok", "ok", "timeout", "skipped"]
    assert "unreadable" in steps["versions"]["result"]  # a malformed result is recorded, not raised
    assert steps["layer"]["log_tail"].endswith("END") and len(steps["layer"]["log_tail"]) == gpu_check.LOG_TAIL
    assert steps["train_torch"]["result"] is None and steps["train_torch"]["rc"] == 124

    router = {r["shape"]: r for r in report["summary"]["router"]}
    r64, r256 = router["T=262144 E=64 k=8"], router["T=262144 E=256 k=8"]
    assert r64["meets_target"] and r64["best_fused_full_us"] == 30.0 and r64["target_us"] == 40.0
    assert r64["meets_target_without_graph"]  # 38 us without the CUDA graph
    assert (r64["best_sweep"], r64["best_sweep_us"]) == ("triton block_t=8 bitonic", 19.0)
    assert r64["x_vs_eager_full"] == pytest.approx(1883 / 38) and r64["launches"] == 13
    assert r64["floor_us_at_4200GBps"] == pytest.approx(19.1, abs=0.01)
    assert not r256["meets_target"] and r256["errors"] == {"deepspeed topkgating": "OutOfMemoryError"}
    (layer,) = report["summary"]["layer"]
    assert layer["meets_target"] and layer["best_project"] == 463.0
    pt = report["summary"]["pytest_gpu"]
    assert (pt["tests"], pt["failures"], pt["skipped"], pt["passed"]) == (4, 1, 1, 2)
    assert pt["failed"] == ["tests.test_kernels::test_a"]
    assert report["summary"]["train"]["triton"]["median_ms"] == 10.0
    assert "torch_over_triton" not in report["summary"]["train"]


def test_report_without_any_step(tmp_path):
    report = gpu_check.build_report(tmp_path, "cpu")
    assert report["steps"] == [] and report["summary"]["router"] == []
    gpu_check.print_summary(report)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@pytest.mark.parametrize("env", [{"GPU_CHECK_STEPS": "none"}, {"GPU_CHECK_BUDGET_S": "30"}], ids=["none", "budget"])
def test_script_writes_its_json_when_every_step_is_skipped(tmp_path, env):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)],
        env={**os.environ, "PYTHON": sys.executable, "OUT": "", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and (out / "gpu_check.log").exists()
    names = [s["name"] for s in report["steps"]]
    assert names == [
        "install",
        "versions",
        "ceilings",
        "router",
        "router_ds",
        "layer",
        "pytest_gpu",
        "train_triton",
        "train_torch",
        "router_sweep",
    ]
    assert all(s["status"] == "skipped" for s in report["steps"])
    why = "not in GPU_CHECK_STEPS" if "GPU_CHECK_STEPS" in env else "budget"
    assert all(why in s["cmd"] for s in report["steps"][1:])
