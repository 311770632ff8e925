"""The Python half of ``benchmarks/gpu_check.sh``: versions, ceilings, the kernels' traffic model and the JSON report.

    python benchmarks/gpu_check.py versions --json PATH      # GPU, driver, CUDA and package versions
    python benchmarks/gpu_check.py ceilings --json PATH      # device-to-device copy GB/s, bf16 matmul TFLOP/s
    python benchmarks/gpu_check.py traffic [--sms 132]       # the README's bytes/launches table (no GPU needed)
    python benchmarks/gpu_check.py report --work DIR --out PATH [--mode gpu|cpu]

``report`` reads what gpu_check.sh left in its work directory (``steps.tsv``: one line per step, name, status,
exit code, seconds, limit, result file, command; ``<step>.log``; each step's JSON or JUnit XML) and writes one
JSON file: environment, ceilings, a summary against the issue's targets and every step's full result. A step that
failed, timed out or was skipped is recorded as such with the end of its log; nothing here raises on a missing or
malformed result. Only ``versions`` and ``ceilings`` import torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

H200_COPY_GBPS = 4200.0  # ../shared/reference: measured device-to-device copy, 4,226 GB/s (bytes read + written)
ROUTER_TARGETS_US = {64: 40.0, 256: 80.0}  # issue 14: T=262,144, k=8
LAYER_TARGET_TFLOPS = 450.0  # issue 14: MoE layer forward + backward, fine-grained, bf16
TARGET_T, TARGET_K = 262_144, 8
LOG_TAIL = 4000  # characters of each step's log kept in the JSON


# ---------------------------------------------------------------------------------------------------------------
# versions and ceilings (the only parts that import torch)
# ---------------------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a fact to record
        return f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"
    return getattr(mod, "__version__", "unknown")


def versions() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    for name, module in [
        ("triton", "triton"),
        ("lightning", "lightning"),
        ("deepspeed", "deepspeed"),
        ("hydra", "hydra"),
        ("omegaconf", "omegaconf"),
        ("wandb", "wandb"),
        ("pydantic", "pydantic"),
        ("transformers", "transformers"),
        ("numpy", "numpy"),
    ]:
        env[name] = _version(module)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line]
        if rows and len(rows[0]) == 4:
            env |= {"nvidia_smi_gpu": rows[0][0], "driver": rows[0][1], "nvidia_smi_memory": rows[0][2]}
            env["max_sm_clock"] = rows[0][3]
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        cuda_line = next((line for line in smi.splitlines() if "CUDA Version" in line), "")
        if cuda_line:
            env["driver_cuda_version"] = cuda_line.split("CUDA Version:")[1].split("|")[0].strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["driver"] = f"nvidia-smi unavailable: {type(exc).__name__}"
    return env


def _median_time_s(fn, reps: int, cuda: bool) -> float:
    import torch

    fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(cuda: bool) -> dict:
    """Device-to-device copy (bytes read + written, as ../shared/reference counts them) and a bf16 matmul on random
    data. On the CPU, small sizes: this only checks the code."""
    import torch

    device = "cuda" if cuda else "cpu"
    nbytes = 2 * 2**30 if cuda else 64 * 2**20
    buffers = [torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)]
    buffers.append(torch.empty_like(buffers[0]))
    copy_s = _median_time_s(lambda: buffers[1].copy_(buffers[0]), 20 if cuda else 3, cuda)
    buffers.clear()  # free the 4 GiB before the matmul
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_s = _median_time_s(lambda: a @ b, 20 if cuda else 3, cuda)
    return {
        "device": device,
        "copy_bytes": nbytes,
        "copy_GBps": 2 * nbytes / copy_s / 1e9,
        "matmul_n": n,
        "bf16_matmul_TFLOPs": 2 * n**3 / mm_s / 1e12,
    }


# ---------------------------------------------------------------------------------------------------------------
# traffic model of the Triton kernels (README "Kernels"); read off moe/kernels/triton_router.py, triton_permute.py
# ---------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def router_programs(T: int, E: int, sms: int) -> int:
    """Programs of ``_router_fwd_kernel``: ``_tiles`` (1024-logit tiles, 2048 from E=512) and ``_rows_per_program``
    (about 8 programs per SM)."""
    block_e = _pow2(E)
    block_t = max(1, min(128, (2048 if block_e >= 512 else 1024) // block_e))
    rpp = block_t * max(1, _cdiv(_cdiv(T, block_t), 8 * sms))
    return _cdiv(T, rpp)


def slot_blocks(S: int, E: int, sms: int) -> int:
    """Blocks B of the slot-position kernels (``_slot_tiles``: one-hot chunks of 8192 int32, about 4 blocks per SM)."""
    chunk = max(16, 8192 // _pow2(E))
    chunks = max(1, _cdiv(_cdiv(S, chunk), 4 * sms))
    return _cdiv(S, chunk * chunks)


def kernel_traffic(T: int, E: int, k: int, logit_bytes: int = 2, D: int = 2048, x_bytes: int = 2, sms: int = 132):
    """Per kernel: DRAM bytes (each input read once, each output written once, per launch), launches, and notes.

    Convention: a kernel's bytes are its distinct inputs and outputs; re-reads inside one kernel that the caches
    serve (rows per D tile, grad_out per choice) and the atomics, which resolve in L2, are listed, not counted.
    Launches count every kernel the launcher puts on the stream, ``torch.zeros`` fills included.
    """
    S = T * k
    tk4 = T * k * 4  # one [T, k] fp32 or int32 tensor
    P = router_programs(T, E, sms)
    B = slot_blocks(S, E, sms)
    rows = []

    def add(name, launches, parts, note=""):
        rows.append({"kernel": name, "launches": launches, "bytes": sum(parts.values()), "parts": parts, "note": note})

    add(
        "router forward (_router_fwd_kernel)",
        3,
        {"logits": T * E * logit_bytes, "weights": tk4, "ids": tk4, "lse": T * 4, "counts+prob_sums": 2 * E * 4},
        f"+2 torch.zeros fills (counts, prob_sums); {P} programs x {E} experts x 2 = {P * E * 2} L2 atomics",
    )
    add(
        "slot positions (slot_rows: histogram, block scan, rows)",
        3,
        {
            "ids (histogram)": S * 4,
            "hist w+r": 2 * B * E * 4,
            "base w+r": 2 * B * E * 4,
            "ids (rows)": S * 4,
            "rows": S * 4,
            "counts": E * 4,
        },
        f"B = {B} slot blocks; ids read twice (once per pass)",
    )
    add(
        "loss scalars (aux, z) in torch",
        7,
        {"lse.square() r+w": 2 * T * 4, "mean": T * 4 + 4, "aux [E] ops": 8 * E * 4 + 12},
        "one launch per torch op: counts.float(), / (T*k), prob_sums / T, dot, E *; lse.square(), mean()",
    )
    add(
        "router backward (_router_bwd_kernel)",
        1,
        {
            "logits": T * E * logit_bytes,
            "lse": T * 4,
            "grad_weights": tk4,
            "weights": tk4,
            "ids": tk4,
            "grad_lse": T * 4,
            "grad_prob_sums": E * 4,
            "grad_logits": T * E * logit_bytes,
        },
        "all three gradients present (training with aux and z losses)",
    )
    permute_scatter = {"x": T * D * x_bytes, "rows": S * 4, "x_sorted": S * D * x_bytes}
    add(
        "permute (_scatter_rows_kernel)",
        1,
        permute_scatter,
        f"after slot_rows; rows re-read per D tile ({_cdiv(D, 512)})",
    )
    add(
        "unpermute (_gather_rows_kernel)",
        1,
        {"y_sorted": S * D * x_bytes, "rows": S * 4, "weights": tk4, "out": T * D * x_bytes},
        "fp32 accumulation in registers",
    )
    add(
        "permute backward (_gather_rows_kernel, unweighted)",
        1,
        {"grad_x_sorted": S * D * x_bytes, "rows": S * 4, "grad_x": T * D * x_bytes},
    )
    add(
        "unpermute backward (_unpermute_bwd_kernel)",
        1,
        {
            "grad_out": T * D * x_bytes,
            "y_sorted": S * D * x_bytes,
            "weights": tk4,
            "rows": S * 4,
            "grad_y_sorted": S * D * x_bytes,
            "grad_weights": tk4,
        },
        f"grad_out re-read once per choice (k={k}) from cache",
    )
    return rows


def router_full_floor(T: int, E: int, k: int, logit_bytes: int = 2, sms: int = 132) -> tuple[int, int]:
    """(bytes, launches) of what ``bench_router.py`` times as "fused full": router forward + slot positions + the
    aux and z scalars."""
    rows = kernel_traffic(T, E, k, logit_bytes, sms=sms)[:3]
    return sum(r["bytes"] for r in rows), sum(r["launches"] for r in rows)


def traffic_table(sms: int = 132, gbps: float = H200_COPY_GBPS) -> str:
    lines = []
    for E in (64, 256):
        target = ROUTER_TARGETS_US[E]
        lines.append(f"\nT={TARGET_T} E={E} k={TARGET_K}, bf16 logits, D=2048 bf16 rows, {sms} SMs, {gbps:.0f} GB/s")
        for r in kernel_traffic(TARGET_T, E, TARGET_K, sms=sms):
            us = r["bytes"] / (gbps * 1e3)
            lines.append(f"  {r['kernel']:<58} {r['launches']:>2} launches {r['bytes']:>15,} B {us:>10.2f} us")
            lines.append(f"      {r['parts']}  {r['note']}")
        b, n = router_full_floor(TARGET_T, E, TARGET_K, sms=sms)
        floor = b / (gbps * 1e3)
        lines.append(
            f"  fused full: {n} launches, {b:,} B, floor {floor:.2f} us; target {target:.0f} us = {target / floor:.2f}x"
            " the floor"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {str(exc)[:200]}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ][:50]
    return out


def _result(path: Path):
    if not path.name or not path.exists():
        return None
    return _junit(path) if path.suffix == ".xml" else _read_json(path)


def read_steps(work: Path) -> list[dict]:
    """``steps.tsv`` rows -> step records with their parsed results and log tails."""
    steps = []
    tsv = work / "steps.tsv"
    lines = tsv.read_text().splitlines() if tsv.exists() else []
    for line in lines:
        fields = line.split("\t")
        if len(fields) < 7:
            continue
        name, status, rc, seconds, limit, result_file, cmd = fields[:7]
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace")[-LOG_TAIL:] if log.exists() else ""
        steps.append(
            {
                "name": name,
                "status": status,
                "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                "seconds": float(seconds) if seconds else None,
                "limit_s": int(limit) if limit.isdigit() else None,
                "cmd": cmd,
                "result": _result(work / result_file) if result_file else None,
                "log_tail": tail,
            }
        )
    return steps


def _bench_rows(step: dict | None) -> list[dict]:
    result = (step or {}).get("result")
    rows = result.get("results") if isinstance(result, dict) else None
    return rows if isinstance(rows, list) else []


def _by_shape(step: dict | None) -> dict[str, dict[str, dict]]:
    """A benchmark step's rows as ``{shape: {impl: row}}``."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in _bench_rows(step):
        by_shape.setdefault(r.get("shape", "?"), {})[r.get("impl", "?")] = r
    return by_shape


