"""The streaming merge: equality with the in-memory methods, input formats, sharded output, rules, safety."""

import importlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import METHODS, merge, merge_tensors
from moe_merge_common.io import Checkpoint, ShardedWriter
from moe_merge_common.outputs import MANIFEST

PARAMS = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"scope": "tensor", "density": 0.3},
    "ties_row": {"scope": "row", "density": 0.3, "sign": "frequency"},
    "dare": {"drop": 0.4},
    "dare_ties_l1": {"drop": 0.4, "combine": "ties", "rescale": "l1", "density": 0.5, "scope": "tensor"},
    "della": {},
    "della_tensor": {"scope": "tensor", "epsilon": 0.2},  # ranks over the whole tensor, gathered in a first pass
    "pcb": {"scope": "tensor"},
    "pcb_row": {"scope": "row"},
    "star": {},
    "star_gram": {"svd": "gram"},  # tall matrices streamed by rows; the [3, 8, 6] stack's chunks straddle matrices
}


def write(path, tensors, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def model_tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.w": torch.randn(24, 16, generator=g).to(dtype),
        "blocks.0.norm.weight": torch.randn(16, generator=g).to(dtype),
        "blocks.0.moe.experts.w_up": torch.randn(3, 8, 6, generator=g).to(dtype),
        "blocks.0.moe.router.weight": torch.randn(3, 8, generator=g).to(dtype),
        "embed.weight": torch.randn(10, 16, generator=g).to(dtype),
        "steps": torch.tensor([5]),
    }


@pytest.fixture
def ckpts(tmp_path):
    base = model_tensors(0)
    fts = []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        fts.append({k: v + torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.5)
                    if v.is_floating_point() else v for k, v in base.items()})  # fmt: skip
    return base, fts, write(tmp_path / "base", base, {"model": {}}), [write(tmp_path / f"ft{i}", f) for i, f in
                                                                      enumerate(fts)]  # fmt: skip


@pytest.mark.parametrize("hold_bytes", [0, 1 << 20], ids=["reread", "held"])
@pytest.mark.parametrize("case", list(PARAMS))
def test_streaming_in_chunks_equals_in_memory(ckpts, tmp_path, case, hold_bytes):
    base, fts, bdir, fdirs = ckpts
    method, params = case.split("_")[0] if case != "task_arithmetic" else case, PARAMS[case]
    out = load_file(merge(bdir, fdirs, tmp_path / "out", method=method, progress=False, chunk_elems=40,
                          hold_bytes=hold_bytes, experts=False, **params))  # fmt: skip
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(out[name], b)
            continue
        expected = merge_tensors(method, b, [f[name] for f in fts], name=name, **params)
        if case == "star_gram":  # Gram matrices summed chunk by chunk: fp64 rounding differs from one product
            torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("params", [{"method": "ties", "scope": "tensor", "density": 1.0},
                                    {"method": "ties", "scope": "tensor", "density": 0.9},
                                    {"method": "dare", "drop": 0.0, "combine": "ties"},
                                    {"method": "della", "density": 0.99, "epsilon": 0.005}])  # fmt: skip
@pytest.mark.parametrize("hold_bytes", [0, 1 << 20], ids=["reread", "held"])
def test_tie_break_sign_deferred_to_the_end_of_a_streamed_tensor(tmp_path, params, hold_bytes):
    # Most entries elect "-"; where +0.5 and -0.5 cancel, the tensor's majority (-1) decides: the streamed merge
    # writes the "+" mean first and must rewrite those entries once the whole tensor has voted.
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(16, 8)
    a, b = -torch.rand(16, 8, generator=g) - 0.5, -torch.rand(16, 8, generator=g) - 0.5
    tie = torch.rand(16, 8, generator=g) < 0.2
    a[tie], b[tie] = 0.5, -0.5
    bdir = write(tmp_path / "base", {"w": base})
    fdirs = [write(tmp_path / f"ft{i}", {"w": t}) for i, t in enumerate([a, b])]
    kw = {k: v for k, v in params.items() if k != "method"}
    out = merge(bdir, fdirs, tmp_path / "out", method=params["method"], progress=False, chunk_elems=16,
                hold_bytes=hold_bytes, **kw)  # fmt: skip
    expected = merge_tensors(params["method"], base, [a, b], name="w", **kw)
    if params["method"] == "ties" and params["density"] == 1.0:
        assert torch.all(expected[tie] == -0.5)  # the by-hand value: the mean of the "-" entries
    assert torch.equal(load_file(out)["w"], expected)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tensors"]["w"]
    assert report["norm_merged"] == pytest.approx(expected.norm().item(), rel=1e-6)


