"""Every YAML in conf/ composes onto its typed schema; mistakes fail with the key's name."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from merging.config import MergeConfig
from merging.config import register_configs as register_merge
from moe.config import TrainConfig
from moe.config import register_configs as register_train
from moe.train.checks import check_train_config
from moe.train.run import build_callbacks, build_logger

from .conftest import CONF

register_train()
register_merge()

TRAIN_GROUPS = ["model", "router", "data", "optim", "trainer", "logger", "callbacks", "experiment"]
OVERRIDES = {"output_dir=/tmp/x", "init_from=/tmp/ckpt"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp/x", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in TRAIN_GROUPS for o in options(g)])
def test_every_train_option_composes(group, option):
    extra = ["init_from=/tmp/ckpt"] if option == "finetune" else []
    cfg = compose_train([f"{group}={option}", *extra])
    assert isinstance(cfg, TrainConfig)
    assert not OmegaConf.missing_keys(OmegaConf.structured(cfg))


def test_group_options_actually_apply():
    assert compose_train(["model=tiny"]).model.d_model == 32
    assert compose_train(["logger=csv"]).logger["_target_"] == "lightning.pytorch.loggers.CSVLogger"
    assert compose_train(["logger.mode=online", "logger.project=p"]).logger == {
        "_target_": "lightning.pytorch.loggers.WandbLogger", "save_dir": "/tmp/x", "project": "p", "name": None,
        "mode": "online"}  # fmt: skip
    ft = compose_train(["experiment=finetune", "data.tasks=[sort,add]", "init_from=/a.ckpt"])
    assert ft.data.tasks == ["sort", "add"] and ft.init_from == "/a.ckpt" and ft.trainer.max_steps == 300


@pytest.mark.parametrize("method", ["ties", "dare", "slerp", "divmerge", "pleas"])
def test_every_merge_method_composes(method):  # (all of them: tests/test_merge_config.py)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("merge", overrides=["base=/b", "models=[/m1,/m2]", "out=/o", f"method={method}"])
    merged = OmegaConf.to_object(cfg)
    assert isinstance(merged, MergeConfig) and merged.method.name == method
    from merging import METHODS

    if method in METHODS:  # (divmerge and pleas run models on data: tests/test_merge_config.py checks them)
        assert set(merged.method.params) == set(METHODS[method].params)


def test_callbacks_and_logger_are_target_nodes_users_can_change_drop_and_add():
    timer = "+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer, duration: '00:00:01:00'}"
    cfg = compose_train(["callbacks.model_checkpoint.save_top_k=3", "~callbacks.rich_progress", timer])
    callbacks = build_callbacks(cfg.callbacks)
    names = ["ModelCheckpoint", "LastCheckpoint", "LearningRateMonitor", "RouterScheduleCallback",
             "RoutingStatsCallback", "Timer"]  # fmt: skip
    assert [type(c).__name__ for c in callbacks] == names
    assert callbacks[0].save_top_k == 3 and callbacks[0].dirpath == "/tmp/x/checkpoints"
    assert callbacks[1].save_last and callbacks[1].dirpath == "/tmp/x/checkpoints"
    without_bar = build_callbacks(compose_train(["callbacks.rich_progress=null"]).callbacks)
    assert [type(c).__name__ for c in without_bar] == [n for n in names if n != "Timer"]
    assert type(build_callbacks(compose_train([]).callbacks)[3]).__name__ == "StepProgressBar"
    assert len(build_callbacks(compose_train([]).callbacks, progress_bar=False)) == 5  # enable_progress_bar=false
    for name in options("logger"):
        assert isinstance(build_logger(compose_train([f"logger={name}"]).logger), Logger)
    with pytest.raises(ValueError, match=r"callbacks.model_checkpoint: .*save_topk"):
        build_callbacks(compose_train(["+callbacks.model_checkpoint.save_topk=3"]).callbacks)


def test_mistyped_key_fails_with_its_path():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["model.d_modle=64"])
    assert "d_modle" in str(err.value.__cause__ or err.value)
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as err:
        compose_train(["router.k=two"])
    assert "router.k" in str(err.value.__cause__ or err.value) or "k" in str(err.value)


@pytest.mark.parametrize("override,key", [("+model.d_modle=64", "model.d_modle"), ("+trainer.foo=1", "trainer.foo"),
                                          ("+seeed=1", "seeed")])  # fmt: skip
def test_keys_added_with_plus_must_exist(override, key):
    """Hydra's `+` adds a key past the schema's struct flag, and OmegaConf.to_object keeps it as a stray attribute
    nothing reads: the run refuses it, naming it."""
    with pytest.raises(ValueError, match=rf"unknown config key\(s\): {key} "):
        check_train_config(compose_train([override]))


def test_yaml_files_mirror_the_schema_defaults():
    """The default YAML values equal the dataclass defaults, so Python users and CLI users get the same run."""
    cfg = compose_train([])
    assert cfg.router == TrainConfig().router
    assert cfg.data == TrainConfig().data
    assert cfg.model == TrainConfig().model
    assert Path(CONF / "train.yaml").exists()


def test_configs_saved_by_an_earlier_version_load_and_resume():
    """Flat router knobs (``tau``, ``capacity_factor``, ...), ``data.kind`` and a model without ``_target_``: what
    exports and checkpoints written before the configs were nested hold. They load as today's configs, and a run
    saved that way resumes (its settings compare equal)."""
    import json
    from dataclasses import asdict

    from moe.export import read_config
    from moe.train.checks import check_resume_config

    cfg = compose_train(["router=gumbel", "router.gumbel.tau=0.7", "data=pycode"])
    old = asdict(cfg)
    old["router"] = {k: v for k, v in old["router"].items() if k not in ("noisy_topk", "gumbel", "expert_choice")}
    old["router"].update(asdict(cfg.router.gumbel), load_loss_coef=0.0, capacity_factor=2.0, allow_noncausal=False)
    old["data"] = {**{k: v for k, v in old["data"].items() if k != "_target_"}, "kind": "pycode"}
    del old["model"]["_target_"]
    check_resume_config(cfg, old, Path("old.ckpt"))  # nothing differs once upgraded
    old["router"]["tau"] = 0.9
    with pytest.raises(ValueError, match=r"router.gumbel.tau=0.9 there, 0.7 here"):
        check_resume_config(cfg, old, Path("old.ckpt"))
    config_json = Path(__file__).parent / "_old_config.json"
    try:
        config_json.write_text(json.dumps({"model": old["model"], "router": old["router"]}))
        model, router = read_config(config_json)
    finally:
        config_json.unlink()
    assert router.gumbel.tau == 0.9 and router.expert_choice.capacity_factor == 2.0 and model == cfg.model


@pytest.mark.parametrize("old, new", [("router.tau=0.5", "router.gumbel.tau"),
                                      ("router.capacity_factor=1.0", "router.expert_choice.capacity_factor"),
                                      ("router.load_loss_coef=0.1", "router.noisy_topk.load_loss_coef")])  # fmt: skip
def test_an_old_router_key_names_its_new_place(old, new):
    from moe.config import RENAMED, TrainConfig
    from moe_merge_common.cli import unknown_overrides

    assert unknown_overrides(TrainConfig, [old], renamed=RENAMED) == [f"{old.split('=')[0]} (renamed: use {new})"]