def summarize_router(step: dict | None, copy_gbps: float | None, sms: int) -> list[dict]:
    """Per shape: the fused path against the in-process baselines, and at the target shapes against the targets
    and the README's byte floor."""
    out = []
    for shape, impls in _by_shape(step).items():
        extra = next(iter(impls.values())).get("extra") or {}
        T, E, k = extra.get("T"), extra.get("E"), extra.get("k")
        us = {name: r.get("us") for name, r in impls.items()}
        row = {"shape": shape, "us": us, "errors": {n: r.get("error") for n, r in impls.items() if r.get("error")}}
        ours = us.get("fused full")
        sweep = {n: u for n, u in us.items() if n.startswith("triton block_t=") and u}
        if sweep:
            row["best_sweep"] = min(sweep, key=sweep.get)
            row["best_sweep_us"] = sweep[row["best_sweep"]]
        for base in ("eager full", "compiled full", "eager softmax_topk", "deepspeed topkgating"):
            if ours and us.get(base):
                row[f"x_vs_{base.replace(' ', '_')}"] = us[base] / ours
        if (T, k) == (TARGET_T, TARGET_K) and E in ROUTER_TARGETS_US and isinstance(T, int):
            elt = {"bf16": 2, "fp16": 2, "fp32": 4}.get(extra.get("dtype"), 2)
            floor_bytes, launches = router_full_floor(T, E, k, elt, sms)
            best = min((u for n, u in us.items() if n.startswith("fused full") and u), default=None)
            row |= {
                "target_us": ROUTER_TARGETS_US[E],
                "best_fused_full_us": best,
                "meets_target": best is not None and best <= ROUTER_TARGETS_US[E],
                "meets_target_without_graph": bool(ours) and ours <= ROUTER_TARGETS_US[E],
                "floor_bytes": floor_bytes,
                "launches": launches,
                "floor_us_at_4200GBps": floor_bytes / (H200_COPY_GBPS * 1e3),
            }
            if copy_gbps:
                row["floor_us_at_measured_copy"] = floor_bytes / (copy_gbps * 1e3)
            if best:
                row["best_over_floor"] = best / (floor_bytes / ((copy_gbps or H200_COPY_GBPS) * 1e3))
        out.append(row)
    return out


