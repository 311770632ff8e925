"""Parity with the reference implementations.

- PEFT ``peft.utils.merge_utils`` (``ties``, ``dare_linear``, ``dare_ties``) on random tensors. DARE draws its masks
  from another RNG than PEFT's global ``torch.bernoulli``, so the DARE tests hand PEFT the very masks this library
  draws (``torch.bernoulli`` patched to return them, checking it was asked for the same keep probability): the
  comparison is then exact. drop = 0 (PEFT density 1, no pruning) is checked as well.
- mergekit (``mergekit-pytorch`` run in-process on a small safetensors fixture): ties, task_arithmetic, linear,
  breadcrumbs, slerp, model_stock. Skipped without mergekit (the ``merge-bench`` extra).
- FusionBench: TSV-M, Iso-C, Iso-CTS, SLERP between two models. Skipped without ``fusion_bench``.
- Reference code that cannot be installed, written from its source: the TIES repo's ``topk_values_mask`` count,
  MergeLM's TIES after DARE, PCB's ``pcb-merging.py``.

Each test prints ``parity <reference> <method>: max |diff| = ...`` (``pytest -s``); BENCHMARKS.md records them.
"""

import importlib.util

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging import merge, merge_tensors
from merging.registry import Stream
from merging.sparsify import bernoulli_keep

from .test_merge_methods import pcb_reference, ties_reference


def report(reference: str, method: str, diff: float) -> float:
    print(f"parity {reference} {method}: max |diff| = {diff:.3g}")
    return diff


