"""The bad-input catalogue (issue 13): every hostile file, bad number and bad value found against ``train.py``,
``python -m merging`` and ``moe.nn.routing.route``, one row each. A row asserts that the input is refused with the
project's error type (the CLI turns it into exit status 1 and one line: the last tests), that the message names
the offending key, file or tensor, and that no output is left behind (not even an empty directory or a staging
directory). The header fuzz lives in tests/test_safetensors_header.py."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from merging.__main__ import run as merge_run
from merging.config import MergeConfig
from merging.config import register_configs as register_merge
from moe.config import ModelConfig, RouterConfig
from moe.export import export_model
from moe.nn.model import MoETransformer
from moe.nn.routing import route
from moe.train.checks import check_init_architecture, check_train_config
from moe.train.run import run as train_run
from moe_merge_common.cli import USER_ERRORS, one_line

from .conftest import CONF, ROOT
from .test_configs import compose_train

register_merge()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": ""}
SHAPES = {"w": (8, 6), "v": (6,)}


# ---- inputs ---------------------------------------------------------------------------------------------------


def tensors(seed: int, **edits) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    for name, (index, value) in edits.items():
        out[name][index] = value
    return out


def header_file(path: Path, header, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def two(a=(0, 16), b=(16, 32), shape_b=(4,)):
    return {"w": {"dtype": "F32", "shape": [4], "data_offsets": list(a)},
            "v": {"dtype": "F32", "shape": list(shape_b), "data_offsets": list(b)}}  # fmt: skip


class Evil:  # unpickling it would run os.system: weights_only=True must refuse it before that
    def __reduce__(self):
        return os.system, ("touch EVIL_RAN",)


def make_input(kind: str, d: Path) -> Path:
    """One named bad (or good) input file inside ``d``."""
    if kind == "good":
        save_file(tensors(1), str(d / "good.safetensors"))
        return d / "good.safetensors"
    if kind == "nan":
        save_file(tensors(2, w=((3, 4), float("nan"))), str(d / "nan.safetensors"))
        return d / "nan.safetensors"
    if kind == "inf":
        save_file(tensors(2, v=((1,), float("inf"))), str(d / "inf.safetensors"))
        return d / "inf.safetensors"
    if kind == "big":
        save_file({k: v * 1e5 for k, v in tensors(3).items()}, str(d / "big.safetensors"))
        return d / "big.safetensors"
    if kind == "huge":
        save_file({k: v * 5e37 for k, v in tensors(3).items()}, str(d / "huge.safetensors"))
        return d / "huge.safetensors"
    if kind == "shape":
        save_file({"w": torch.randn(8, 5), "v": torch.randn(6)}, str(d / "shape.safetensors"))
        return d / "shape.safetensors"
    if kind == "missing":
        save_file({"w": torch.randn(8, 6)}, str(d / "missing.safetensors"))
        return d / "missing.safetensors"
    if kind == "text":
        (d / "text.safetensors").write_text("hello world\n" * 20)
        return d / "text.safetensors"
    if kind == "text_ckpt":
        (d / "text.ckpt").write_text("hello world\n" * 20)
        return d / "text.ckpt"
    if kind == "pickle":
        torch.save({"state_dict": {"w": torch.zeros(8, 6)}, "evil": Evil()}, d / "evil.ckpt")
        return d / "evil.ckpt"
    if kind == "truncated":
        save_file(tensors(1), str(d / "cut.safetensors"))
        (d / "cut.safetensors").write_bytes((d / "cut.safetensors").read_bytes()[:-10])
        return d / "cut.safetensors"
    if kind == "fifo":
        os.mkfifo(d / "pipe.safetensors")
        return d / "pipe.safetensors"
    headers = {
        "neg_offset": (two(a=(-8, 8), b=(8, 24)), bytes(32)),
        "overlap": (two(a=(0, 16), b=(8, 24)), bytes(24)),
        "size_mismatch": (two(shape_b=(5,)), bytes(32)),
        "trailing": (two(), bytes(40)),
        "bad_dtype": ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    }
    if kind in headers:
        return header_file(d / f"{kind}.safetensors", *headers[kind])
    if kind == "duplicate":
        blob = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1],' \
               b' "data_offsets": [0, 4]}}'  # fmt: skip
        (d / "dup.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
        return d / "dup.safetensors"
    if kind in ("index_abs", "index_up"):
        shard = d / "elsewhere.safetensors"
        save_file(tensors(1), str(shard))
        sub = d / kind
        sub.mkdir()
        target = str(shard) if kind == "index_abs" else "../elsewhere.safetensors"
        (sub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target, "v": target}}))
        return sub
    if kind == "empty_dir":
        (d / "empty").mkdir()
        return d / "empty"
    good = tensors(1)
    saved = {  # torch.save contents of the wrong types (each loads with weights_only=True)
        "ckpt_list": [1, 2, 3],
        "ckpt_int": 5,
        "ckpt_sd_list": {"state_dict": [good["w"]]},
        "ckpt_values": {"state_dict": {"w": [1.0, 2.0], "v": good["v"]}},
        "ckpt_nested": {"state_dict": {"w": {"x": good["w"]}, "v": good["v"]}},
        "ckpt_keys": {"state_dict": {1: good["w"], "v": good["v"]}},
        "ckpt_hparams": {"state_dict": good, "hyper_parameters": [1]},
        "ckpt_sparse": {"state_dict": {"w": good["w"].to_sparse(), "v": good["v"]}},
        "ckpt_meta": {"state_dict": {"w": torch.empty(8, 6, device="meta"), "v": good["v"]}},
    }
    if kind in saved:
        torch.save(saved[kind], d / f"{kind}.ckpt")
        return d / f"{kind}.ckpt"
    raise KeyError(kind)


def merge_config(overrides: list[str]) -> MergeConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("merge", overrides=overrides))


# ---- merge: (model input kind, extra overrides, expected message) ------------------------------------------------

MERGE_CASES = [
    ("nan", [], r"nan.safetensors: tensor 'w' of model 0 holds 1 non-finite values \(NaN\).*allow_nonfinite=true"),
    ("inf", [], r"inf.safetensors: tensor 'v' of model 0 holds 1 non-finite values \(\+inf\)"),
    ("good", ["method=task_arithmetic", "method.params.lam=nan"], r"method.params.lam=nan: expected finite numbers"),
    ("good", ["method=task_arithmetic", "method.params.lam=inf"], r"method.params.lam=inf: expected finite numbers"),
    ("good", ["method=linear", "method.params.weights=[1.0,nan]"],
     r"method.params.weights=\[1.0, nan\]: expected finite"),
    ("big", ["method=task_arithmetic", "out_dtype=float16"], r"(w|v): merged values up to .* out_dtype=float16"),
    ("huge", ["method=task_arithmetic", "method.params.lam=10.0"], r"(w|v): the merge produced \d+ non-finite values"),
    ("neg_offset", [], r"neg_offset.safetensors.*tensor 'w' starts at byte -8"),
    ("overlap", [], r"overlap.safetensors.*tensor 'v' starts at byte 8"),
    ("size_mismatch", [], r"size_mismatch.safetensors.*tensor 'v': shape \[5\] x F32 is 20 bytes"),
    ("trailing", [], r"trailing.safetensors.*cover 32 bytes, the data section holds 40"),
    ("bad_dtype", [], r"bad_dtype.safetensors.*unsupported dtype X9"),
    ("duplicate", [], r"dup.safetensors: not a safetensors file \(duplicate tensor names \['w'\]"),
    ("truncated", [], r"cut.safetensors"),
    ("text", [], r"text.safetensors: not a safetensors file"),
    ("text_ckpt", [], r"text.ckpt: not a torch.save checkpoint"),
    ("pickle", [], r"evil.ckpt: cannot be loaded with weights_only=True"),
    ("fifo", [], r"pipe.safetensors: not a regular file"),
    ("index_abs", [], r"index_abs/model.safetensors.index.json: shards .* lie outside"),
    ("index_up", [], r"index_up/model.safetensors.index.json: shards .* lie outside"),
    ("empty_dir", [], r"empty: no model.safetensors"),
    ("shape", [], r"shape.safetensors.*'w'"),
    ("missing", [], r"missing.safetensors.*'v'"),
    ("ckpt_list", [], r"ckpt_list.ckpt: expected a state dict of tensors .*got a list"),
    ("ckpt_int", [], r"ckpt_int.ckpt: expected a state dict of tensors .*got a int"),
    ("ckpt_sd_list", [], r"ckpt_sd_list.ckpt: expected a state dict of tensors .*got a list"),
    ("ckpt_values", [], r"ckpt_values.ckpt: 'w' is a list, expected a tensor"),
    ("ckpt_nested", [], r"ckpt_nested.ckpt: 'w' is a dict, expected a tensor"),
    ("ckpt_keys", [], r"ckpt_keys.ckpt: state dict key 1 is a int, expected a tensor name"),
    ("ckpt_hparams", [], r"ckpt_hparams.ckpt: hyper_parameters is a list, expected a mapping"),
    ("ckpt_sparse", [], r"ckpt_sparse.ckpt: tensor 'w' is sparse_coo; expected dense tensors"),
    ("ckpt_meta", [], r"ckpt_meta.ckpt: tensor 'w' is meta; expected dense tensors"),
    ("good", ["exclude=['(?=w)']"], r"exclude\[0\]='\(\?=w\)': not a pattern this library matches"),
    ("good", ["exclude=['(w']"], r"exclude\[0\]='\(w': not a pattern this library matches .*missing \)"),
    ("good", ["shard_size=abc"], r"shard_size='?abc'?"),
    ("good", ["shard_size=0"], r"shard_size='?0'?"),
    ("good", ["shard_size=-5GB"], r"shard_size='?-5GB'?"),
    ("good", ["shard_size=inf"], r"shard_size='?inf'?"),
    ("good", ["workers=-2"], r"workers=-2: expected an int >= 1"),
    ("good", ["out_dtype=float8"], r"out_dtype='float8'"),
    ("good", ["vectors=avg"], r"vectors='avg'"),
    ("good", ["router_source=7"], r"router_source='7'"),
    ("good", ["method=dare", "method.params.drop=1.5"], r"drop"),
    ("good", ["method=ties", "method.params.density=0"], r"density"),
]


@pytest.mark.parametrize("kind, extra, match", MERGE_CASES, ids=[f"merge-{c[0]}-{'-'.join(c[1])}" for c in MERGE_CASES])
def test_merge_refuses(tmp_path, monkeypatch, kind, extra, match):
    monkeypatch.chdir(tmp_path)  # where a pickle payload would drop EVIL_RAN
    (tmp_path / "in").mkdir()
    base = make_input("good", tmp_path / "in")
    bad = make_input(kind, tmp_path / "in")
    out = tmp_path / "out"
    overrides = [f"base={base}", f"models=[{bad},{base}]", f"out={out}", "progress=false", *extra]
    with pytest.raises(USER_ERRORS, match=match) as err:
        merge_run(merge_config(overrides))
    assert "\n" not in one_line(err.value)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no weights, staging dir or empty out
    assert not (tmp_path / "EVIL_RAN").exists()


def test_allow_nonfinite_merges_and_counts_them_in_a_valid_json_report(tmp_path):
    (tmp_path / "in").mkdir()
    base, bad = make_input("good", tmp_path / "in"), make_input("nan", tmp_path / "in")
    merge_run(merge_config([f"base={base}", f"models=[{bad},{base}]", f"out={tmp_path / 'o'}", "progress=false",
                            "method=task_arithmetic", "allow_nonfinite=true"]))  # fmt: skip
    text = (tmp_path / "o" / "merge_report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)  # strict JSON: the norms NaN made are null
    assert report["nonfinite"] == {"nonfinite_inputs": 1, "nonfinite_outputs": 1}
    assert report["tensors"]["w"]["norm_merged"] is None and report["tensors"]["v"]["nonfinite_inputs"] == 0


def test_a_nan_base_is_named_as_the_base(tmp_path):
    (tmp_path / "in").mkdir()
    good, bad = make_input("good", tmp_path / "in"), make_input("inf", tmp_path / "in")
    with pytest.raises(ValueError, match=r"inf.safetensors: tensor 'v' of the base holds 1 non-finite"):
        merge_run(merge_config([f"base={bad}", f"models=[{good}]", f"out={tmp_path / 'o'}", "progress=false"]))
    assert not (tmp_path / "o").exists()


def test_old_format_torch_save_is_read_by_merging_and_training_alike(tmp_path):
    state = tensors(4)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)  # fmt: skip
    save_file(tensors(1), str(tmp_path / "base.safetensors"))
    merge_run(merge_config([f"base={tmp_path / 'base.safetensors'}", f"models=[{tmp_path / 'old.ckpt'}]",
                            f"out={tmp_path / 'o'}", "progress=false", "method=task_arithmetic",
                            "method.params.lam=1.0"]))  # fmt: skip
    from safetensors.torch import load_file

    from moe.export import load_checkpoint

    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    b = tensors(1)["w"]
    assert torch.equal(merged["w"], b + (state["w"] - b))  # base + 1.0 * (old - base)
    assert torch.equal(load_checkpoint(tmp_path / "old.ckpt").state["w"], state["w"])


# ---- train: config values (checked before anything is built) -----------------------------------------------------

TRAIN_CONFIG_CASES = [
    ("optim.min_lr_ratio=-1", r"optim.min_lr_ratio=-1.0: expected in \[0, 1\]"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps=-5: expected >= 0"),
    ("optim.impl=adam", r"optim.impl='adam': expected one of \('auto', 'fused', 'foreach', 'for_loop'\)"),
    ("trainer.max_steps=0", r"trainer.max_steps=0: expected >= 1"),
    ("trainer.max_steps=-1", r"trainer.max_steps=-1: expected >= 1"),
    ("optim.lr=nan", r"optim.lr=nan: expected > 0"),
    ("optim.lr=-1e-3", r"optim.lr=-0.001: expected > 0"),
    ("model.num_experts=0", r"model.num_experts=0: expected >= 1"),
    ("model.n_head=3", r"model.d_model=128: expected a multiple of model.n_head \(3\)"),
    ("router.k=0", r"router.k=0: expected 1 <= router.k <= model.num_experts \(8\)"),
    ("router.k=99", r"router.k=99: expected 1 <= router.k"),
]


@pytest.mark.parametrize("override, match", TRAIN_CONFIG_CASES, ids=[c[0] for c in TRAIN_CONFIG_CASES])
def test_train_config_refuses(override, match):
    with pytest.raises(ValueError, match=match):
        check_train_config(compose_train([override]))


def test_unknown_keys_fail_even_with_plus():
    with pytest.raises(Exception, match="d_modle"):
        check_train_config(compose_train(["+model.d_modle=64"]))


# ---- train: files given to init_from / ckpt_path (refused before the run directory exists) -----------------------

INIT_CASES = [
    ("text_ckpt", r"text.ckpt: not a torch.save checkpoint"),
    ("text", r"text.safetensors: not a safetensors file"),
    ("pickle", r"evil.ckpt: cannot be loaded with weights_only=True"),
    ("neg_offset", r"neg_offset.safetensors.*tensor 'w' starts at byte -8"),
    ("fifo", r"pipe.safetensors: not a regular file"),
    ("empty_dir", r"empty/model.safetensors: no such checkpoint"),
    ("good", r"good.safetensors: does not fit the model"),
]


@pytest.mark.parametrize("kind, match", INIT_CASES, ids=[f"init_from-{c[0]}" for c in INIT_CASES])
def test_init_from_refuses(tmp_path, monkeypatch, kind, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    path = make_input(kind, tmp_path / "in")
    out = tmp_path / "run"
    cfg = compose_train(["experiment=smoke", f"init_from={path}", f"output_dir={out}"])
    with pytest.raises(USER_ERRORS, match=match):
        train_run(cfg)
    assert not any(out.rglob("*")) if out.exists() and kind == "good" else not out.exists()
    assert not (tmp_path / "EVIL_RAN").exists()


def test_init_from_a_missing_path_and_with_ckpt_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.ckpt: no such checkpoint"):
        train_run(compose_train(["experiment=smoke", f"init_from={tmp_path / 'nowhere.ckpt'}",
                                 f"output_dir={tmp_path / 'run'}"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"ckpt_path=.* and init_from=.*: give one"):
        train_run(compose_train(["experiment=smoke", f"init_from={tmp_path}", "ckpt_path=last",
                                 f"output_dir={tmp_path / 'run'}"]))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_init_from_architecture_conflicts_with_the_command_line(capsys):
    mine, theirs = ModelConfig(num_experts=8), ModelConfig(num_experts=4, d_ff=64)
    with pytest.raises(ValueError, match=r"init_from=ck: its architecture has model.num_experts=4, but the command "
                                         r"line sets model.num_experts=8"):  # fmt: skip
        check_init_architecture(mine, theirs, "ck", {"model.num_experts", "trainer.max_steps"})
    with pytest.raises(ValueError, match=r"model.d_ff=64.*model.num_experts=4"):
        check_init_architecture(mine, theirs, "ck", {"model"})  # model=small: the whole group
    check_init_architecture(mine, theirs, "ck", {"trainer.max_steps"})  # defaults only: replaced, said loudly
    assert "ck: the checkpoint's architecture replaces the configured one (model.num_experts: 8 -> 4, " \
           "model.d_ff: 256 -> 64)" in capsys.readouterr().err  # fmt: skip
    check_init_architecture(ModelConfig(vocab_size=0), ModelConfig(vocab_size=40), "ck", {"model"})  # 0 = auto


# ---- route ---------------------------------------------------------------------------------------------------------

ROUTE_CASES = [
    ("nan", {}, r"blocks.0.moe.router: NaN logits in 1 of 4 tokens"),
    ("all_neg_inf", {}, r"blocks.0.moe.router: every logit -inf in 1 of 4 tokens"),
    ("finite", {"k": 0}, r"k=0: expected 1 <= k <= num_experts \(5\)"),
    ("finite", {"k": 6}, r"k=6: expected 1 <= k <= num_experts \(5\)"),
    ("finite", {"bias": torch.tensor([0.0, float("nan"), 0, 0, 0])}, r"bias"),
]


@pytest.mark.parametrize("rows, kw, match", ROUTE_CASES, ids=[f"route-{c[0]}-{sorted(c[1])}" for c in ROUTE_CASES])
def test_route_refuses(rows, kw, match):
    logits_TE = torch.randn(4, 5)
    if rows == "nan":
        logits_TE[2, 1] = float("nan")
    if rows == "all_neg_inf":
        logits_TE[3] = float("-inf")
    with pytest.raises(ValueError, match=match):
        route(logits_TE, **{"k": 2, **kw}, check="blocks.0.moe.router")


# ---- the command lines: exit status 1, one line and a hint, no traceback; HYDRA_FULL_ERROR=1 keeps it ------------


@pytest.fixture(scope="module")
def nan_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return make_input("good", d), make_input("nan", d), d


def cli(*args, env=ENV):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_merge_cli_prints_one_line_and_a_hint(nan_inputs):
    base, bad, d = nan_inputs
    args = ("-m", "merging", f"base={base}", f"models=[{bad}]", f"out={d / 'o'}")
    proc = cli(*args)
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("Error", "Hint", "Traceback"))]
    assert proc.returncode == 1 and lines[0].startswith("Error: ") and "tensor 'w' of model 0" in lines[0], proc.stderr
    assert lines[1].startswith("Hint: python -m merging --help") and len(lines) == 2
    full = cli(*args, env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "NonFiniteError" in full.stderr
    assert not (d / "o").exists()


@pytest.mark.slow
def test_train_cli_prints_one_line_and_leaves_no_run_directory(tmp_path):
    export_model(MoETransformer(ModelConfig(vocab_size=40, max_seq_len=64, d_model=32, n_head=2, num_experts=4,
                                            d_ff=64), RouterConfig()), tmp_path / "ck")  # fmt: skip
    proc = cli("train.py", "experiment=smoke", f"init_from={tmp_path / 'ck'}", "model.num_experts=8",
               f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("Error", "Hint", "Traceback"))]
    assert proc.returncode == 1 and len(lines) == 2, proc.stderr[-2000:]
    assert "model.num_experts=4, but the command line sets model.num_experts=8" in lines[0]
    assert lines[1].startswith("Hint: python train.py --help")
    assert not (tmp_path / "run").exists()


def test_all_finite_is_exact_where_the_sum_overflows_or_cancels():
    from merging.plan import all_finite

    big = torch.full((4,), 3e38)
    assert all_finite(big)  # the sum overflows fp32; the exact check says finite
    assert not all_finite(torch.tensor([1.0, float("inf"), float("-inf")]))  # inf - inf = NaN in the sum
    assert not all_finite(torch.tensor([0.0, float("nan")])) and all_finite(torch.arange(3))


# ---- bounded work, zero-size tensors, memory, a full disk ---------------------------------------------------------


def test_an_exclude_pattern_that_backtracks_is_matched_in_linear_time(tmp_path):
    """``(a+)+b`` against 34 a's: minutes under Python's re (2^34 ways to split them), at once under RE2."""
    import time

    name = "a" * 34 + "c"
    save_file({name: torch.ones(3), "w": torch.zeros(2)}, str(tmp_path / "base.safetensors"))
    save_file({name: torch.full((3,), 3.0), "w": torch.ones(2)}, str(tmp_path / "ft.safetensors"))
    start = time.perf_counter()
    merge_run(merge_config([f"base={tmp_path / 'base.safetensors'}", f"models=[{tmp_path / 'ft.safetensors'}]",
                            f"out={tmp_path / 'o'}", "progress=false", "method=task_arithmetic",
                            "method.params.lam=1.0",
                            "exclude=['(a+)+b','^w$']"]))  # fmt: skip
    assert time.perf_counter() - start < 20
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(merged[name], torch.full((3,), 3.0)) and torch.equal(merged["w"], torch.zeros(2))


def test_zero_size_tensors_are_copied_from_the_base(tmp_path):
    for name, fill in (("base", 1.0), ("ft", 2.0)):
        save_file({"empty": torch.zeros(0, 6), "scalarish": torch.full((0,), fill), "w": torch.full((2, 3), fill)},
                  str(tmp_path / f"{name}.safetensors"))  # fmt: skip
    merge_run(merge_config([f"base={tmp_path / 'base.safetensors'}", f"models=[{tmp_path / 'ft.safetensors'}]",
                            f"out={tmp_path / 'o'}", "progress=false", "method=task_arithmetic",
                            "method.params.lam=1.0"]))  # fmt: skip
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert merged["empty"].shape == (0, 6) and merged["scalarish"].shape == (0,)
    assert torch.equal(merged["w"], torch.full((2, 3), 2.0))


def test_eval_of_a_model_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
    """A config.json declaring a 65,536-wide model beside small weights: evaluation would allocate hundreds of GB.
    The size comes from the config alone (built on the meta device) and is refused before the merge writes."""
    cfg = ModelConfig(vocab_size=40, max_seq_len=64, d_model=16, n_head=2, num_experts=2, d_ff=8, n_layer=1)
    for name in ("base", "ft"):
        export_model(MoETransformer(cfg, RouterConfig(k=1)), tmp_path / name)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["model"].update(d_model=65536, d_ff=65536)
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = cli("-m", "merging", f"base={tmp_path / 'base'}", f"models=[{tmp_path / 'ft'}]", f"out={tmp_path / 'o'}",
               "eval=true", "progress=false")  # fmt: skip
    error = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"eval/search: {tmp_path / 'base'}: the model its config declares: needs about" in error[0]
    assert "GiB is available" in error[0]
    assert not (tmp_path / "o").exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    """The merge runs under a 100 kB file-size limit (what a full disk does to a write, without needing one): the
    error names the output, and neither the output nor its staging directory is left."""
    import resource
    import signal

    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_file({"w": torch.randn(256, 256, generator=g)}, str(tmp_path / f"{name}.safetensors"))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "merging", f"base={tmp_path / 'a.safetensors'}",
                           f"models=[{tmp_path / 'b.safetensors'}]", f"out={tmp_path / 'o'}", "progress=false"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=limit)  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("Error", "Traceback"))]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert f"out={tmp_path / 'o'}: File too large while writing the merge" in lines[0]
    assert not (tmp_path / "o").exists()


def test_resume_from_a_checkpoint_of_the_wrong_type_is_refused(tmp_path):
    ck = tmp_path / "list.ckpt"
    torch.save([1, 2], ck)
    with pytest.raises(ValueError, match=r"list.ckpt: not a Lightning checkpoint"):
        train_run(compose_train(["experiment=smoke", f"ckpt_path={ck}", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
