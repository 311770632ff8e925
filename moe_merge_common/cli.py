"""Clean command-line errors: the project's own errors end a Hydra command with one line and a hint, not a traceback.

A Hydra callback (``hydra.callbacks`` in conf/merge.yaml and conf/train.yaml), so that Hydra's job machinery runs
as usual first (other callbacks see the failed job) and the message comes last. ``HYDRA_FULL_ERROR=1`` keeps
Hydra's own report with the traceback; a multirun records the failed job and goes on, as Hydra does.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

# What bad input raises here: configuration values, files, checkpoints, numbers (merging.plan.NonFiniteError is a
# ValueError). Anything else is a bug and keeps its traceback.
# bad input or an environment that cannot hold the job (a full disk, too little memory): one line, no traceback
USER_ERRORS = (ValueError, OSError, MemoryError, OmegaConfBaseException)


def one_line(error: BaseException) -> str:
    """The error's message on one line (OmegaConf's ``full_key:`` / ``object_type=`` lines joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def schema_keys(schema: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """The dotted keys of a dataclass schema, and the prefixes under which any key goes (``dict`` / ``Any``
    fields: ``callbacks``, ``trainer.strategy``, ``adapter``, ...)."""
    keys, open_ = set(), set()
    for name, hint in typing.get_type_hints(schema).items():
        key = f"{prefix}{name}"
        keys.add(key)
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if any(dataclasses.is_dataclass(a) for a in args):
            sub_keys, sub_open = schema_keys(next(a for a in args if dataclasses.is_dataclass(a)), f"{key}.")
            keys |= sub_keys
            open_ |= sub_open
        elif any(a is typing.Any or typing.get_origin(a) is dict or a is dict for a in args):
            open_.add(key)
    return keys, open_


def unknown_overrides(schema: type, argv: list[str], groups: set[str] = frozenset(),
                      renamed: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """The ``key=value`` command-line overrides whose key the schema does not have, each with the closest valid
    keys (``model.d_modle (did you mean model.d_model?)``). Hydra's own refusal suggests appending the key with
    ``+``, which the schema refuses in turn; this check runs first. Config group choices (``groups``:
    ``experiment=smoke``, ``model/moe=capacity``), ``+``/``~`` edits and ``hydra.*`` are Hydra's to check."""
    keys, open_ = schema_keys(schema)
    bad = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if arg.startswith("-") or "=" not in arg or key[:1] in "+~" or "@" in key:
            continue
        if key in groups or key == "hydra" or key.startswith("hydra.") or key in keys or any(
                key.startswith(f"{p}.") for p in open_):  # fmt: skip
            continue
        if renamed and key in renamed:  # an old spelling: name its replacement
            bad.append(f"{key} (renamed: use {renamed[key]})")
            continue
        close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
        bad.append(f"{key} (did you mean {' or '.join(close)}?)" if close else key)
    return bad


def config_groups(conf_dir: str | os.PathLike) -> set[str]:
    """The config groups under a Hydra config directory (``model``, ``model/moe``, ``hydra/launcher``, ...) and
    those stored in Hydra's ConfigStore (a group generated in code, such as the merge ``method``)."""
    from hydra.core.config_store import ConfigStore

    root = Path(conf_dir)
    stored = {name for name, node in ConfigStore.instance().repo.items() if isinstance(node, dict)}
    return {str(d.relative_to(root)) for d in root.rglob("*") if d.is_dir()} | stored


def refuse_unknown_overrides(schema: type, conf_dir: str | os.PathLike, hint: str,
                             argv: list[str] | None = None, renamed: dict[str, str] | None = None) -> None:  # fmt: skip
    """Exit with ``Error: ...`` and ``Hint: ...`` (status 1, as Hydra's refusals) when ``unknown_overrides``
    finds any; before Hydra starts, so its misleading hint is never printed. ``renamed``: old key -> what to use."""
    bad = unknown_overrides(schema, sys.argv[1:] if argv is None else argv, config_groups(conf_dir), renamed)
    if bad:
        print(f"Error: unknown config key(s): {'; '.join(bad)}\nHint: {hint}", file=sys.stderr)
        sys.exit(1)


def table_console(**kwargs: Any):
    """A rich Console for printed tables: the terminal's width on a terminal; written to a file or a pipe, wide
    enough that no column header is cut (rich would fit the table into 80 columns)."""
    from rich.console import Console

    console = Console(**kwargs)
    return console if console.is_terminal else Console(width=1000, **kwargs)


def run_cli(main) -> None:
    """Run a Hydra ``main``; Ctrl-C ends it with ``Interrupted`` and status 130 (the shell's convention for SIGINT),
    without a traceback. What the command was writing is cleaned up by its own handlers on the way out."""
    try:
        main()
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def hydra_main_args() -> dict[str, str]:
    """``hydra.main``'s version argument: Hydra 1.3 needs ``version_base`` (without it, it warns and keeps 1.1's
    defaults); Hydra 1.4 deprecates the argument (it warns whenever it is given) and defaults to its own."""
    from hydra import __version__

    major, minor = (int(x) for x in __version__.split(".")[:2])
    return {"version_base": "1.3"} if (major, minor) < (1, 4) else {}


def quiet_own_callbacks(*targets: str) -> None:
    """Hydra 1.4 warns for every ``hydra.callbacks`` node instantiated without an execution whitelist, which
    ``hydra.main`` cannot pass for them; silence it for these targets (this project's own), not for others."""
    names = "|".join(t.replace(".", r"\.") for t in targets)
    warnings.filterwarnings("ignore", message=rf"hydra\.utils\.instantiate\(\) resolved _target_='({names})'")


class CleanErrors(Callback):
    """On a failed single run whose error is a ``USER_ERRORS``: print ``Error: <message>`` and ``Hint: <hint>`` to
    stderr and exit with status 1 (Hydra's own status for a failed job)."""

    def __init__(self, hint: str = "--help lists every option; HYDRA_FULL_ERROR=1 shows the full traceback") -> None:
        self.hint = hint

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return
        if config.hydra.get("mode") == RunMode.MULTIRUN:
            return
        error = getattr(job_return, "_return_value", None)  # the property would print Hydra's report line first
        if isinstance(error, USER_ERRORS):
            if os.environ.get("RANK", "0") == "0":
                print(f"Error: {one_line(error)}\nHint: {self.hint}", file=sys.stderr, flush=True)
            raise SystemExit(1)


def unknown_keys(cfg: Any, prefix: str = "") -> Iterator[str]:
    """Keys of ``cfg`` (a schema instance from ``OmegaConf.to_object``) that its schema does not declare.

    Hydra's ``+key=value`` adds a key with the struct flag lifted, and ``OmegaConf.to_object`` then sets it as a
    plain attribute of the dataclass, where nothing reads it (``+model.d_modle=64`` would train the default model).
    """
    if not dataclasses.is_dataclass(cfg):
        return
    declared = {f.name for f in dataclasses.fields(cfg)}
    for name in vars(cfg):
        if name not in declared:
            yield f"{prefix}{name} (not in {type(cfg).__name__})"
    for f in dataclasses.fields(cfg):
        yield from unknown_keys(getattr(cfg, f.name), f"{prefix}{f.name}.")


def config_groups_listing(*groups: str) -> str:
    """``${config_groups:model,router}``: Hydra's listing of these config groups and their options, for a help
    template (``$APP_CONFIG_GROUPS`` would list every group in conf/, the other tool's included)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    return hydra.format_config_groups(lambda group: group in groups) if hydra else ""


def register_resolver(name: str, resolver: Callable[..., Any]) -> None:
    """Register an OmegaConf resolver under ``name`` (idempotent). OmegaConf 2.4 renamed ``register_new_resolver``
    to ``register_resolver`` (2.3's ``register_resolver`` is the legacy one)."""
    import omegaconf
    from omegaconf import OmegaConf

    new_api = tuple(int(x) for x in omegaconf.__version__.split(".")[:2]) >= (2, 4)
    (OmegaConf.register_resolver if new_api else OmegaConf.register_new_resolver)(name, resolver, replace=True)
