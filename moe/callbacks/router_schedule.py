"""RouterScheduleCallback: the routers' state that changes with training steps, driven from one place.

- Gumbel-softmax routers (``moe.nn.routers.GumbelRouter``): temperature ``tau_t`` set from the optimizer step
  before each training batch (``gumbel_tau``).
- Aux-loss-free bias (DeepSeek-V3; ``TopKRouter`` with ``router.bias_update_rate > 0``): the sign rule applied
  to the load counted since the last update, after each optimizer step. Under data or expert parallelism the
  routers count the global load, so every rank moves its bias identically.
"""

from __future__ import annotations

import lightning as L

from moe.nn.routers import GumbelRouter, TopKRouter


class RouterScheduleCallback(L.Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        modules = list(pl_module.modules())
        self.gumbel = [m for m in modules if isinstance(m, GumbelRouter)]
        self.biased = [m for m in modules if isinstance(m, TopKRouter) and m.cfg.bias_update_rate > 0]
        self._stepped_at = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._stepped_at = trainer.global_step  # 0, or the resumed step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for router in self.gumbel:
            router.anneal(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._stepped_at:  # accumulating gradients: no optimizer step yet
            return
        self._stepped_at = trainer.global_step
        for router in self.biased:
            router.update_bias()
