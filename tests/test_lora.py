"""PEFT LoRA adapters as merge inputs: a real adapter from ``peft`` merges to PEFT's own ``merge_and_unload``
weights; hand-written adapters pin the scale, the transposes and the refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from merging import merge
from moe_merge_common.io import Checkpoint
from moe_merge_common.lora import CONFIG_NAME, WEIGHTS_NAME


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)


def peft_adapter(tmp_path, name, seed, **lora):
    """A base saved as safetensors, a LoRA adapter on it from ``peft`` (factors set to non-zero values) and the
    weights PEFT's ``merge_and_unload`` makes of them."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["emb", "proj", "out"], **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in wrapped.named_parameters():
            if "lora_" in key:  # PEFT starts B (and embeddings' A) at zero: the delta would be 0
                p.copy_(torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(tmp_path / name)
    return base, {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("lora", [dict(r=2, lora_alpha=4),  # scale alpha / r = 2
                                  dict(r=3, lora_alpha=2, use_rslora=True, rank_pattern={"out": 2},
                                       alpha_pattern={"proj": 5})])  # alpha / sqrt(r), per-module r and alpha
def test_task_arithmetic_of_a_peft_adapter_is_merge_and_unload(tmp_path, lora):
    base, expected = peft_adapter(tmp_path, "adapter", seed=1, **lora)
    b = tmp_path / "base.safetensors"
    out = merge(b, [f"{b}+{tmp_path / 'adapter'}"], tmp_path / "out", method="task_arithmetic", lam=1.0,
                progress=False)  # fmt: skip
    got = load_file(out)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(got["emb.weight"], base["emb.weight"]) and torch.equal(got["proj.bias"], base["proj.bias"])
    # a bare adapter directory in models= reads against the merge's base
    bare = load_file(merge(b, [tmp_path / "adapter"], tmp_path / "bare", method="task_arithmetic", lam=1.0,
                           progress=False))  # fmt: skip
    assert all(torch.equal(bare[k], got[k]) for k in got)
    # the same through Checkpoint(adapter, base=...), read in row ranges
    ck = Checkpoint(tmp_path / "adapter", base=Checkpoint(b))
    assert ck.names == sorted(base)
    torch.testing.assert_close(ck.read("proj.weight", (2, 5)), expected["proj.weight"][2:5], rtol=0, atol=1e-6)


def test_two_adapters_merge_like_the_models_they_make(tmp_path):
    # any method: TIES of two adapters equals TIES of the two merged-and-unloaded models saved as full checkpoints
    _, full1 = peft_adapter(tmp_path, "a1", seed=1, r=2, lora_alpha=4)
    _, full2 = peft_adapter(tmp_path, "a2", seed=2, r=2, lora_alpha=4)
    save_file(full1, tmp_path / "full1.safetensors")
    save_file(full2, tmp_path / "full2.safetensors")
    b = tmp_path / "base.safetensors"
    kw = dict(method="ties", density=0.5, scope="tensor", progress=False, chunk_elems=16)
    adapters = load_file(merge(b, [f"{b}+{tmp_path / 'a1'}", f"{b}+{tmp_path / 'a2'}"], tmp_path / "o1", **kw))
    full = [tmp_path / "full1.safetensors", tmp_path / "full2.safetensors"]
    models = load_file(merge(b, full, tmp_path / "o2", **kw))
    for k in models:
        torch.testing.assert_close(adapters[k], models[k], rtol=0, atol=1e-6, msg=k)


def write_adapter(path, tensors, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, **config}))
    return path


def test_scale_and_transposes_by_hand(tmp_path):
    A, B = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0], [0.0]])  # r = 1: B A = [[1, 2], [3, 6], [0, 0]]
    save_file({"lin.weight": torch.zeros(3, 2), "conv1d.weight": torch.zeros(2, 3)}, tmp_path / "base.safetensors")
    base = Checkpoint(tmp_path / "base.safetensors")
    # Linear [out 3, in 2]: alpha / r = 2 -> 2 B A
    ad = write_adapter(tmp_path / "lin", {"base_model.model.lin.lora_A.weight": A,
                                          "base_model.model.lin.lora_B.weight": B})  # fmt: skip
    expected = torch.tensor([[2.0, 4.0], [6.0, 12.0], [0.0, 0.0]])
    torch.testing.assert_close(Checkpoint(ad, base=base).read("lin.weight"), expected)
    # GPT-2 Conv1D stores [in 2, out 3] (fan_in_fan_out): the transpose; rslora with r = 1 keeps alpha / sqrt(1) = 2
    ad = write_adapter(tmp_path / "c1d", {"base_model.model.conv1d.lora_A.weight": A,
                                          "base_model.model.conv1d.lora_B.weight": B},
                       fan_in_fan_out=True, use_rslora=True)  # fmt: skip
    torch.testing.assert_close(Checkpoint(ad, base=base).read("conv1d.weight"), expected.T)
    assert torch.equal(Checkpoint(ad, base=base).read("lin.weight"), torch.zeros(3, 2))  # not a target: the base


