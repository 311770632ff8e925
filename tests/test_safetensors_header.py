"""The safetensors header parser refuses what the official library refuses, naming the file and the tensor."""

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from merging import merge
from moe_merge_common.io import Checkpoint, SafetensorsFile
from moe_merge_common.outputs import MANIFEST


def write(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def two_tensors(a=(0, 16), b=(16, 32), dtype="F32", shape_b=(4,)):
    return {"a": {"dtype": "F32", "shape": [4], "data_offsets": list(a)},
            "b": {"dtype": dtype, "shape": list(shape_b), "data_offsets": list(b)}}  # fmt: skip


@pytest.mark.parametrize(
    "header, data, match",
    [
        (two_tensors(a=(-8, 8), b=(8, 24)), bytes(32), r"tensor 'a' starts at byte -8"),  # points into the header
        (two_tensors(a=(0, 16), b=(8, 24)), bytes(24), r"tensor 'b' starts at byte 8 .* expected 16"),  # overlap
        (two_tensors(a=(0, 16), b=(20, 36)), bytes(36), r"tensor 'b' starts at byte 20"),  # a gap
        (two_tensors(shape_b=(5,)), bytes(32), r"tensor 'b': shape \[5\] x F32 is 20 bytes, .* span 16"),
        (two_tensors(), bytes(40), r"the tensors cover 32 bytes, the data section holds 40"),  # trailing bytes
        (two_tensors(b=(16, 48), shape_b=(8,)), bytes(32), r"the tensors cover 48 bytes, the data section holds 32"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", r"shape \[-1\] is not a list"),
        ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), r"tensor 'a': expected \{dtype, shape, data_offsets\}"),
        ({"a": [1, 2]}, b"", r"tensor 'a': expected"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unsupported dtype X9"),
        # zero bytes, 10^18 rows: valid for the official reader, but whatever iterates over its rows would spin
        ({"a": {"dtype": "F32", "shape": [10**18, 0], "data_offsets": [0, 0]}}, b"", r"shape .* out of bounds"),
        ({"a": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, bytes(4), r"at most 16 dimensions"),
    ],
)
def test_bad_headers_are_refused_naming_file_and_tensor(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    write(path, header, data)
    with pytest.raises(ValueError, match=match) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)


def test_duplicate_names_header_length_and_non_objects(tmp_path):
    path = tmp_path / "dup.safetensors"
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'  # fmt: skip
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    with pytest.raises(ValueError, match=r"dup.safetensors: not a safetensors file \(duplicate tensor names \['a'\]"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="header length 1099511627776 does not fit a file of 10 bytes"):
        SafetensorsFile(path)
    write(path, [1, 2], b"")  # a JSON array
    with pytest.raises(ValueError, match="the header is not a JSON object"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 4000) + b"[" * 4000)  # deeply nested JSON
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(path)


def test_a_fifo_is_refused_instead_of_hanging(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        SafetensorsFile(fifo)


def test_an_index_cannot_point_outside_its_directory(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"w": torch.zeros(2)}, outside)
    ck = tmp_path / "ck"
    ck.mkdir()
    for target in (str(outside), "../secret.safetensors"):
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
        with pytest.raises(ValueError, match="lie outside"):
            Checkpoint(ck)


def test_a_valid_file_from_the_official_writer_still_reads(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(0), "c": torch.tensor([1, 2], dtype=torch.int8)}
    save_file(tensors, tmp_path / "ok.safetensors")
    f = SafetensorsFile(tmp_path / "ok.safetensors")
    assert all(torch.equal(f.read(k), v) for k, v in tensors.items())


def test_a_bad_input_stops_the_merge_before_any_output(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "base.safetensors")
    write(tmp_path / "ft.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}}, bytes(8))
    with pytest.raises(ValueError, match=r"ft.safetensors: tensor 'w' starts at byte -8"):
        merge(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"], tmp_path / "out", method="linear",
              progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_fuzzed_files_fail_only_with_value_error(tmp_path_factory, data, flips):
    """Random bytes, and a valid file with random byte flips: the parser either reads it or raises ValueError."""
    d = tmp_path_factory.mktemp("fuzz")
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 2)}, d / "ok.safetensors")
    valid = bytearray((d / "ok.safetensors").read_bytes())
    for i in flips:
        valid[i % len(valid)] ^= 0xFF
    for blob in (bytes(valid), data):
        path = d / "f.safetensors"
        path.write_bytes(blob)
        try:
            f = SafetensorsFile(path)
        except ValueError:
            continue
        for name in f.entries:  # what parses must read inside the file
            f.read(name)


