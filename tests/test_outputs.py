"""The output policy (``moe_merge_common.outputs``), one test per rule, through ``merging.merge`` where a merge
shows it: every
refusal leaves every input and every foreign file byte-identical."""

import hashlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from merging import merge
from merging.assemble import assemble
from moe_merge_common.outputs import MANIFEST, check_output, output_lock

from .conftest import ROOT


def digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    dirs = []
    for name in ("base", "ft0", "ft1"):
        d = tmp_path / name
        d.mkdir()
        save_file({"a.weight": torch.randn(8, 4, generator=g), "b.weight": torch.randn(4, 4, generator=g)},
                  d / "model.safetensors")  # fmt: skip
        (d / "config.json").write_text('{"model": "theirs"}')
        dirs.append(d)
    return dirs


def run(base, fts, out, **kw):
    return merge(base, fts, out, method="task_arithmetic", progress=False, **kw)


def test_an_empty_or_file_target_is_refused(models, tmp_path):
    base, *fts = models
    for out in ("", "  "):
        with pytest.raises(ValueError, match="out: empty"):
            run(base, fts, out)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="a file, not a directory"):
        run(base, fts, tmp_path / "a_file")


@pytest.mark.parametrize("where, relation", [("base", "is the input"), (".", "holds the input"),
                                             ("ft0/sub", "lies inside the input")])  # fmt: skip
def test_never_an_input_nor_around_one(models, tmp_path, where, relation):
    base, *fts = models
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=relation):
        run(base, fts, tmp_path / where, overwrite=True)
    assert digest(tmp_path) == before and not (tmp_path / "ft0" / "sub").exists()


def test_assembly_into_its_own_base_deletes_nothing(models, tmp_path):
    base, *fts = models
    with torch.no_grad():  # experts to assemble: [E, ...] tensors under the expert pattern
        for d in models:
            save_file({"blocks.0.moe.experts.w_up": torch.randn(2, 4, 4)}, d / "model.safetensors")
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="is the input"):
        assemble(base, fts, base, overwrite=True, progress=False)
    assert digest(tmp_path) == before


def test_a_directory_with_other_files_is_refused_and_overwrite_replaces_only_its_own(models, tmp_path):
    base, *fts = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the user's own")
    (out / "model-00001-of-00002.safetensors").write_text("not ours")
    before = digest(out)
    with pytest.raises(FileExistsError, match=r"not empty \(config.json, model-00001-of-00002.safetensors\)"):
        run(base, fts, out)
    with pytest.raises(FileExistsError, match="holds config.json, which no earlier output of this library wrote"):
        run(base, fts, out, overwrite=True)
    assert digest(out) == before


def test_an_overwrite_replaces_the_previous_output_as_a_whole(models, tmp_path):
    base, *fts = models
    out = tmp_path / "out"
    run(base, fts, out, shard_size=100)  # two shards, an index, the base's config.json, a report
    first = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in first and "merge_report.json" in first and MANIFEST in first
    with pytest.raises(FileExistsError, match="pass overwrite=true"):
        run(base, fts, out)
    (base / "config.json").unlink()
    run(base, fts, out, overwrite=True, report=False)  # one shard, no report, no config: none of the old stays
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.safetensors"]


def test_a_second_job_on_the_same_directory_fails_at_once_naming_the_first(models, tmp_path):
    base, *fts = models
    out = tmp_path / "out"
    with output_lock(out):
        code = (f"from merging import merge; merge({str(base)!r}, {[str(f) for f in fts]!r}, {str(out)!r}, "
                "method='task_arithmetic', progress=False)")  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and f"another job (pid {__import__('os').getpid()}) is writing here" in proc.stderr
    assert not (out / "model.safetensors").exists()
    run(base, fts, out)  # the lock went with its holder
    assert (out / "model.safetensors").is_file() and not (out / ".moe.lock").exists()


def test_check_output_accepts_a_new_or_empty_directory(tmp_path):
    assert check_output(tmp_path / "new", [tmp_path / "in" / "x.safetensors"], overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", [], overwrite=False) == tmp_path / "empty"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])  # (complex and uint16 files: refused on reading)
def test_a_tensor_of_another_dtype_class_than_the_base_is_refused_unless_excluded(models, tmp_path, dtype):
    base, *fts = models
    save_file({"a.weight": torch.ones(8, 4).to(dtype), "b.weight": torch.ones(4, 4)}, fts[0] / "model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor 'a.weight' is {dtype}, base has torch.float32 \(a "):
        run(base, fts, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run(base, fts, tmp_path / "out", exclude=[r"^a\."])  # copied from the base: allowed


def test_side_files_must_lie_inside_the_base_and_keep_their_mode(models, tmp_path):
    base, *fts = models
    secret = tmp_path / "secret.json"
    secret.write_text("password")
    secret.chmod(0o600)
    (base / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match=r"tokenizer.json: a side file of the base must be a regular file inside"):
        run(base, fts, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").write_text("{}")
    (base / "tokenizer.json").chmod(0o600)
    run(base, fts, tmp_path / "out")
    assert ((tmp_path / "out" / "tokenizer.json").stat().st_mode & 0o777) == 0o600