@pytest.mark.parametrize("key, config, match", [
    ("base_model.model.missing.lora_A.weight", {}, "missing.weight"),  # a module the base lacks
    ("base_model.model.lin.lora_magnitude_vector", {}, "lora_magnitude_vector"),  # not a LoRA factor
    ("base_model.model.lin.modules_to_save.default.weight", {}, "modules_to_save"),
    ("base_model.model.lin.lora_A.weight", {"use_dora": True}, "use_dora"),
    ("base_model.model.lin.lora_A.weight", {"peft_type": "IA3"}, "IA3"),
])  # fmt: skip
def test_refuses_what_it_cannot_map_naming_it(tmp_path, key, config, match):
    save_file({"lin.weight": torch.zeros(3, 2)}, tmp_path / "base.safetensors")
    tensors = {key: torch.ones(1, 2)}
    if key.endswith("lora_A.weight"):
        tensors[key.replace("lora_A", "lora_B")] = torch.ones(3, 1)
    ad = write_adapter(tmp_path / "ad", tensors, **config)
    with pytest.raises(ValueError, match=match):
        Checkpoint(ad, base=Checkpoint(tmp_path / "base.safetensors"))


def test_an_adapter_needs_its_base_and_plus_in_a_real_path_is_a_path(tmp_path):
    save_file({"lin.weight": torch.zeros(3, 2)}, tmp_path / "base.safetensors")
    ad = write_adapter(tmp_path / "ad", {"base_model.model.lin.lora_A.weight": torch.ones(1, 2),
                                         "base_model.model.lin.lora_B.weight": torch.ones(2, 1)})  # fmt: skip
    with pytest.raises(ValueError, match="BASE\\+ADAPTER"):
        Checkpoint(ad)
    with pytest.raises(ValueError, match="lin.weight"):  # B's 2 rows do not fit the base's 3
        Checkpoint(f"{tmp_path / 'base.safetensors'}+{ad}")
    # a checkpoint whose own name has a "+" (this repo's "copy+add" task dirs) is read as it is
    save_file({"lin.weight": torch.ones(3, 2)}, tmp_path / "copy+add.safetensors")
    assert torch.equal(Checkpoint(tmp_path / "copy+add.safetensors").read("lin.weight"), torch.ones(3, 2))


@pytest.mark.parametrize("tensors, config, match", [
    ({"A": torch.ones(0, 2), "B": torch.ones(3, 0)}, {}, r"lora_A \(0, 2\) has rank 0"),
    ({}, {"lora_alpha": "big"}, r"lora_alpha 'big' is not a finite number"),
    ({}, {"lora_alpha": float("nan")}, r"lora_alpha nan is not a finite number"),
    ({}, {"alpha_pattern": ["lin"]}, r"alpha_pattern: expected an object"),
    ({}, {"alpha_pattern": {"(?=lin)": 4}}, r"alpha_pattern\[.*\]=.*not a pattern this library matches"),
])  # fmt: skip
def test_malformed_adapter_configs_are_refused_naming_the_field(tmp_path, tensors, config, match):
    save_file({"lin.weight": torch.zeros(3, 2)}, tmp_path / "base.safetensors")
    A, B = tensors.get("A", torch.ones(1, 2)), tensors.get("B", torch.ones(3, 1))
    ad = write_adapter(tmp_path / "ad", {"base_model.model.lin.lora_A.weight": A,
                                         "base_model.model.lin.lora_B.weight": B}, **config)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        Checkpoint(ad, base=Checkpoint(tmp_path / "base.safetensors"))
    (ad / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object, got list"):
        Checkpoint(ad, base=Checkpoint(tmp_path / "base.safetensors"))


def test_an_alpha_pattern_that_backtracks_is_matched_in_linear_time(tmp_path):
    """``(a+)+b`` against a module named 34 a's then ``.c``: Python's re tries every split of the a's (0.04 s at
    20 a's here, doubling with each one: about ten minutes at 34); RE2 answers at once, and PEFT's lookup semantics
    hold (the first pattern that matches the name's end gives the alpha)."""
    import time

    module = "a" * 34 + ".c"
    save_file({f"{module}.weight": torch.zeros(3, 2)}, tmp_path / "base.safetensors")
    ad = write_adapter(tmp_path / "ad", {f"base_model.model.{module}.lora_A.weight": torch.ones(1, 2),
                                         f"base_model.model.{module}.lora_B.weight": torch.ones(3, 1)},
                       alpha_pattern={"(a+)+b": 100, "c": 4})  # fmt: skip
    start = time.perf_counter()
    merged = Checkpoint(ad, base=Checkpoint(tmp_path / "base.safetensors")).read(f"{module}.weight")
    assert time.perf_counter() - start < 5
    torch.testing.assert_close(merged, torch.full((3, 2), 4.0))  # "c" ends the name: alpha 4, r 1
