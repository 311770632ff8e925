"""Training: the LightningModule (``module``), one training run from a config (``run``), the checks made before
any work (``checks``) and exact-match evaluation on the tasks (``evaluate``)."""
