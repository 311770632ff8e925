"""Merge methods on hand-computed numbers, and the streaming merge's I/O safety."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging import METHODS, merge, merge_tensors
from merging.methods import elect_sign, trim_topk


def test_ties_hand_computed():
    base = torch.zeros(5)
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
    t2 = torch.tensor([-2.0, -3.0, 0.1, 1.0, 5.0])
    t3 = torch.tensor([1.0, 2.0, -0.2, -6.0, 0.3])
    # density 0.4 of 5 entries keeps the ceil(2.0) = 2 largest magnitudes of each task vector
    #   t1 keeps [3, ., ., ., -4] (|2| < 3);  t2 keeps [., -3, ., ., 5];  t3 keeps [., 2, ., -6, .]
    # elected sign of the sums [3, -1, 0, -6, 1] -> [+, -, tie->majority, -, +]; majority of [+,-,-,+] is a tie -> +
    # disjoint mean: e0 = 3 (t1); e1 = -3 (t2 only, t3's +2 disagrees); e2 = 0; e3 = -6; e4 = (-4 disagrees) 5
    merged = merge_tensors("ties", base, [t1, t2, t3], density=0.4, lam=1.0)
    torch.testing.assert_close(merged, torch.tensor([3.0, -3.0, 0.0, -6.0, 5.0]))
    # lam scales the merged task vector, relative to the base
    merged = merge_tensors("ties", base + 1, [t1 + 1, t2 + 1, t3 + 1], density=0.4, lam=0.5)
    torch.testing.assert_close(merged, 1 + 0.5 * torch.tensor([3.0, -3.0, 0.0, -6.0, 5.0]))


def test_ties_output_agrees_with_elected_sign():
    base = torch.randn(64, 32)
    fts = [base + torch.randn(64, 32) for _ in range(4)]
    merged = merge_tensors("ties", base, fts, density=0.3)
    trimmed = trim_topk(torch.stack(fts) - base, 0.3)
    delta = merged - base
    nz = delta != 0
    assert nz.any()
    assert torch.equal(torch.sign(delta[nz]), elect_sign(trimmed)[nz])


def test_trim_keeps_density_and_ties_at_threshold():
    tau = torch.randn(3, 1000)
    kept = (trim_topk(tau, 0.2) != 0).float().mean(1)
    torch.testing.assert_close(kept, torch.full((3,), 0.2))
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert (trim_topk(tied, 0.25) != 0).sum() == 3  # all entries tied at the threshold survive
    with pytest.raises(ValueError, match="density"):
        trim_topk(tau, 0.0)


def test_task_arithmetic_and_linear_hand_computed():
    base = torch.tensor([1.0, 2.0])
    fts = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 5.0])]
    torch.testing.assert_close(merge_tensors("task_arithmetic", base, fts, lam=0.5), torch.tensor([1.5, 3.5]))
    torch.testing.assert_close(
        merge_tensors("task_arithmetic", base, fts, lam=1.0, weights=[2.0, 0.0]), torch.tensor([3.0, 2.0])
    )
    torch.testing.assert_close(merge_tensors("linear", base, fts, weights=[1.0, 3.0]), torch.tensor([1.25, 4.25]))


def test_bad_method_parameters_are_named():
    with pytest.raises(ValueError, match="nope"):
        merge_tensors("nope", torch.zeros(1), [torch.zeros(1)])
    with pytest.raises(ValueError, match="drop"):
        merge_tensors("ties", torch.zeros(1), [torch.zeros(1)], drop=0.5)
    with pytest.raises(ValueError, match="weights"):
        merge_tensors("task_arithmetic", torch.zeros(1), [torch.zeros(1)], weights=[1.0, 2.0])
    assert {"linear", "task_arithmetic", "ties"} <= set(METHODS)


def write(path, tensors, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(1)
    base = {"w": torch.randn(6, 4, dtype=torch.bfloat16), "b": torch.randn(4), "steps": torch.tensor([3])}
    fts = [
        {k: (v + torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v) for k, v in base.items()}
        for _ in range(2)
    ]
    return (write(tmp_path / "base", base, {"model": {}}), [write(tmp_path / f"ft{i}", f) for i, f in enumerate(fts)])


def test_streaming_merge_equals_in_memory(checkpoints, tmp_path):
    base, fts = checkpoints
    # scope="tensor": thresholds per tensor, as merge_tensors on one tensor (the default, "global", spans the model)
    path = merge(base, fts, tmp_path / "out", method="ties", density=0.5, scope="tensor", progress=False)
    out = load_file(path)
    b = load_file(base / "model.safetensors")
    f = [load_file(p / "model.safetensors") for p in fts]
    for name in ("w", "b"):
        expected = merge_tensors("ties", b[name], [x[name] for x in f], density=0.5, scope="tensor").to(b[name].dtype)
        assert out[name].dtype == b[name].dtype
        torch.testing.assert_close(out[name], expected)
    assert torch.equal(out["steps"], b["steps"])  # integer buffers come from the base
    assert (tmp_path / "out" / "config.json").read_text() == (base / "config.json").read_text()
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["merge_method"] == "ties"
    out32 = load_file(merge(base, fts, tmp_path / "out32", method="ties", out_dtype="float32", progress=False))
    assert out32["w"].dtype == torch.float32


def test_merge_refuses_to_overwrite_inputs_and_leaves_nothing_on_failure(checkpoints, tmp_path):
    base, fts = checkpoints
    before = (fts[0] / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is the input"):
        merge(base, fts, fts[0], progress=False)
    with pytest.raises(ValueError, match="is the input"):
        merge(base, fts, base, progress=False)
    assert (fts[0] / "model.safetensors").read_bytes() == before
    out = tmp_path / "out"
    merge(base, fts, out, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        merge(base, fts, out, progress=False)
    merge(base, fts, out, progress=False, overwrite=True)
    # a mismatched model fails before anything is written, naming the file and the tensor
    bad = write(
        tmp_path / "bad",
        {"w": torch.zeros(5, 4, dtype=torch.bfloat16), "b": torch.zeros(4), "steps": torch.tensor([3])},
    )
    with pytest.raises(ValueError, match=r"bad.*'w'.*shape"):
        merge(base, [fts[0], bad], tmp_path / "never", progress=False)
    assert not (tmp_path / "never" / "model.safetensors").exists()
    assert not list((tmp_path / "never").glob("*.tmp")) if (tmp_path / "never").exists() else True
    missing = write(tmp_path / "missing", {"w": torch.zeros(6, 4, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="missing"):
        merge(base, [missing], tmp_path / "never2", progress=False)
