"""Render a finished run's routing report without wandb: ``python -m moe.report RUN_DIR [--out DIR]``.

Reads ``RUN_DIR/routing/stats.jsonl`` (written by ``moe.callbacks.RoutingStatsCallback``) and writes into
``RUN_DIR/report/`` (or ``--out``):

- ``load_layer{i}.png``: each expert's share of the routed slots on the last validation (else training) record;
- ``load_over_training_layer{i}.png``: step x expert shares over the training records;
- ``expert_task_layer{i}.png`` / ``expert_token_class_layer{i}.png``: expert x task (x token class) shares, summed
  over training;
- ``loss.png``, ``accuracy.png`` (tasks) or ``bits_per_byte.png`` (text): the logged curves;
- ``report.md``: a per-layer table of the last balance metrics, warnings (dead experts, a dominant expert) and the
  pictures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from moe.report import plots

# picture name, the logged keys it draws, its y label
CURVES = (("loss", ("train/loss", "val/loss"), "loss"),
          ("accuracy", ("val/mean_accuracy", "train/exact_match"), "accuracy"),
          ("bits_per_byte", ("train/bpb", "val/bpb"), "bits per byte"))  # fmt: skip


def metric_series(metric_rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged scalar over the ``"kind": "metrics"`` records, one point per step. A
    ``train/`` or ``val/`` key is read from the records of its own split only (the others carry its last value)."""
    split = key.split("/", 1)[0]
    rows = [r for r in metric_rows if r.get("split") == split] if split in ("train", "val") else metric_rows
    points = {r["step"]: r["values"][key] for r in rows if key in r["values"]}
    return sorted(points), [points[s] for s in sorted(points)]


def read_stats(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "routing" / "stats.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no routing statistics; train with the RoutingStatsCallback (callbacks.routing_stats) enabled"
        )
    lines, rows = path.read_text().splitlines(), []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from e
    return rows


def _save(fig, path: Path) -> str:
    fig.savefig(path)
    return path.name


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNGs and ``report.md`` into ``out`` (default ``RUN_DIR/report``) under the output policy
    (``moe_merge_common.outputs``): a new or empty directory, or an earlier report of ours, replaced as a whole;
    never one holding other files or the run's statistics. Returns the report's path."""
    from moe_merge_common.outputs import check_output, output_lock, write_staged

    run_dir = Path(run_dir)
    rows = read_stats(run_dir)  # read (and refused) before anything is created
    target = check_output(out if out is not None else run_dir / "report", [run_dir / "routing" / "stats.jsonl"],
                          overwrite=True, key="--out")  # fmt: skip
    created = not target.exists()
    try:
        with output_lock(target, key="--out"):
            return write_staged(target, lambda stage: _write_report(run_dir, rows, stage))
    finally:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()


def _write_report(run_dir: Path, rows: list[dict], out: Path) -> Path:
    layers: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if "layer" in r:
            layers[r["layer"]].append(r)
    metric_rows = [r for r in rows if r.get("kind") == "metrics"]
    md = [f"# Routing report: `{run_dir}`", ""]
    table = ["| layer | kind | split | step | eff. experts | max/mean | cv | dead | entropy | I(expert; task) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    notes, pictures = [], []
    for i in sorted(layers):
        recs = layers[i]
        train = [r for r in recs if r["split"] == "train"]
        last = next((r for r in reversed(recs) if r["split"] == "val"), recs[-1])
        m = last["metrics"]
        pre = "argmax_" if last["kind"] == "smear" else ""

        def fmt(key, m=m, pre=pre):
            v = m.get(pre + key, m.get(key))
            return "" if v is None else f"{v:.3g}"

        cells = [fmt(k) for k in ("eff_experts", "max_mean", "cv", "dead_frac", "entropy", "mi_task")]
        table.append(f"| {i} | {last['kind']} | {last['split']} | {last['step']} | " + " | ".join(cells) + " |")
        if "load" in last:
            load = np.asarray(last["load"], dtype=float)
            share = load / max(load.sum(), 1e-12)
            dead = np.flatnonzero(load == 0).tolist()
            if dead:
                notes.append(f"- layer {i}: experts {dead} got no tokens on the last {last['split']} record")
            if share.max() > 0.5:
                notes.append(f"- layer {i}: expert {int(share.argmax())} took {share.max():.0%} of the slots "
                             "(collapse?)")  # fmt: skip
            pictures.append(_save(plots.load_bars(load, f"layer {i}: load ({last['split']}, step {last['step']})"),
                                   out / f"load_layer{i}.png"))  # fmt: skip
        with_load = [r for r in train if "load" in r]
        if with_load:
            fig = plots.load_over_training([r["step"] for r in with_load], np.asarray([r["load"] for r in with_load]),
                                           f"layer {i}: load over training")  # fmt: skip
            pictures.append(_save(fig, out / f"load_over_training_layer{i}.png"))
        for key, names_key, label, fname in (("joint", "task", "task", "expert_task"),
                                             ("classes", "class", "token class", "expert_token_class")):  # fmt: skip
            mats = [np.asarray(r[key]) for r in train if key in r] or [np.asarray(r[key]) for r in recs if key in r]
            if mats:
                total = np.sum(mats, axis=0)
                names = last.get(f"{names_key}_names") or [f"{names_key}{j}" for j in range(total.shape[1])]
                fig = plots.heatmap(total, [f"e{e}" for e in range(total.shape[0])], names,
                                    f"layer {i}: experts per {label}", label, "expert")  # fmt: skip
                pictures.append(_save(fig, out / f"{fname}_layer{i}.png"))
    for name, keys, ylabel in CURVES:
        series = {key: metric_series(metric_rows, key) for key in keys}
        series = {key: pts for key, pts in series.items() if pts[0]}
        if series:
            pictures.append(_save(plots.curves(series, name, ylabel), out / f"{name}.png"))
    md += ["## Balance per layer (last record)", "", *table, ""]
    md += ["## Warnings", "", *(notes or ["- none"]), ""]
    md += ["## Pictures", "", *[f"![{p}]({p})" for p in pictures], ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run's directory (holds routing/stats.jsonl)")
    parser.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        print(render(args.run_dir, args.out))
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing or malformed run: one line, status 1
        what = f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, TypeError)) else str(e)
        print(f"Error: {what}\nHint: python -m moe.report RUN_DIR, where RUN_DIR holds routing/stats.jsonl from "
              "python train.py", file=sys.stderr)  # fmt: skip
        sys.exit(1)