def summarize_layer(step: dict | None) -> list[dict]:
    out = []
    for shape, impls in _by_shape(step).items():
        extra = next(iter(impls.values())).get("extra") or {}
        tflops = {n: r.get("metric") for n, r in impls.items()}
        ours = {n: v for n, v in tflops.items() if n.startswith("moe.") and v}
        row = {"shape": shape, "metric": next(iter(impls.values())).get("metric_name"), "by_impl": tflops}
        row["errors"] = {n: r.get("error") for n, r in impls.items() if r.get("error")}
        if ours:
            best = max(ours, key=ours.get)
            row |= {"best_project_impl": best, "best_project": ours[best]}
        fine = (extra.get("d"), extra.get("f"), extra.get("E"), extra.get("k")) == (2048, 768, 128, 8)
        if fine and row.get("metric") == "TFLOP/s":
            row |= {"target_TFLOPs": LAYER_TARGET_TFLOPS, "meets_target": (row.get("best_project") or 0) >= 450}
        out.append(row)
    return out


def summarize_train(steps: dict[str, dict]) -> dict:
    out = {}
    for impl in ("triton", "torch"):
        step = steps.get(f"train_{impl}")
        result = (step or {}).get("result")
        out[impl] = {"status": (step or {}).get("status")}
        if isinstance(result, dict):
            out[impl] |= {k: result.get(k) for k in ("steps", "median_ms", "mean_ms", "first_ms", "tokens_per_s")}
    a, b = out["triton"].get("median_ms"), out["torch"].get("median_ms")
    if a and b:
        out["torch_over_triton"] = b / a
    return out