@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_global_scope_equals_one_in_memory_merge_of_the_flattened_model(ckpts, tmp_path, method):
    base, fts, bdir, fdirs = ckpts
    out = load_file(merge(bdir, fdirs, tmp_path / "out", method=method, progress=False, chunk_elems=40))
    names = [n for n in sorted(base) if base[n].is_floating_point()]
    flat = merge_tensors(method, torch.cat([base[n].reshape(-1) for n in names]),
                         [torch.cat([f[n].reshape(-1) for n in names]) for f in fts])  # fmt: skip
    got = torch.cat([out[n].reshape(-1) for n in names])
    torch.testing.assert_close(got, flat, rtol=1e-6, atol=1e-7)  # the same order statistics, same arithmetic
    per_tensor = load_file(merge(bdir, fdirs, tmp_path / "t", method=method, scope="tensor", progress=False))
    assert not torch.equal(per_tensor["embed.weight"], out["embed.weight"])  # the scope matters


def test_sharded_output_index_and_single_file_when_it_fits(ckpts, tmp_path):
    _, _, bdir, fdirs = ckpts
    single = merge(bdir, fdirs, tmp_path / "one", method="ties", progress=False)
    assert single.name == "model.safetensors" and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    index = merge(bdir, fdirs, tmp_path / "many", method="ties", progress=False, shard_size=1000)
    doc = json.loads(index.read_text())
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(doc["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 1000 + 1024 or len(load_file(s)) == 1 for s in shards)  # header slack
    a, b = load_file(single), Checkpoint(tmp_path / "many")
    assert sorted(a) == b.names and all(torch.equal(a[n], b.read(n)) for n in a)
    assert doc["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    # overwriting a sharded output with a single file removes the stale shards
    merge(bdir, fdirs, tmp_path / "many", method="ties", progress=False, overwrite=True)
    assert not list((tmp_path / "many").glob("model-*")) and not (tmp_path / "many" / index.name).exists()


def test_writer_places_tensors_written_in_any_order_and_patches_in_place(tmp_path):
    a, b = torch.arange(12.0).reshape(3, 4), torch.arange(6, dtype=torch.bfloat16)
    w = ShardedWriter(tmp_path / "out", [("a", (3, 4), torch.float32), ("b", (6,), torch.bfloat16)], 1 << 20, {})
    w.write("b", b[:4])  # b before a, each in chunks
    w.write("a", a[:2])
    w.write("b", b[4:])
    with pytest.raises(RuntimeError, match="'a' was not written completely"):
        w.commit()
    w.write("a", a[2:])
    with pytest.raises(RuntimeError, match="before they were written"):
        w.patch("a", torch.tensor([12]), torch.tensor([0.0]))
    w.patch("a", torch.tensor([1, 10]), torch.tensor([-1.0, -2.0]))
    with pytest.raises(RuntimeError, match="more bytes"):
        w.write("b", b[:1])
    out = load_file(w.commit())
    expected = a.clone().flatten()
    expected[[1, 10]] = torch.tensor([-1.0, -2.0])
    assert torch.equal(out["a"], expected.reshape(3, 4)) and torch.equal(out["b"], b)


def test_inputs_hf_sharded_dir_and_lightning_ckpt(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    hf = tmp_path / "hf"
    hf.mkdir()
    names = sorted(fts[0])
    save_file({n: fts[0][n] for n in names[:3]}, hf / "model-00001-of-00002.safetensors")
    save_file({n: fts[0][n] for n in names[3:]}, hf / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i >= 3)}-of-00002.safetensors" for i, n in enumerate(names)}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hparams = {"model": {"d_model": 16}, "router": {"k": 1}}
    ckpt = tmp_path / "ft1.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in fts[1].items()}, "hyper_parameters": hparams}, ckpt)
    ref = load_file(merge(bdir, fdirs[:2], tmp_path / "ref", method="ties", progress=False))
    got = load_file(merge(bdir, [hf, ckpt], tmp_path / "got", method="ties", progress=False))
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    # a Lightning base: the output gets an export-style config.json from its hyper-parameters
    bckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.items()}, "hyper_parameters": hparams}, bckpt)
    merge(bckpt, fdirs, tmp_path / "from_ckpt", progress=False)
    assert json.loads((tmp_path / "from_ckpt" / "config.json").read_text()) == hparams


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_not_executed(ckpts, tmp_path, monkeypatch):
    _, _, bdir, fdirs = ckpts
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "payload": Exploit()}, evil)
    with pytest.raises(ValueError, match=r"evil\.ckpt.*weights_only"):
        merge(bdir, [evil], tmp_path / "out", progress=False)
    assert not (tmp_path / "pwned_by_pickle").exists()
    assert not (tmp_path / "out").exists()


