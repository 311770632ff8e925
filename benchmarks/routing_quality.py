"""Train each gating choice on the embedded data at the same budget and compare routing quality.

    python benchmarks/routing_quality.py                       # every conf/router option, 400 steps each
    python benchmarks/routing_quality.py --routers softmax_topk gumbel --steps 1400 --out results.md

Per option: mean and per-task exact match, load imbalance (max/mean of per-expert slot counts on the validation
split), dead experts (no slot on the whole validation split), and the expert-task mutual information
I(expert; task) in bits (how much the routing tells about the task), each averaged over the MoE layers.
Every option runs through the same entry point as ``python train.py`` (Hydra compose -> moe.train.run.run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe.config import register_configs
from moe.data.tasks import ALL_TASKS, build_splits
from moe.export import load_model
from moe.train.run import configure_threads, run

CONF = Path(__file__).resolve().parents[1] / "conf"
NEEDS = {"expert_choice": ["router.expert_choice.allow_noncausal=true"]}


@torch.no_grad()
def routing_by_task(model, split, batch_size: int = 512) -> list[torch.Tensor]:
    """Per layer: slot counts ``[num_tasks, E]`` on the split (every routed slot of every token)."""
    model.eval()
    counts = None
    for i in range(0, split.tokens.shape[0], batch_size):
        tokens = split.tokens[i : i + batch_size, :-1]
        task = split.task_id[i : i + batch_size]
        _, routings = model(tokens)
        if counts is None:
            counts = [torch.zeros(len(ALL_TASKS), r.probs.shape[-1]) for r in routings]
        for c, r in zip(counts, routings):
            token_task = task.repeat_interleave(tokens.shape[1])
            chosen = (r.weights > 0).float() if r.weights.shape == r.probs.shape else None
            if chosen is not None:  # layers reporting all E experts per token: count the ones with weight
                c.index_add_(0, token_task, chosen)
            else:
                k = r.ids.shape[1]
                flat = torch.zeros(r.ids.numel(), c.shape[1]).scatter_(1, r.ids.reshape(-1, 1), 1.0)
                c.index_add_(0, token_task.repeat_interleave(k), flat)
    return counts


def mutual_information_bits(counts_TE: torch.Tensor) -> float:
    """I(task; expert) from a joint count table, in bits."""
    joint = counts_TE / counts_TE.sum()
    pt, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pt @ pe)[nz]).log2()).sum())


def evaluate_option(router: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    overrides = [f"router={router}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                 "logger=csv", "trainer.enable_progress_bar=false", f"output_dir={workdir / router}",
                 *NEEDS.get(router, []), *extra]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    start = time.perf_counter()
    results = run(cfg)
    seconds = time.perf_counter() - start
    model = load_model(Path(results["safetensors"]).parent)
    _, val = build_splits(cfg.data)
    per_layer = routing_by_task(model, val)
    loads = [c.sum(0) for c in per_layer]
    return {
        "router": router,
        "mean_accuracy": results["mean_accuracy"],
        "tasks": results["tasks"],
        "imbalance_max_mean": sum(float(ld.max() / ld.mean()) for ld in loads) / len(loads),
        "dead_experts": sum(int((ld == 0).sum()) for ld in loads) / len(loads),
        "mi_bits": sum(mutual_information_bits(c) for c in per_layer) / len(per_layer),
        "seconds": seconds,
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| router | mean acc | "
        + " | ".join(ALL_TASKS)
        + " | imbalance max/mean | dead experts | I(expert;task) bits | s |"
    )
    sep = "|---|---:|" + "---:|" * len(ALL_TASKS) + "---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        accs = " | ".join(f"{r['tasks'].get(t, float('nan')):.3f}" for t in ALL_TASKS)
        lines.append(f"| {r['router']} | {r['mean_accuracy']:.3f} | {accs} | {r['imbalance_max_mean']:.2f} | "
                     f"{r['dead_experts']:.1f} | {r['mi_bits']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", nargs="*", default=sorted(p.stem for p in (CONF / "router").glob("*.yaml")))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--out", type=Path, help="write the markdown table here (and a .json beside it)")
    args = ap.parse_args()
    register_configs()
    configure_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for router in args.routers:
            rows.append(evaluate_option(router, args.steps, Path(tmp), args.override))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
