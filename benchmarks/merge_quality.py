"""Merged-model quality on the embedded tasks: every method at its paper defaults, N = 2, 4, 6 fine-tunes.

    python benchmarks/merge_quality.py                        # ~2.5 min on the idle 2-core VM (longer when shared)
    python benchmarks/merge_quality.py --out /tmp/mq.md       # the table file (default benchmarks/merge_quality.md)
    python benchmarks/merge_quality.py --base-steps 200 --ft-steps 40 --sizes 2   # a quick look
    python benchmarks/merge_quality.py --work /tmp/mq         # keep the trained models; a rerun only merges

1. A base MoE is trained briefly on all six tasks (``moe.train.run.run`` on a Hydra-composed ``train.yaml``).
2. One fine-tune per task, each from the base on that task alone.
3. For N in ``--sizes``: the fine-tunes of the first N tasks of ``--tasks`` are merged with every method at its
   defaults (``merging.METHODS[m].params``), and the merged model is scored on the validation split.

Reported per method and N: normalized accuracy (the TIES / PCB / STAR papers' metric: the merged model's exact
match on each task divided by that task's own fine-tune's, averaged over the N tasks) and the absolute mean exact
match over the N tasks. The table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["copy", "sort", "reverse", "add", "lookup", "count"]


def train(out: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe.config import register_configs
    from moe.train.run import run

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"output_dir={out}"])
    return run(OmegaConf.to_object(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="keep the trained models here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "merge_quality.md")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sizes", default="2,4,6")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare,della,pcb,star")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning peak learning rate")
    ap.add_argument("--ft-wd", type=float, default=0.0, help="fine-tuning weight decay (decay moves every weight)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--val-per-task", type=int, default=200)
    args = ap.parse_args()

    import torch

    from merging import METHODS, merge
    from moe.adapters.moe_adapter import load_any as load_merged
    from moe.config import DataConfig
    from moe.data.tasks import build_splits
    from moe.train.evaluate import evaluate_tasks

    torch.set_num_threads(2)
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="merge_quality_"))
    tasks = args.tasks.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    common = [
        "model=tiny", f"model.d_model={args.d_model}", "model.n_layer=2", f"model.d_ff={args.d_model}",
        "logger=csv", "trainer.enable_progress_bar=false", "callbacks.rich_progress=false",
        "data.train_per_task=2000", "data.val_per_task=64", "data.batch_size=64", "trainer.log_every_n_steps=50",
    ]  # fmt: skip
    base_dir = work / "base" / "export"
    if not base_dir.exists():
        train(work / "base", [*common, f"trainer.max_steps={args.base_steps}", "optim.lr=0.01",
                              f"trainer.val_check_interval={args.base_steps}"])  # fmt: skip
    ft_dirs = {}
    for task in tasks[: max(sizes)]:
        ft_dirs[task] = work / f"ft_{task}" / "export"
        if not ft_dirs[task].exists():
            train(work / f"ft_{task}", [*common, "experiment=finetune", f"data.tasks=[{task}]",
                                        f"init_from={base_dir}", f"trainer.max_steps={args.ft_steps}",
                                        f"optim.lr={args.ft_lr}", f"optim.weight_decay={args.ft_wd}",
                                        "optim.warmup_steps=10",
                                        f"trainer.val_check_interval={args.ft_steps}"])  # fmt: skip
    _, val = build_splits(DataConfig(val_per_task=args.val_per_task))
    base_acc = evaluate_tasks(load_merged(base_dir), val)
    ft_acc = {t: evaluate_tasks(load_merged(d), val)[t] for t, d in ft_dirs.items()}
    rows = {}
    for n in sizes:
        chosen = tasks[:n]
        for method in methods:
            t0 = time.perf_counter()
            out = merge(base_dir, [ft_dirs[t] for t in chosen], work / "merged" / f"{method}_{n}", method=method,
                        overwrite=True, progress=False)  # fmt: skip
            acc = evaluate_tasks(load_merged(out.parent), val)
            learned = [t for t in chosen if ft_acc[t] > 0]  # a task no fine-tune solves has no normalized score
            norm = sum(acc[t] / ft_acc[t] for t in learned) / max(len(learned), 1)
            absolute = sum(acc[t] for t in chosen) / n
            rows.setdefault(method, {})[n] = (norm, absolute, {t: acc[t] for t in chosen})
            print(
                json.dumps(
                    {
                        "method": method,
                        "n": n,
                        "normalized": round(norm, 4),
                        "absolute": round(absolute, 4),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "per_task": rows[method][n][2],
                    }
                )
            )

    lines = [
        f"Merged-model quality: `python benchmarks/merge_quality.py` (tasks in order {', '.join(tasks)}; "
        f"base {args.base_steps} steps on all tasks, one fine-tune per task of {args.ft_steps} steps at lr "
        f"{args.ft_lr}, weight decay {args.ft_wd}; "
        f"d_model {args.d_model}, 2 layers, 4 experts; validation split, {args.val_per_task} examples per task).",
        "Normalized = merged exact match / the task's own fine-tune's, averaged over the N merged tasks (a task whose "
        "fine-tune scores 0 is left out of that average); absolute = mean exact match over the N tasks. Every method "
        "at its defaults.",
        "",
        "| method | " + " | ".join(f"N={n} normalized | N={n} absolute" for n in sizes) + " |",
        "|---|" + "---:|---:|" * len(sizes),
    ]
    for method in methods:
        defaults = {k: v for k, v in METHODS[method].params.items() if v.default is not None and k != "seed"}
        cells = " | ".join(f"{rows[method][n][0]:.1%} | {rows[method][n][1]:.1%}" for n in sizes)
        lines.append(f"| {method} ({', '.join(f'{k}={v.default}' for k, v in defaults.items())}) | {cells} |")

    def base_norm(n):
        learned = [t for t in tasks[:n] if ft_acc[t] > 0]
        return sum(base_acc[t] / ft_acc[t] for t in learned) / max(len(learned), 1)

    ref = " | ".join(f"{base_norm(n):.1%} | {sum(base_acc[t] for t in tasks[:n]) / n:.1%}" for n in sizes)
    lines.append(f"| base (no merge) | {ref} |")
    ind = " | ".join(f"100% | {sum(ft_acc[t] for t in tasks[:n]) / n:.1%}" for n in sizes)
    lines.append(f"| individual fine-tunes | {ind} |")
    lines.append("")
    lines.append(f"Fine-tune accuracy on its own task: {json.dumps({t: round(a, 3) for t, a in ft_acc.items()})}; "
                 f"base: {json.dumps({t: round(a, 3) for t, a in base_acc.items()})}. "
                 f"Total time {time.perf_counter() - start:.0f} s.")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
