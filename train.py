"""Train the MoE transformer on the embedded multi-task data (or the stdlib's source: experiment=pycode).

python train.py                                   # ~2.5-4 min on 2 CPU cores, wandb offline
python train.py router.k=1 model.num_experts=16   # any key of moe.config.TrainConfig
python train.py experiment=finetune data.tasks=[sort] init_from=outputs/<run>/export
python train.py trainer=ddp trainer.devices=2 parallel.ep_size=2   # expert parallel on 2 processes (gloo / NCCL)
python train.py <the run's overrides> ckpt_path=last hydra.run.dir=outputs/<run>   # resume an interrupted run
python train.py -m experiment=pipeline merge.method=ties,dare   # base -> fine-tunes -> merge -> comparison
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moe.config import RENAMED, TrainConfig, register_configs
from moe.train.checks import run_dir_holding_a_run
from moe.train.run import adopt_launcher_env, configure_threads, run
from moe_merge_common.cli import hydra_main_args, quiet_own_callbacks, refuse_unknown_overrides, run_cli

register_configs()
quiet_own_callbacks("moe.train.run.RunDirGuard")


@hydra.main(config_path="conf", config_name="train", **hydra_main_args())
def main(cfg: DictConfig) -> float:
    adopt_launcher_env()
    configure_threads()
    config: TrainConfig = OmegaConf.to_object(cfg)
    if config.merge.enabled:
        from moe.adapters.pipeline import run_pipeline

        return run_pipeline(config)["mean_normalized"] or 0.0
    results = run(config)
    return results.get("mean_accuracy", -results.get("bpb", 0.0))  # what a sweeper maximizes


if __name__ == "__main__":
    refuse_unknown_overrides(TrainConfig, Path(__file__).parent / "conf", "python train.py --help lists every option",
                             renamed=RENAMED)  # fmt: skip
    if (refusal := run_dir_holding_a_run(sys.argv[1:])) is not None:
        sys.exit(f"Error: {refusal}")
    run_cli(main)
