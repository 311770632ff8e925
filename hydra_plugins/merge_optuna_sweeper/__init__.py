"""``hydra/sweeper=merge_optuna``: Hydra's Optuna sweeper (hydra-optuna-sweeper 1.3) that builds its sampler.

Hydra 1.4 instantiates sweeper plugins with ``_recursive_=False``, so the stock ``hydra/sweeper=optuna`` receives its
``sampler`` node as a config and fails in optuna (``Key 'infer_relative_search_space' not in 'SamplerConfig'``).
This subclass instantiates that node (its ``_target_`` only) and is otherwise the stock sweeper; under Hydra 1.3
the sampler arrives built and passes through. Config: ``conf/hydra/sweeper/merge_optuna.yaml``.
"""

from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig


class MergeOptunaSweeper(OptunaSweeper):
    def __init__(self, sampler, *args, **kwargs) -> None:
        if isinstance(sampler, DictConfig) and "_target_" in sampler:
            sampler = instantiate(sampler, _execution_whitelist_=sampler._target_)
        super().__init__(sampler, *args, **kwargs)