def random_taus(n=4, shape=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- PEFT


def test_ties_matches_peft():
    mu = pytest.importorskip("peft.utils.merge_utils")
    taus, w = random_taus(), torch.tensor([1.0, 0.7, 1.3, 0.4])
    # PEFT: top int(density n) per tensor, sign elected on the unweighted trimmed tensors, weighted sum / count
    ref = mu.ties(taus, w, 0.2)
    ours = merge_tensors("ties", torch.zeros(64, 48), taus, density=0.2, scope="tensor", weights=w.tolist(),
                         divisor="count", lam=1.0)  # fmt: skip
    assert report("peft", "ties", (ours - ref).abs().max().item()) < 1e-6
    assert ((ours != 0) == (ref != 0)).all()  # the same entries survive: the count is PEFT's int(0.2 * 3072) = 614


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_matches_peft_with_the_same_masks(monkeypatch, combine):
    mu = pytest.importorskip("peft.utils.merge_utils")
    taus, w = random_taus(seed=1), torch.tensor([1.0, 0.5, 2.0, 0.8])
    keep = 0.25  # drop 0.75: 1 - (1 - 0.25) == 0.25 exactly, so both sides rescale by the same 1 / 0.25
    masks = iter(bernoulli_keep((64, 48), keep, [Stream(7, "w", i) for i in range(4)]))

    def same_masks(p):  # PEFT's random_pruning: torch.bernoulli(full_like(tensor, density)), once per task vector
        assert torch.all(p == keep)
        return next(masks)

    monkeypatch.setattr(mu.torch, "bernoulli", same_masks)
    ref = (mu.dare_linear if combine == "linear" else mu.dare_ties)(taus, w, keep)
    ours = merge_tensors("dare", torch.zeros(64, 48), taus, name="w", seed=7, drop=0.75, combine=combine,
                         weights=w.tolist(), divisor="count", lam=1.0)  # fmt: skip
    assert report("peft", f"dare_{combine}", (ours - ref).abs().max().item()) < 1e-5
    monkeypatch.undo()
    # drop 0: PEFT does not prune at density 1, and neither does DARE
    edge = (mu.dare_linear if combine == "linear" else mu.dare_ties)(taus, w, 1.0)
    ours = merge_tensors("dare", torch.zeros(64, 48), taus, drop=0.0, combine=combine, weights=w.tolist(),
                         divisor="count", lam=1.0)  # fmt: skip
    torch.testing.assert_close(ours, edge)


# ------------------------------------------------------------------------------ reference code, as written


def mergelm_ties(tau: torch.Tensor, mask_rate: float, scaling: float) -> torch.Tensor:
    """MergeLM ``ties_merging`` on flattened task vectors [n, d], from its source: threshold at the
    int(d * mask_rate)-th smallest magnitude (kept if >=), sign of the sum (zeros -> sign of the sum of signs),
    mean of the agreeing nonzero entries."""
    thr = tau.abs().kthvalue(int(tau.shape[1] * mask_rate), dim=1, keepdim=True).values
    tau = tau * (tau.abs() >= thr)
    signs = torch.sign(tau.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    keep = ((signs > 0) & (tau > 0)) | ((signs < 0) & (tau < 0))
    kept = tau * keep
    return scaling * kept.sum(0) / (kept != 0).sum(0).float().clamp(min=1.0)


def test_dare_ties_trim_matches_mergelm_and_ties_is_one_entry_from_the_ties_code():
    taus = torch.stack(random_taus(3, (30, 20), seed=2))
    flat = taus.reshape(3, -1)
    # DARE (drop 0) + TIES trim at density 0.3 = MergeLM's TIES at mask rate 0.7: 600 - int(420) + 1 = 181 kept
    ours = merge_tensors("dare", torch.zeros(30, 20), list(taus), drop=0.0, combine="ties", density=0.3, lam=1.0)
    ref = mergelm_ties(flat, 0.7, 1.0).reshape(30, 20)
    assert report("mergelm", "dare_ties_trim", (ours - ref).abs().max().item()) < 1e-6
    # TIES keeps int(600 * 0.3) = 180 (PEFT, mergekit); the TIES code thresholds at rank 600 - 180 = 420 (181 kept)
    ours = merge_tensors("ties", torch.zeros(30, 20), list(taus), density=0.3, lam=1.0)
    torch.testing.assert_close(ours.reshape(-1), ties_reference(flat, 0.3, 1.0))
    code = ties_reference(flat, 0.3, 1.0, kth=600 - int(600 * 0.3))
    changed = (ours.reshape(-1) != code).sum().item()
    assert 1 <= changed <= 3  # at most the one extra entry of each of the 3 task vectors
    report("ties-code", "ties (one entry per task vector)", (ours.reshape(-1) - code).abs().max().item())


def test_pcb_matches_the_reference_code_where_its_counts_round():
    # d = 997 (prime): d q, d (1 - q) and d (1 - r) are never integers, so the int() in every index matters
    taus = torch.stack(random_taus(3, (997,), seed=3))
    for ratio, q in ((0.1, 0.01), (0.05, 0.0001), (0.3, 0.03)):
        ours = merge_tensors("pcb", torch.zeros(997), list(taus), ratio=ratio, clamp_q=q, lam=1.0)
        diff = (ours - pcb_reference(taus, ratio, q, 1.0)).abs().max().item()
        assert report("pcb-code", f"pcb r={ratio} q={q}", diff) < 1e-5


# ------------------------------------------------------------------------------------------------ mergekit


@pytest.fixture(scope="module")
def mergekit_run(tmp_path_factory):
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed (pip install -e '.[merge-bench]')")
    from mergekit.scripts.merge_raw_pytorch import main

    d = tmp_path_factory.mktemp("mergekit")
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 48, generator=g), "a.bias": torch.randn(48, generator=g),
            "b.weight": torch.randn(16, 40, generator=g), "c.bias": torch.randn(4, generator=g)}  # fmt: skip
    save_file(base, d / "base.safetensors")
    fts = []
    for i in range(3):
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, d / f"ft{i}.safetensors")
        fts.append(d / f"ft{i}.safetensors")

    def run(name, method, n, params=None, model_params=None, base_model=True, **ours):
        models = [{"model": str(f), **({"parameters": model_params} if model_params else {})} for f in fts[:n]]
        if model_params and "weight" in model_params:  # distinct weights per model
            for m, w in zip(models, (1.0, 0.5, 0.8)):
                m["parameters"] = {**model_params, "weight": w}
            ours.setdefault("weights", [1.0, 0.5, 0.8][:n])
        cfg = {"merge_method": method, "dtype": "float32", "models": models, "parameters": params or {}}
        if base_model:
            cfg["base_model"] = str(d / "base.safetensors")
        (d / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        main.main([str(d / f"{name}.yml"), str(d / f"mk_{name}"), "--quiet"], standalone_mode=False)
        theirs = load_file(d / f"mk_{name}" / "model.safetensors")
        mine = load_file(merge(d / "base.safetensors", fts[:n], d / f"ours_{name}", method=method, progress=False,
                               **ours))  # fmt: skip
        return max((mine[k] - theirs[k]).abs().max().item() for k in base)

    return run


# mergekit's TIES: per-tensor top max(1, int(density n)) (c.bias: int(0.8) = 0 -> 1), sign elected on the
# weighted deltas, weighted disjoint mean; breadcrumbs: per tensor, no rescale; slerp: base and one model.
MERGEKIT_CASES = {
    "ties": ("ties", 3, None, {"weight": 1.0, "density": 0.2},
             dict(density=0.2, scope="tensor", weighted_sign=True, lam=1.0)),
    "task_arithmetic": ("task_arithmetic", 3, None, {"weight": 1.0}, dict(lam=1.0)),
    "linear": ("linear", 3, None, {"weight": 1.0}, {}),
    "breadcrumbs": ("breadcrumbs", 3, None, {"weight": 1.0, "density": 0.8, "gamma": 0.05},
                    dict(density=0.8, gamma=0.05, lam=1.0)),
    "slerp": ("slerp", 1, {"t": 0.3}, None, dict(t=0.3)),
    "model_stock": ("model_stock", 3, None, None, {}),
    "model_stock_filter_wise": ("model_stock", 3, {"filter_wise": True}, None, dict(filter_wise=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_matches_mergekit(mergekit_run, case):
    method, n, params, model_params, ours = MERGEKIT_CASES[case]
    diff = mergekit_run(case, method, n, params, model_params, base_model=method != "linear", **ours)
    assert report("mergekit", case, diff) < 1e-5


# --------------------------------------------------------------------------------------------- FusionBench


@pytest.fixture(scope="module")
def fusion_bench():
    if importlib.util.find_spec("fusion_bench") is None:
        pytest.skip("fusion_bench is not installed (pip install fusion-bench)")
    try:
        from fusion_bench.method.isotropic_merging import iso_utils
        from fusion_bench.method.slerp import slerp_utils
        from fusion_bench.method.task_singular_vector.utils import TSVM_utils
    except ImportError as e:  # e.g. its hydra import needs hydra-core 1.3
        pytest.skip(f"fusion_bench does not import here ({e})")
    return iso_utils, TSVM_utils, slerp_utils


SHAPES = {"tall": (40, 24), "wide": (18, 30), "square": (7, 7), "thin": (2, 9), "vector": (24,)}


def _task_vectors(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return base, [{k: torch.randn(s, generator=g) * (1 + i) for k, s in SHAPES.items()} for i in range(n)]


@pytest.mark.parametrize("method, params", [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}),
                                            ("iso_cts", {"common_fraction": 0.5})])  # fmt: skip
def test_matches_fusion_bench(fusion_bench, method, params):
    iso_utils, TSVM_utils, _ = fusion_bench
    base, tvs = _task_vectors()
    copies = [dict(tv) for tv in tvs]
    if method == "tsv_m":
        ref = TSVM_utils.compute_and_sum_svd_mem_reduction(copies, accelerator="cpu")
    elif method == "iso_c":
        ref = iso_utils.iso_c(copies, accelerator="cpu")
    else:
        ref = iso_utils.iso_cts(copies, params["common_fraction"] if params else 0.8, accelerator="cpu")
    worst = 0.0
    for k in SHAPES:
        ours = merge_tensors(method, base[k], [base[k] + tv[k] for tv in tvs], **params) - base[k]
        # fp32 SVDs (both sides): differences scale with the delta (in fp64 the two agree to 1e-13); "thin" has
        # r = 2 < T = 3, so TSV-M keeps k = 0 directions there: both give 0
        diff = (ours - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1.0)
        worst = max(worst, diff)
    label = " ".join([method, *(f"{k}={v}" for k, v in params.items())])
    assert report("fusion_bench", f"{label} (relative to max |delta|)", worst) < 1e-4


def test_slerp_matches_fusion_bench(fusion_bench):
    slerp_utils = fusion_bench[2]
    base, tvs = _task_vectors(seed=4, n=2)
    worst = 0.0
    for k in SHAPES:
        a, b = base[k] + tvs[0][k], base[k] + tvs[1][k]
        for t in (0.2, 0.7):
            diff = merge_tensors("slerp", base[k], [a, b], t=t) - slerp_utils.slerp(t, a, b)
            worst = max(worst, diff.abs().max().item())
    assert report("fusion_bench", "slerp (two models)", worst) < 1e-5
