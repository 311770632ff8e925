"""python -m merging base=PATH models=[PATH,PATH] method=ties out=DIR [method.params.density=0.2] [eval=true]

Assemble an MoE from N fine-tunes instead: ... assemble.enabled=true [assemble.router_init=stats tasks=[sort,copy]]
Data-aware: ... method=divmerge tasks=[sort,copy] | method=pleas models=[A,B] (no base)

Everything model-specific (evaluation, search, router statistics, task data, writing divmerge/pleas outputs) goes
through the ``adapter`` node (a ``merging.protocols.TaskAdapter``; default ``moe.adapters.moe_adapter.MoEAdapter``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from merging.config import DATA_AWARE, RENAMED, MergeConfig, register_configs
from merging.merge import merge
from moe_merge_common.cli import (
    USER_ERRORS,
    hydra_main_args,
    one_line,
    quiet_own_callbacks,
    refuse_unknown_overrides,
    run_cli,
    unknown_keys,
)

register_configs()
quiet_own_callbacks("moe_merge_common.cli.CleanErrors")


def make_adapter(cfg: MergeConfig):
    """The ``adapter`` node, instantiated: its ``_target_`` only (Hydra 1.4's execution whitelist holds just it)."""
    if not isinstance(cfg.adapter, dict) or "_target_" not in cfg.adapter:
        raise ValueError(f"adapter={cfg.adapter!r}: expected a node with _target_ (e.g. moe.adapters.MoEAdapter)")
    allow = "_execution_whitelist_" in inspect.signature(hydra.utils.instantiate).parameters
    return hydra.utils.instantiate(cfg.adapter, **({"_execution_whitelist_": cfg.adapter["_target_"]} if allow else {}))


def evaluate_merge(cfg: MergeConfig, adapter=None) -> dict[str, dict[str, float]]:
    """Per-task exact match of the merged model and of every input on the embedded validation split; prints the
    absolute and normalized accuracies. Returns ``{"merged" | "base" | "model{i}": {task: accuracy}}``."""
    from merging.evaluate import accuracy_table, evaluate_paths
    from moe_merge_common.cli import table_console

    adapter = adapter if adapter is not None else make_adapter(cfg)
    results, norm, owners = evaluate_paths(cfg.out, cfg.base, list(cfg.models), cfg.data, adapter, cfg.tasks,
                                           progress=cfg.progress)  # fmt: skip
    table_console().print(accuracy_table(results, norm, owners))
    return results


def merge_data_aware(config: MergeConfig, adapter) -> Path:
    """``method=divmerge`` (base, one task spec per model) or ``method=pleas`` (exactly two models), on the
    adapter's unlabeled training inputs; the adapter writes the merged model to ``out``."""
    from moe_merge_common.io import Checkpoint
    from moe_merge_common.outputs import check_output, output_lock, write_staged

    name, params, models = config.method.name, config.method.arguments(), list(config.models)
    inputs = [p for x in [config.base, *models] if x for p in Checkpoint(x).input_paths()]
    out = check_output(config.out, inputs, config.overwrite)
    if name == "pleas":
        from merging.pleas import pleas

        if len(models) != 2:
            raise ValueError(f"models: PLeaS merges exactly two models, got {len(models)}")
        spec = "+".join(dict.fromkeys(t for s in config.tasks for t in s.split("+"))) if config.tasks else None
        model = pleas(models[0], models[1], adapter.unlabeled(config.data, task=spec), adapter, **params).model
    else:
        from merging.divmerge import divmerge

        if config.base is None:
            raise ValueError("base: method=divmerge needs base=PATH (the model the fine-tunes share)")
        if config.tasks is None or len(config.tasks) != len(models):
            raise ValueError(f"tasks: method=divmerge needs one task spec per model ({len(models)}), e.g. [sort,copy]")
        prompts = [adapter.unlabeled(config.data, task=t, prompts=True) for t in config.tasks]
        lengths = [adapter.answer_length(config.data, t) for t in config.tasks]
        model = divmerge(config.base, models, prompts, adapter, max_new_tokens=lengths, **params).model
    created = not out.exists()
    try:
        with output_lock(out):
            return write_staged(out, lambda stage: adapter.save(model, stage))
    finally:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()


def run(config: MergeConfig, adapter=None):
    if config.method.name in DATA_AWARE:
        return merge_data_aware(config, adapter if adapter is not None else make_adapter(config))
    if config.base is None:
        raise ValueError(f"base: method={config.method.name} needs base=PATH (the pre-trained checkpoint)")
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
            adapter=make_adapter(config) if config.assemble.router_init == "stats" else None,
            out_dtype=config.out_dtype,
            overwrite=config.overwrite,
            progress=config.progress,
            allow_nonfinite=config.allow_nonfinite,
            **config.method.arguments(),
        )
    params = config.method.arguments()
    if config.search:
        from merging.search import search_lambdas

        if config.tasks is None:
            raise ValueError("search=true needs tasks=[...] (the task each model was fine-tuned on)")
        params.pop("weights", None)
        lams, score = search_lambdas(config.base, config.models, config.tasks, config.data,
                                     adapter if adapter is not None else make_adapter(config), config.method.name,
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
        allow_nonfinite=config.allow_nonfinite,
        **params,
    )


@hydra.main(config_path="../conf", config_name="merge", **hydra_main_args())
def main(cfg: DictConfig) -> float | None:
    config: MergeConfig = OmegaConf.to_object(cfg)
    unknown = list(unknown_keys(config))  # a +key the schema does not declare would be ignored
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}; a key added with + must be one the schema "
                         "(merging.config.MergeConfig) declares")  # fmt: skip
    adapter = make_adapter(config) if config.eval or config.search or config.method.name in DATA_AWARE else None
    if config.eval or config.search:  # what evaluation will build must fit, checked before anything is written
        from moe_merge_common.resources import check_memory

        for source in dict.fromkeys(s for s in (config.base, *config.models) if s):
            check_memory(adapter.model_bytes(source), f"eval/search: {source}: the model its config declares")
    path = run(config, adapter)
    print(f"merged ({config.method.name}) -> {path}")
    if config.eval:
        try:
            evaluate_merge(config, adapter)
        except USER_ERRORS as e:
            raise ValueError(f"evaluation failed: {one_line(e)} (the merged model in {path} is kept)") from e
    from merging.search import sweep_objective  # a multirun job's objective (the Optuna sweeper's); else None

    return sweep_objective(config, lambda: adapter if adapter is not None else make_adapter(config))


if __name__ == "__main__":
    conf = Path(__file__).parents[1] / "conf"
    refuse_unknown_overrides(MergeConfig, conf, "python -m merging --help lists every option", renamed=RENAMED)
    run_cli(main)
