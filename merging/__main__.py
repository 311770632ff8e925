"""python -m merging base=PATH models=[PATH,PATH] method=ties out=DIR [method.density=0.2] [eval=true]"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from merging.config import MergeConfig, register_configs
from merging.merge import merge

register_configs()


def evaluate_merge(cfg: MergeConfig) -> dict[str, dict[str, float]]:
    """Per-task exact match of the merged model and of every input, on the embedded validation split."""
    from rich.console import Console

    from merging.io import resolve_weights
    from moe.data import build_splits
    from moe.evaluate import evaluate_tasks
    from moe.export import load_model
    from moe.training import accuracy_table

    _, val = build_splits(cfg.data)
    console = Console()
    results = {}
    for label, path in [("merged", cfg.out), ("base", cfg.base), *((f"model{i}", m) for i, m in enumerate(cfg.models))]:
        weights = resolve_weights(path)
        results[label] = evaluate_tasks(load_model(weights.parent, weights), val)
        console.print(accuracy_table(results[label], f"{label}: {path}"))
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="merge")
def main(cfg: DictConfig) -> None:
    config: MergeConfig = OmegaConf.to_object(cfg)
    path = merge(
        config.base,
        config.models,
        config.out,
        method=config.method.name,
        out_dtype=config.out_dtype,
        overwrite=config.overwrite,
        progress=config.progress,
        **config.method.params(),
    )
    print(f"merged ({config.method.name}) -> {path}")
    if config.eval:
        evaluate_merge(config)


if __name__ == "__main__":
    main()
