"""Merge speed and peak memory: this package vs mergekit, each method as a whole process.

    python benchmarks/bench_merge.py                       # full size: base + 4 x 220M-param bf16 checkpoints
    python benchmarks/bench_merge.py --scale 0.05          # ~11M params each, a quick check of the script
    python benchmarks/bench_merge.py --dir /data/fixture   # keep (and reuse) the fixture there
    python benchmarks/bench_merge.py --methods ties,dare_ties --repeat 3

The fixture matches shared/tools/make_merge_fixture.py without needing transformers: HF Llama tensor names and
shapes (hidden 1024, 12 layers, intermediate 2816, vocab 32000, untied head; ``--scale`` shrinks hidden size and
vocabulary), weights N(0, 0.02) and unit norms in bf16, and each fine-tune = base + N(0, (2e-3 (std + 1e-3))^2)
on a random 30% of the entries. Settings follow the mergekit baseline in shared/reference/README.md: fp32 compute,
bf16 output, density 0.2 (della epsilon 0.07), lambda 1, per-tensor trimming as mergekit does (``ties`` is also
timed with the TIES paper's whole-model scope as ``ties_global``). Each run is a fresh process; peak RSS comes from
``getrusage(RUSAGE_CHILDREN)`` in a wrapper process that starts only that run. When mergekit is installed
(``mergekit-yaml`` on PATH) it runs on the same files and the ratios are printed; the page cache is warmed by one
untimed read of every input first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (our method, params, mergekit merge_method, mergekit per-model parameters)
METHODS = {
    "task_arithmetic": ("task_arithmetic", {"lam": 1.0}, "task_arithmetic", {"weight": 1.0}),
    "dare_ties": ("dare", {"drop": 0.8, "combine": "ties", "lam": 1.0}, "dare_ties", {"weight": 1.0, "density": 0.2}),
    "ties": ("ties", {"density": 0.2, "scope": "tensor"}, "ties", {"weight": 1.0, "density": 0.2}),
    "ties_global": ("ties", {"density": 0.2, "scope": "global"}, None, None),
    "della": (
        "della",
        {"density": 0.2, "epsilon": 0.07, "lam": 1.0},
        "della",
        {"weight": 1.0, "density": 0.2, "epsilon": 0.07},
    ),  # fmt: skip
}
# timed only when named in --methods (mergekit 0.1.5 has no STAR; the whole-tensor settings take minutes)
EXTRA = {
    "star": ("star", {}, None, None),
    "star_gram": ("star", {"svd": "gram"}, None, None),
    "della_tensor": ("della", {"density": 0.2, "epsilon": 0.07, "lam": 1.0, "scope": "tensor"}, None, None),
}


def llama_shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    inter = int(hidden * 2.75) // 64 * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_fixture(out: Path, n: int, scale: float) -> int:
    """Write ``out/base`` and ``out/ft{i}`` (model.safetensors + config.json); returns the parameter count."""
    from safetensors.torch import save_file

    root = math.sqrt(scale)
    hidden, layers, vocab = max(64, round(1024 * root / 64) * 64), 12, max(256, int(32000 * root))
    shapes = llama_shapes(hidden, layers, vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": int(hidden * 2.75) // 64 * 64, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    base = {
        k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        for k, s in shapes.items()
    }
    for i, name in enumerate(["base", *(f"ft{j}" for j in range(n))]):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        if name == "base":
            tensors = base
        else:
            gi = torch.Generator().manual_seed(100 + i)
            tensors = {}
            for k, v in base.items():
                vf = v.float()
                delta = torch.randn(v.shape, generator=gi) * 2e-3 * (vf.std() + 1e-3)
                keep = torch.rand(v.shape, generator=gi) < 0.3
                tensors[k] = (vf + delta * keep).to(torch.bfloat16)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return sum(math.prod(s) for s in shapes.values())


WRAPPER = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(f"{rc.returncode} {wall} {rss}")
sys.stderr.write(rc.stderr[-2000:])
"""


