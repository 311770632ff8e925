"""Hydra configs of the merge CLI: every ``method=<name>`` option (generated from the methods) composes, its keys are
the method's parameters and its values the Python defaults (one set of names and defaults). Old spellings name the
new key. Normalized accuracy by hand."""

import importlib
import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from merging import METHODS
from merging.config import DATA_AWARE, MergeConfig, register_configs
from merging.evaluate import normalized, task_owner

from .conftest import CONF

register_configs()
METHOD_NAMES = sorted([*METHODS, *DATA_AWARE])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_options_hold_the_python_defaults(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("merge", overrides=["base=b", "models=[m1,m2]", "out=o", f"method={name}"])
    config: MergeConfig = OmegaConf.to_object(cfg)
    assert config.method.name == name
    params = config.method.params
    if name in DATA_AWARE:  # merging.divmerge / merging.pleas: the option's keys and defaults are the function's
        fn = getattr(importlib.import_module(f"merging.{name}"), name)
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
        assert params and all(value == defaults[key] for key, value in params.items()), (name, params)
        return
    spec = METHODS[name].params
    assert set(params) == set(spec), f"method={name} lists other keys than the method takes"
    for key, value in params.items():
        default = list(spec[key].default) if isinstance(spec[key].default, tuple) else spec[key].default
        assert value == default, f"method={name}: {key}={value}, Python default {spec[key].default}"
    METHODS[name].resolve(config.method.arguments(), 2)  # valid as shipped


def test_cli_overrides_reach_the_method_and_typos_fail():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("merge", overrides=["base=b", "models=[m]", "out=o", "method=dare", "method.params.drop=0.3",
                                          "method.params.combine=ties", "router_source=0",
                                          "exclude=[norm]"])  # fmt: skip
        config: MergeConfig = OmegaConf.to_object(cfg)
        assert config.method.params["drop"] == 0.3 and config.router_source == "0" and config.exclude == ["norm"]
        with pytest.raises(Exception, match="dropp"):
            compose("merge", overrides=["base=b", "models=[m]", "out=o", "method.params.dropp=0.3"])


def test_an_old_method_key_names_its_new_spelling():
    import subprocess
    import sys

    from .conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "merging", "base=b", "models=[m]", "out=o", "method.density=0.3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "method.density (renamed: use method.params.density)" in proc.stderr


def test_normalized_accuracy_by_hand():
    results = {
        "merged": {"copy": 0.9, "sort": 0.3, "add": 0.2},
        "base": {"copy": 0.5, "sort": 0.1, "add": 0.2},
        "model0": {"copy": 1.0, "sort": 0.1, "add": 0.2},
        "model1": {"copy": 0.4, "sort": 0.6, "add": 0.25},
    }
    owners = task_owner(results, 2, ["copy", "sort"])
    assert owners == {"copy": "model0", "sort": "model1"}
    assert normalized(results, owners) == pytest.approx({"copy": 0.9, "sort": 0.5})
    unsolved = {**results, "model1": {**results["model1"], "sort": 0.0}}
    assert normalized(unsolved, owners) == pytest.approx({"copy": 0.9})  # no normalized score without a reference
    # without the task list, each task's owner is its best model
    assert task_owner(results, 2, None) == {"copy": "model0", "sort": "model1", "add": "model1"}
    with pytest.raises(ValueError, match="tasks"):
        task_owner(results, 2, ["copy"])
