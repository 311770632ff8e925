"""The package layout holds: which package may import which (checked on the source, so a lazy import inside a
function counts too), old module paths still import as the modules that moved, and README's layout section lists
every module and names only paths that exist."""

import ast
import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe.data.tasks import MultiTaskDataModule
from moe.train.checks import check_train_config
from moe.train.run import run

from .test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "merging", "moe_merge_common")


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute imports; ``from a import b`` counts as a and a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def importers(package: str, imported: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
                  if any(m == imported or m.startswith(f"{imported}.") for m in imports(p)))  # fmt: skip


def test_merging_never_imports_moe_and_moe_imports_merging_only_from_its_adapters():
    assert importers("merging", "moe") == []
    assert all(p.startswith("moe/adapters/") for p in importers("moe", "merging")), importers("moe", "merging")


def test_the_shared_package_imports_neither():
    assert importers("moe_merge_common", "moe") == [] and importers("moe_merge_common", "merging") == []


def test_model_code_imports_no_training_data_report_or_merging_code():
    for other in ("moe.train", "moe.data", "moe.report", "moe.adapters", "moe.callbacks", "merging", "lightning"):
        assert importers("moe/nn", other) == [], other


@pytest.mark.parametrize("package", ["moe", "merging"])
def test_moved_modules_import_from_their_old_paths_as_the_same_module(package):
    moved = importlib.import_module(package).MOVED
    for old, new in moved.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from moe.layers import MoELayer  # README's documented paths
    from moe.routing import route  # noqa: F401

    from moe.nn.layers import MoELayer as Same

    assert MoELayer is Same


def test_readme_layout_lists_every_module_and_only_paths_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    listed = [line.split()[0] for line in block.splitlines() if line.strip()]
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, f"README's layout names paths that do not exist: {missing}"
    modules = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                     if p.name != "__init__.py")  # fmt: skip
    unlisted = [m for m in modules if m not in listed]
    assert not unlisted, f"README's layout does not list: {unlisted}"


def test_interfaces_are_declared_in_code_and_nothing_probes_for_them():
    """Routers subclass ``Router`` and dispatchers satisfy ``Dispatcher``: the parallel code, the model and the
    callbacks use what those declare (``isinstance``), never ``hasattr`` probes."""
    import torch

    from moe.config import MoEConfig, RouterConfig
    from moe.dispatch import Dispatcher, build_dispatcher
    from moe.nn.routers import ROUTERS, Router, build_router

    assert all(issubclass(cls, Router) for cls in ROUTERS.values())
    for kind in ROUTERS:
        router = build_router(8, 4, RouterConfig(kind=kind, k=2))
        assert router.reduce_counts is None and router.layer_name == "router" and router.defer_checks is False
        router.anneal(3), router.update_bias()  # declared for every router (no-ops where there is no schedule)
    for kind, moe in (("topk", MoEConfig()), ("topk", MoEConfig(capacity_factor=1.0)), ("expert_choice", MoEConfig())):
        assert isinstance(build_dispatcher(kind, moe, 4), Dispatcher)
    x = torch.randn(3, 8)
    assert build_router(8, 4, RouterConfig(k=2))(x).plan.ids_TK.shape == (3, 2)
    probes = [str(p.relative_to(ROOT)) for p in (ROOT / "moe").rglob("*.py") if "hasattr(" in p.read_text()]
    assert probes == [], probes


class TwoTasks(MultiTaskDataModule):
    """The embedded data trained on copy and sort only: a data module added by a class and ``data._target_``."""

    built: list = []

    @classmethod
    def from_config(cls, cfg, tokenizer=None):
        cls.built.append(cls(replace(cfg, tasks=["copy", "sort"])))
        return cls.built[-1]


def test_model_and_data_are_built_from_their_target(tmp_path):
    cfg = compose_train(["experiment=smoke", "trainer.max_steps=2", f"output_dir={tmp_path}",
                         "data._target_=tests.test_layout.TwoTasks",
                         "model._target_=moe.nn.model.MoETransformer"])  # fmt: skip
    results = run(cfg)
    hparams = torch.load(tmp_path / "checkpoints" / "final.ckpt", weights_only=True)["hyper_parameters"]
    assert set(results["tasks"]) == set(cfg.data.tasks)  # evaluated on every task (eval_tasks: all)
    assert TwoTasks.built and TwoTasks.built[-1].train_tasks == ["copy", "sort"]
    assert hparams["model"]["_target_"] == "moe.nn.model.MoETransformer"
    for key, value, match in (("data._target_", "tests.test_layout.Nowhere", r"data._target_=.*not an importable"),
                              ("data._target_", "torch.nn.Linear", r"expected a LightningDataModule class"),
                              ("model._target_", "moe.data.tasks.Vocab", r"expected a torch.nn.Module class")):
        with pytest.raises(ValueError, match=match):
            check_train_config(compose_train(["experiment=smoke", f"{key}={value}"]))