def timed(cmd: list[str], env: dict, out: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd`` run as its own process, writing to a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)  # both tools start from an empty output (deleting is not merging)
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    rc, wall, rss = proc.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr}")
    return float(wall), int(rss)


def ours(fix: Path, out: Path, n: int, method: str, params: dict) -> list[str]:
    """Our CLI, ``python -m merging`` (the counterpart of ``mergekit-yaml``), without Hydra's run folder and logs."""
    models = ",".join(str(fix / f"ft{i}") for i in range(n))
    overrides = [f"method={method}", f"base={fix / 'base'}", f"models=[{models}]", f"out={out}", "out_dtype=bfloat16",
                 "overwrite=true", "progress=false", "hydra.output_subdir=null", f"hydra.run.dir={out.parent}",
                 "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]  # fmt: skip
    return [sys.executable, "-m", "merging", *overrides, *(f"method.{k}={v}" for k, v in params.items())]


def mergekit(fix: Path, out: Path, n: int, method: str, per_model: dict, work: Path) -> list[str]:
    lines = [f"merge_method: {method}", f"base_model: {fix / 'base'}", "models:"]
    for i in range(n):
        lines += [f"  - model: {fix / f'ft{i}'}", "    parameters:"]
        lines += [f"      {k}: {v}" for k, v in per_model.items()]
    lines += ["parameters:", "  lambda: 1.0", "dtype: float32", "out_dtype: bfloat16"]
    cfg = work / f"{method}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    return [shutil.which("mergekit-yaml"), str(cfg), str(out), "--no-copy-tokenizer"]


def warm(fix: Path) -> None:
    for f in fix.glob("*/model.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="fixture directory (default: a temporary one)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 220M parameters per checkpoint")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"also: {', '.join(EXTRA)}")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (the best is reported)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: unset)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    fix = args.dir or tmp / "fixture"
    try:
        if not (fix / f"ft{args.models - 1}" / "model.safetensors").exists():
            t = time.perf_counter()
            params = build_fixture(fix, args.models, args.scale)
            print(f"fixture: {params / 1e6:.1f}M params x {args.models + 1} checkpoints in {fix} "
                  f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
        warm(fix)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        has_mk = shutil.which("mergekit-yaml") is not None and not args.no_mergekit
        rows = []
        for name in args.methods.split(","):
            method, params, mk_method, mk_params = {**METHODS, **EXTRA}[name]
            cmd = ours(fix, tmp / "out", args.models, method, params)
            best = min((timed(cmd, env, tmp / "out") for _ in range(args.repeat)), key=lambda r: r[0])
            row = {"method": name, "ours_s": best[0], "ours_rss_gb": best[1] / 1e9}
            if has_mk and mk_method:
                mk = min((timed(mergekit(fix, tmp / "mk", args.models, mk_method, mk_params, tmp), env, tmp / "mk")
                          for _ in range(args.repeat)), key=lambda r: r[0])  # fmt: skip
                row.update(mergekit_s=mk[0], mergekit_rss_gb=mk[1] / 1e9, speedup=mk[0] / best[0])
            rows.append(row)
            print(json.dumps(row))
        print()
        mk_head = " mergekit (s) | mergekit RSS (GB) | speed-up |" if has_mk else ""
        print(f"| method | ours (s) | ours peak RSS (GB) |{mk_head}")
        print(f"|---|---:|---:|{'---:|---:|---:|' if has_mk else ''}")
        for r in rows:
            mk = (f" {r['mergekit_s']:.1f} | {r['mergekit_rss_gb']:.2f} | {r['speedup']:.1f}x |"
                  if "mergekit_s" in r else (" - | - | - |" if has_mk else ""))  # fmt: skip
            print(f"| {r['method']} | {r['ours_s']:.1f} | {r['ours_rss_gb']:.2f} |{mk}")
        if not has_mk:
            print("\nmergekit-yaml not found: no side-by-side run (pip install mergekit to compare).")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
