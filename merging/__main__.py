"""python -m merging base=PATH models=[PATH,PATH] method=ties out=DIR [method.density=0.2] [eval=true]

Assemble an MoE from N fine-tunes instead: ... assemble.enabled=true [assemble.router_init=stats tasks=[sort,copy]]
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from merging.config import MergeConfig, register_configs
from merging.merge import merge
from moe.config import register_resolvers

register_configs()
register_resolvers()  # conf/merge.yaml's help lists its own config groups (${config_groups:method})


def evaluate_merge(cfg: MergeConfig) -> dict[str, dict[str, float]]:
    """Per-task exact match of the merged model and of every input on the embedded validation split; prints the
    absolute and normalized accuracies. Returns ``{"merged" | "base" | "model{i}": {task: accuracy}}``."""
    from rich.console import Console

    from merging.evaluate import accuracy_table, evaluate_paths

    results, norm, owners = evaluate_paths(cfg.out, cfg.base, list(cfg.models), cfg.data, cfg.tasks,
                                           progress=cfg.progress)  # fmt: skip
    Console().print(accuracy_table(results, norm, owners))
    return results


def run(config: MergeConfig):
    if config.assemble.enabled:
        from merging.assemble import assemble

        return assemble(
            config.base,
            config.models,
            config.out,
            method=config.method.name,
            router_init=config.assemble.router_init,
            k=config.assemble.k,
            tasks=config.tasks,
            scale=config.assemble.scale,
            data=config.data,
            out_dtype=config.out_dtype,
            overwrite=config.overwrite,
            progress=config.progress,
            **config.method.params(),
        )
    params = config.method.params()
    if config.search:
        from merging.search import search_lambdas

        if config.tasks is None:
            raise ValueError("search=true needs tasks=[...] (the task each model was fine-tuned on)")
        params.pop("weights", None)
        lams, score = search_lambdas(config.base, config.models, config.tasks, config.data, config.method.name,
                                     **params)  # fmt: skip
        print(f"per-task lambdas {lams} (mean normalized accuracy {score:.3f} on the search split)")
        params["weights"] = lams
    return merge(
        config.base,
        config.models,
        config.out,
        method=config.method.name,
        out_dtype=config.out_dtype,
        overwrite=config.overwrite,
        progress=config.progress,
        exclude=config.exclude,
        vectors=config.vectors,
        vocab=config.vocab,
        experts=config.experts,
        router_source=config.router_source,
        shard_size=config.shard_size,
        workers=config.workers,
        report=config.report,
        **params,
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="merge")
def main(cfg: DictConfig) -> None:
    config: MergeConfig = OmegaConf.to_object(cfg)
    path = run(config)
    print(f"merged ({config.method.name}) -> {path}")
    if config.eval:
        evaluate_merge(config)


if __name__ == "__main__":
    main()