def test_mismatches_name_the_file_and_tensor(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    bad = dict(fts[0], **{"blocks.0.attn.w": torch.zeros(24, 15)})
    extra = dict(fts[0], bogus=torch.zeros(2))
    missing = {k: v for k, v in fts[0].items() if k != "blocks.0.norm.weight"}
    for label, tensors, pattern in [
        ("bad", bad, r"bad/model\.safetensors: tensor 'blocks\.0\.attn\.w' has shape \(24, 15\)"),
        ("extra", extra, r"extra.*extra tensor 'bogus'"),
        ("missing", missing, r"missing: missing tensor 'blocks\.0\.norm\.weight'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            merge(bdir, [fdirs[0], write(tmp_path / label, tensors)], tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    # an excluded name is copied from the base, so the models may lack it or shape it otherwise
    out = load_file(merge(bdir, [write(tmp_path / "bad2", bad), write(tmp_path / "missing2", missing)],
                          tmp_path / "excl", exclude=[r"attn\.w$", "norm"], progress=False))  # fmt: skip
    assert torch.equal(out["blocks.0.attn.w"], base["blocks.0.attn.w"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        merge(bdir, [tmp_path / "nowhere"], tmp_path / "never", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        merge(bdir, [broken], tmp_path / "never", progress=False)


def test_an_interrupted_merge_leaves_no_partial_output(ckpts, tmp_path, monkeypatch):
    _, _, bdir, fdirs = ckpts
    out = tmp_path / "out"
    first = load_file(merge(bdir, fdirs, out, progress=False, method="linear"))
    calls = []
    real = METHODS["ties"].apply

    def interrupted(chunk, stats, p):
        calls.append(chunk.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunk, stats, p)

    monkeypatch.setattr(METHODS["ties"], "apply", interrupted)
    for target in (out, tmp_path / "fresh"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            merge(bdir, fdirs, target, progress=False, method="ties", overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "config.json", "merge_report.json", "model.safetensors"]
    kept = load_file(out / "model.safetensors")
    assert all(torch.equal(kept[n], first[n]) for n in first)  # the earlier output is untouched


def test_vocab_crop_and_keep_base(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    big = dict(fts[0], **{"embed.weight": torch.cat([fts[0]["embed.weight"], torch.ones(3, 16)])})
    small = dict(fts[1], **{"embed.weight": fts[1]["embed.weight"][:7]})
    dirs = [write(tmp_path / "big", big), write(tmp_path / "small", small)]
    out = load_file(merge(bdir, dirs, tmp_path / "crop", method="task_arithmetic", lam=1.0, progress=False))
    b = base["embed.weight"]
    expected = b + (fts[0]["embed.weight"] - b) + torch.cat([fts[1]["embed.weight"][:7] - b[:7], torch.zeros(3, 16)])
    torch.testing.assert_close(out["embed.weight"], expected)
    kept = load_file(merge(bdir, dirs, tmp_path / "keep", method="task_arithmetic", vocab="base", progress=False))
    assert torch.equal(kept["embed.weight"], b)
    with pytest.raises(ValueError, match="vocab"):
        merge(bdir, dirs, tmp_path / "x", vocab="union", progress=False)


def test_tied_weights_exclude_vectors_and_dtype(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    # the base has a separate head; a model with tied embeddings saved only embed.weight
    base2 = dict(base, **{"head.weight": base["embed.weight"] + 1})
    tied_ft = {k: v for k, v in fts[0].items()}
    b2 = write(tmp_path / "b2", base2)
    f2 = write(tmp_path / "f2", tied_ft)
    f3 = write(tmp_path / "f3", dict(fts[1], **{"head.weight": fts[1]["embed.weight"] + 2}))
    out = load_file(merge(b2, [f2, f3], tmp_path / "tied", method="task_arithmetic", lam=1.0, progress=False))
    expected = base2["head.weight"] + (fts[0]["embed.weight"] - base2["head.weight"]) + (
        fts[1]["embed.weight"] + 2 - base2["head.weight"])  # fmt: skip
    torch.testing.assert_close(out["head.weight"], expected)
    # a base without the head (tied) keeps it tied: the output has no head either
    assert "head.weight" not in load_file(merge(bdir, [f3], tmp_path / "t2", progress=False))

    out = load_file(merge(bdir, fdirs, tmp_path / "ex", method="ties", exclude=[r"attn"], vectors="base",
                          out_dtype="bfloat16", progress=False))  # fmt: skip
    assert torch.equal(out["blocks.0.attn.w"], base["blocks.0.attn.w"].bfloat16())
    assert torch.equal(out["blocks.0.norm.weight"], base["blocks.0.norm.weight"].bfloat16())
    assert out["embed.weight"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64
    mean = load_file(merge(bdir, fdirs, tmp_path / "mean", method="ties", vectors="mean", progress=False))
    torch.testing.assert_close(
        mean["blocks.0.norm.weight"], torch.stack([f["blocks.0.norm.weight"] for f in fts]).mean(0)
    )


def test_experts_merge_one_by_one_and_router_rules(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    name = "blocks.0.moe.experts.w_up"
    out = load_file(merge(bdir, fdirs, tmp_path / "e", method="dare", drop=0.5, combine="ties", density=0.4,
                          scope="tensor", router_source="1", progress=False))  # fmt: skip
    for e in range(3):
        expected = merge_tensors("dare", base[name][e], [f[name][e] for f in fts], name=f"{name}[{e}]", drop=0.5,
                                 combine="ties", density=0.4, scope="tensor")  # fmt: skip
        assert torch.equal(out[name][e], expected)
    assert torch.equal(out["blocks.0.moe.router.weight"], fts[1]["blocks.0.moe.router.weight"])
    whole = load_file(merge(bdir, fdirs, tmp_path / "w", method="ties", scope="tensor", experts=False,
                            router_source="base", progress=False))  # fmt: skip
    assert torch.equal(whole[name], merge_tensors("ties", base[name], [f[name] for f in fts], scope="tensor"))
    assert torch.equal(whole["blocks.0.moe.router.weight"], base["blocks.0.moe.router.weight"])
    with pytest.raises(ValueError, match="router_source"):
        merge(bdir, fdirs, tmp_path / "x", router_source="7", progress=False)


def test_report_and_side_files(ckpts, tmp_path):
    base, fts, bdir, fdirs = ckpts
    (bdir / "tokenizer.json").write_text("{}")
    merge(bdir, fdirs, tmp_path / "out", method="ties", density=0.25, scope="tensor", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "config.json").read_text() == (bdir / "config.json").read_text()
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "ties" and report["params"]["density"] == 0.25
    row = report["tensors"]["blocks.0.attn.w"]
    assert row["kept_fraction"] == [0.25, 0.25, 0.25]  # 96 of 384 entries each
    taus = torch.stack([f["blocks.0.attn.w"] - base["blocks.0.attn.w"] for f in fts])
    assert row["norm_tau"] == pytest.approx(taus.flatten(1).norm(dim=1).tolist(), rel=1e-6)
    trimmed = taus * (taus.abs() >= taus.flatten(1).abs().kthvalue(384 - 96 + 1, dim=1).values[:, None, None])
    conflict = ((trimmed > 0).any(0) & (trimmed < 0).any(0)).sum() / (trimmed != 0).any(0).sum()
    assert row["sign_conflict_rate"] == pytest.approx(conflict.item())
    merged = load_file(tmp_path / "out" / "model.safetensors")["blocks.0.attn.w"]
    assert row["norm_delta"] == pytest.approx((merged - base["blocks.0.attn.w"]).norm().item(), rel=1e-5)
    assert set(report["tensors"]) >= {f"blocks.0.moe.experts.w_up[{e}]" for e in range(3)}


@pytest.mark.parametrize("method", ["dare", "ties", "della"])
def test_worker_threads_give_the_same_bytes_and_respect_the_memory_budget(ckpts, tmp_path, method, monkeypatch):
    mm = importlib.import_module("merging.engine")
    base, fts, bdir, fdirs = ckpts
    one = load_file(merge(bdir, fdirs, tmp_path / "one", method=method, progress=False, chunk_elems=40, workers=1))
    four = load_file(merge(bdir, fdirs, tmp_path / "four", method=method, progress=False, chunk_elems=40, workers=4))
    assert one.keys() == four.keys() and all(torch.equal(one[k], four[k]) for k in one)

    running, most, lock = [0], [0], threading.Lock()
    merge_unit = mm.Engine.merge_unit

    def counted(self, *args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.002)
            return merge_unit(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(mm.Engine, "merge_unit", counted)
    monkeypatch.setattr(mm, "MEMORY_BUDGET", 1)  # every tensor needs more than the budget: one at a time
    alone = load_file(merge(bdir, fdirs, tmp_path / "alone", method=method, progress=False, workers=4))
    assert most[0] == 1
    monkeypatch.setattr(mm, "MEMORY_BUDGET", 1 << 40)
    most[0] = 0
    merge(bdir, fdirs, tmp_path / "wide", method=method, progress=False, workers=4, overwrite=True)
    assert most[0] > 1
    assert all(torch.equal(alone[k], one[k]) for k in one)


def test_heap_policy_keeps_freed_buffers_in_the_heap_and_hands_them_back_after():
    # In a fresh interpreter (other tests change this process's heap), measured by the resident set: by default a
    # freed 64 MiB buffer is unmapped at once; inside the policy it stays resident for the next buffer; when the
    # policy ends it is handed back (trimmed off the heap top, or its pages released if small blocks sit above it),
    # and MiB-sized buffers are still recycled afterwards (mallopt ended glibc's dynamic thresholds for good).
    code = """
import os, torch
from merging import heap
if heap._libc() is None:
    print("skip")
    raise SystemExit
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = 64 << 20
x = torch.ones(big // 4)
r0 = rss()
del x
default = r0 - rss() > 0.9 * big  # unmapped on free
with heap.heap_policy():
    x = torch.ones(big // 4)
    r1 = rss()
    del x
    kept = r1 - rss() < 0.1 * big  # still resident
    r2 = rss()
after = r2 - rss() > 0.9 * big
import resource
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # 4 MiB buffers after the policy: reused from the heap, not mmapped and faulted in each time
    y = torch.ones(1 << 20)
    del y
reused = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 12 * 1025  # mmapped: 50 x 1025 faults
print(int(default), int(kept), int(after), int(reused))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc")
    assert out == ["1", "1", "1", "1"]


def test_per_tensor_statistics_are_dropped_once_the_tensor_is_merged(ckpts, tmp_path, monkeypatch):
    # DELLA's tensor-scope ranks are N x the tensor in fp32: kept for every tensor, they would add up to N x the model
    merge_module = importlib.import_module("merging.merge")
    sizes = []
    merge_unit = merge_module.Engine.merge_unit

    def recording(self, e, u, *args):
        merge_unit(self, e, u, *args)
        sizes.append(len(self.tensor_stats))

    monkeypatch.setattr(merge_module.Engine, "merge_unit", recording)
    _, _, bdir, fdirs = ckpts
    merge(bdir, fdirs, tmp_path / "out", method="della", scope="tensor", progress=False, chunk_elems=40, workers=1)
    assert len(sizes) >= 5 and sizes == [0] * len(sizes)