def build_report(work: Path, mode: str, meta: dict | None = None) -> dict:
    steps = read_steps(work)
    by_name = {s["name"]: s for s in steps}
    env = (by_name.get("versions") or {}).get("result") or {}
    ceil = (by_name.get("ceilings") or {}).get("result") or {}
    copy_gbps = ceil.get("copy_GBps") if mode == "gpu" and isinstance(ceil, dict) else None
    sms = env.get("sm_count") if isinstance(env.get("sm_count"), int) else 132
    summary = {
        "steps": {s["name"]: s["status"] for s in steps},
        "router": summarize_router(by_name.get("router"), copy_gbps, sms)
        + summarize_router(by_name.get("router_ds"), copy_gbps, sms),
        "router_sweep": summarize_router(by_name.get("router_sweep"), copy_gbps, sms),
        "layer": summarize_layer(by_name.get("layer")),
        "pytest_gpu": (by_name.get("pytest_gpu") or {}).get("result"),
        "train": summarize_train(by_name),
    }
    return {
        "schema": "gpu_check/1",
        "mode": mode,
        **(meta or {}),
        "gpu": env.get("gpu"),
        "env": env,
        "ceilings": ceil,
        "summary": summary,
        "steps": steps,
    }


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def print_summary(report: dict) -> None:
    s = report["summary"]
    env = report.get("env") or {}
    print(
        f"\n== gpu_check ({report['mode']}): {env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, deepspeed {env.get('deepspeed')}, driver {env.get('driver')}"
    )
    print("steps: " + ", ".join(f"{n}={st}" for n, st in s["steps"].items()))
    ceil = report.get("ceilings") or {}
    if ceil.get("copy_GBps"):
        print(
            f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s"
        )
    for row in s["router"]:
        us = row["us"]
        line = (
            f"router {row['shape']}: fused full {_fmt(us.get('fused full'))} us (graph "
            f"{_fmt(us.get('fused full (CUDA graph)'))}), router only {_fmt(us.get('fused router'))}, eager full "
            f"{_fmt(us.get('eager full'))}, compiled {_fmt(us.get('compiled full'))}, deepspeed "
            f"{_fmt(us.get('deepspeed topkgating'))}"
        )
        if "best_sweep" in row:
            line += f" | sweep best: {row['best_sweep']} {row['best_sweep_us']:.1f} us"
        if "target_us" in row:
            line += (
                f" | target {row['target_us']:.0f} us: {'MET' if row['meets_target'] else 'missed'}, floor "
                f"{_fmt(row.get('floor_us_at_measured_copy', row['floor_us_at_4200GBps']), '.1f')} us"
            )
        print(line)
    for row in s["layer"]:
        vals = ", ".join(f"{n} {_fmt(v)}" for n, v in row["by_impl"].items())
        tgt = f" | target 450: {'MET' if row['meets_target'] else 'missed'}" if "meets_target" in row else ""
        print(f"layer {row['shape']} ({row['metric']}): {vals}{tgt}")
    pt = s.get("pytest_gpu") or {}
    if isinstance(pt, dict) and "tests" in pt:
        print(
            f"pytest -m gpu: {pt['passed']} passed, {pt['failures']} failed, {pt['errors']} errors, "
            f"{pt['skipped']} skipped"
        )
    tr = s["train"]
    steps = tr["triton"].get("steps") or tr["torch"].get("steps") or 0
    print(
        f"train ({steps} steps), median step: triton {_fmt(tr['triton'].get('median_ms'), '.2f')} ms, torch "
        f"{_fmt(tr['torch'].get('median_ms'), '.2f')} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--json", required=True)
    p = sub.add_parser("ceilings")
    p.add_argument("--json", required=True)
    p.add_argument("--cpu", action="store_true")
    p = sub.add_parser("traffic")
    p.add_argument("--sms", type=int, default=132)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--started", default=None)
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None)
    args = parser.parse_args(argv)

    if args.cmd == "versions":
        Path(args.json).write_text(json.dumps(versions(), indent=1))
    elif args.cmd == "ceilings":
        import torch

        cuda = torch.cuda.is_available() and not args.cpu
        Path(args.json).write_text(json.dumps(ceilings(cuda), indent=1))
    elif args.cmd == "traffic":
        print(traffic_table(args.sms))
    else:
        meta = {
            "started": args.started,
            "wall_s": args.wall_s,
            "budget_s": args.budget_s,
            "host": platform.node(),
            "out_dir_env": os.environ.get("OUT"),
        }
        report = build_report(Path(args.work), args.mode, meta)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_strict(report), indent=1, default=str, allow_nan=False))
        print_summary(report)
        print(f"\nwrote {out}")


def _strict(obj):
    """Plain JSON: NaN and infinities (a benchmark dividing by a zero time) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
