"""The whole loop in one command: ``python train.py experiment=pipeline`` trains a base, fine-tunes it on each task,
merges the fine-tunes with ``merge.method``, evaluates everything and prints (and logs) the comparison table.

``python train.py -m experiment=pipeline merge.method=ties,dare,della,pcb,star`` compares methods: the base and
the fine-tunes are cached under ``merge.cache_dir``, keyed by a hash of the configuration that produced them, so
every job of the sweep trains them once and only merges and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path

from rich.table import Table

from moe.config import TrainConfig
from moe.export import atomic_write
from moe_merge_common.cli import table_console


def _key(*parts) -> str:
    blob = json.dumps([asdict(p) if is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _trained(cfg: TrainConfig, out: Path) -> dict:
    """``run(cfg)`` into the cache entry ``out``, or its earlier results when ``out`` holds a finished run
    (results.json). The entry is locked while it trains: a second pipeline needing it at the same time is refused,
    naming the first one's pid, instead of training into the same directory."""
    from moe.train.run import run
    from moe_merge_common.outputs import LOCK, output_lock

    with output_lock(out, key="merge.cache_dir entry"):
        results = out / "results.json"
        if results.is_file():
            return json.loads(results.read_text())
        for p in out.iterdir():  # an interrupted earlier attempt: start it over
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return run(replace(cfg, output_dir=str(out)))


def run_pipeline(cfg: TrainConfig) -> dict:
    """Base, fine-tunes, merge, evaluation; returns (and writes to ``pipeline.json``) the comparison."""
    from merging import merge
    from merging.evaluate import evaluate_paths

    p, out = cfg.merge, Path(cfg.output_dir)
    if not p.tasks:
        raise ValueError("merge.tasks: expected at least one task to fine-tune on (and merge)")
    cache = Path(p.cache_dir).expanduser().resolve()
    base_cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=p.base_steps), init_from=None)
    key = _key(base_cfg.model, base_cfg.router, base_cfg.data, base_cfg.optim, p.base_steps, cfg.seed)
    base_dir = cache / f"base-{key}"
    console = table_console()
    console.print(f"[bold]pipeline[/bold]: base -> {base_dir}")
    base = _trained(base_cfg, base_dir)
    fine_tunes = []
    for task in p.tasks:
        ft_cfg = replace(
            cfg,
            data=replace(cfg.data, tasks=[task], eval_tasks=None),
            optim=replace(cfg.optim, lr=p.finetune_lr, warmup_steps=min(cfg.optim.warmup_steps, p.finetune_steps // 4)),
            trainer=replace(cfg.trainer, max_steps=p.finetune_steps),
            init_from=base["checkpoint"],
        )
        ft_dir = cache / f"finetune-{task}-{_key(base_dir.name, ft_cfg.data, ft_cfg.optim, p.finetune_steps)}"
        console.print(f"[bold]pipeline[/bold]: fine-tune on {task} -> {ft_dir}")
        fine_tunes.append(_trained(ft_cfg, ft_dir))
    exports = [str(Path(r["safetensors"]).parent) for r in fine_tunes]
    base_export = str(Path(base["safetensors"]).parent)
    merge(base_export, exports, out / "merged", method=p.method, overwrite=True, progress=False, **dict(p.params))
    from moe.adapters.moe_adapter import MoEAdapter

    results, norm, _ = evaluate_paths(str(out / "merged"), base_export, exports, cfg.data, MoEAdapter(),
                                      list(p.tasks))  # fmt: skip
    labels = {"base": "base", "merged": f"merged ({p.method})",
              **{f"model{i}": f"fine-tune {t}" for i, t in enumerate(p.tasks)}}  # fmt: skip
    summary = {
        "method": p.method,
        "params": dict(p.params),
        "tasks": list(p.tasks),
        "accuracy": {labels[k]: v for k, v in results.items()},
        "normalized": norm,
        "mean_normalized": sum(norm.values()) / len(norm) if norm else None,
        "base": base_dir.name,
        "fine_tunes": [Path(e).parent.name for e in exports],
    }
    atomic_write(out / "pipeline.json", lambda f: Path(f).write_text(json.dumps(summary, indent=2)))
    console.print(comparison_table(summary))
    console.print(f"pipeline: {out / 'pipeline.json'}\nmerged:   {out / 'merged'}\nrun:      {out}")
    _log_wandb(cfg, summary)
    return summary


def comparison_table(summary: dict) -> Table:
    """Rows: tasks; columns: every model's exact match, and the merge's accuracy normalized by the fine-tune."""
    acc = summary["accuracy"]
    table = Table(title=f"Pipeline: merge = {summary['method']} {summary['params'] or ''}")
    table.add_column("task")
    for label in acc:
        table.add_column(label, justify="right")
    table.add_column("normalized", justify="right")
    tasks = list(next(iter(acc.values())))
    for task in tasks:
        norm = summary["normalized"].get(task)
        bold = task in summary["tasks"]
        cells = [f"{acc[label][task]:.3f}" for label in acc]
        table.add_row(f"[bold]{task}[/bold]" if bold else task, *cells, f"{norm:.3f}" if norm is not None else "-")
    mean = summary["mean_normalized"]
    table.add_row("mean normalized", *[""] * len(acc), f"[bold]{mean:.3f}[/bold]" if mean is not None else "-")
    return table


def _log_wandb(cfg: TrainConfig, summary: dict) -> None:
    """The comparison as a wandb Table in a run of its own, when the run's logger is wandb (offline by default)."""
    node = cfg.logger or {}
    if not str(node.get("_target_", "")).endswith("WandbLogger"):
        return
    import wandb

    acc = summary["accuracy"]
    columns = ["task", *acc, "normalized"]
    rows = [[task, *[acc[label][task] for label in acc], summary["normalized"].get(task)]
            for task in next(iter(acc.values()))]  # fmt: skip
    config = {"merge": summary["method"], "params": summary["params"], "tasks": summary["tasks"]}
    run = wandb.init(project=node.get("project") or "moe-merge", dir=cfg.output_dir, mode=node.get("mode", "offline"),
                     name=f"pipeline-{summary['method']}", config=config)  # fmt: skip
    run.log({"pipeline/comparison": wandb.Table(columns=columns, data=rows),
             "pipeline/mean_normalized": summary["mean_normalized"]})  # fmt: skip
    run.finish()