BAD_OPTIONS = [(dict(shard_size="abc"), "shard_size='abc'"), (dict(shard_size="0"), "shard_size"),
               (dict(shard_size="-5GB"), "shard_size='-5GB'"), (dict(workers=-2), "workers=-2")]  # fmt: skip


@pytest.mark.parametrize("kw, match", BAD_OPTIONS)
def test_bad_sizes_and_workers_are_refused_before_any_output(tmp_path, kw, match):
    save_file({"w": torch.ones(4)}, tmp_path / "base.safetensors")
    save_file({"w": torch.zeros(4)}, tmp_path / "ft.safetensors")
    with pytest.raises(ValueError, match=match):
        merge(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"], tmp_path / "out", method="linear",
              progress=False, **kw)  # fmt: skip
    assert not (tmp_path / "out").exists()


def _start_merge(tmp_path, cli: bool = False):
    """A merge in a subprocess (``merge()``, or ``python -m merging`` with ``cli``, its stderr piped), returned once
    it has staged shard files; (process, out)."""
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    base = {f"w{i}": torch.randn(512, 1024) for i in range(12)}
    save_file(base, tmp_path / "base.safetensors")
    for j in range(3):
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, tmp_path / f"ft{j}.safetensors")
    out = tmp_path / "out"
    models = [str(tmp_path / f"ft{j}.safetensors") for j in range(3)]
    if cli:
        cmd = ["-m", "merging", f"base={tmp_path / 'base.safetensors'}", f"models=[{','.join(models)}]", f"out={out}",
               "method=ties", "workers=1", "progress=false"]  # fmt: skip
    else:
        code = ("from merging import merge; merge({b!r}, {m!r}, {o!r}, method='ties', progress=False, workers=1, "
                "chunk_elems=4096)").format(b=str(tmp_path / "base.safetensors"), m=models, o=str(out))  # fmt: skip
        cmd = ["-c", code]
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stderr=subprocess.PIPE if cli else None, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".merge-*.tmp/*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return proc, out


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    import signal

    proc, out = _start_merge(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM
    assert not out.exists() or not any(out.iterdir())  # no stage, no partial output


def test_a_merge_killed_with_sigkill_leaves_a_stage_the_next_run_removes(tmp_path):
    proc, out = _start_merge(tmp_path)
    proc.kill()
    proc.wait()
    stale = list(out.glob(".merge-*.tmp"))
    assert len(stale) == 1, "the kill should land while the merge is staged"
    foreign = out / ".merge-notours.tmp"  # a directory with no owner file is not ours: left alone
    foreign.mkdir()
    merge(tmp_path / "base.safetensors", [tmp_path / f"ft{j}.safetensors" for j in range(3)], out, method="ties",
          progress=False, overwrite=True)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [".merge-notours.tmp", MANIFEST, "merge_report.json",
                                                     "model.safetensors"]  # fmt: skip


def test_ctrl_c_ends_the_merge_cli_with_130_no_traceback_and_no_partial_output(tmp_path):
    import signal

    proc, out = _start_merge(tmp_path, cli=True)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not out.exists() or not any(out.iterdir())  # no stage, no partial output


@pytest.mark.parametrize("doc", [{"weight_map": [1, 2]}, {"weight_map": {"a": 5}}, {"weight_map": {"a": ["x"]}},
                                 {"weight_map": None}, [1], "x", 3])  # fmt: skip
def test_an_index_of_the_wrong_json_types_is_refused_naming_it(tmp_path, doc):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not a safetensors index"):
        Checkpoint(tmp_path)


def test_a_hugging_face_hub_cache_snapshot_with_symlinked_shards_reads(tmp_path):
    """models--org--name/snapshots/<rev>/ links each file into ../../blobs/<hash>: the shards are named inside the
    snapshot, so they are read (as a symlinked model.safetensors is), while an index naming ../ stays refused."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"a": torch.arange(4.0)},
              "model-00002-of-00002.safetensors": {"b": torch.ones(2, 3)}}  # fmt: skip
    index = {"metadata": {}, "weight_map": {k: name for name, ts in shards.items() for k in ts}}
    for i, (name, ts) in enumerate(shards.items()):
        save_file(ts, repo / "blobs" / f"blob{i}")
        (snap / name).symlink_to(f"../../blobs/blob{i}")
    (repo / "blobs" / "index").write_text(json.dumps(index))
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/index")
    ck = Checkpoint(snap)
    assert sorted(ck.names) == ["a", "b"] and torch.equal(ck.read("b"), torch.ones(2, 3))
    plain = tmp_path / "plain"  # the same links from a directory that is no snapshot: refused
    plain.mkdir()
    for name in [*shards, "model.safetensors.index.json"]:
        (plain / name).symlink_to((snap / name).resolve())
    with pytest.raises(ValueError, match="lie outside"):
        Checkpoint(plain)
