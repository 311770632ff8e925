"""Train the MoE transformer on the embedded multi-task data.

python train.py                                   # ~5 min on 2 CPU cores, wandb offline
python train.py router.k=1 model.num_experts=16   # any key of moe.config.TrainConfig
python train.py experiment=finetune data.tasks=[sort] init_from=outputs/<run>/export
python train.py trainer=ddp trainer.devices=2 parallel.ep_size=2   # expert parallel on 2 processes (gloo / NCCL)
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from moe.config import TrainConfig, register_configs
from moe.training import adopt_launcher_env, configure_threads, run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    adopt_launcher_env()
    configure_threads()
    config: TrainConfig = OmegaConf.to_object(cfg)
    return run(config).get("mean_accuracy", 0.0)


if __name__ == "__main__":
    main()
