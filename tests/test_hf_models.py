"""model=hf (moe/hf): tiny random Hugging Face models built in code load with our MoE layers and give
transformers' logits, export back bit for bit under transformers' own names, and bad sources fail naming them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.config import ModelConfig, RouterConfig

from .hf_models import VOCAB, save_model

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM  # noqa: E402

from moe.hf.blocks import HFMoEBlock  # noqa: E402
from moe.hf.model import HFCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
FROM_MODEL = RouterConfig(kind="from_model")


def hf_cfg(path, **kw) -> ModelConfig:
    return ModelConfig(_target_="moe.hf.model.HFCausalLM", path=str(path), **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {a: save_model(a, root / a, seed=i) for i, a in enumerate([*MOE_ARCHS, "llama"])}


def tokens(B=3, S=17, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("arch", [*MOE_ARCHS, "llama"])
def test_logits_equal_transformers_and_the_export_round_trips_bit_for_bit(models, arch, tmp_path):
    src = models[arch]
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ours = HFCausalLM(hf_cfg(src), FROM_MODEL).eval()
    x = tokens()
    with torch.no_grad():
        want, (got, routings) = ref(x).logits, ours(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    n_moe = sum(isinstance(m, HFMoEBlock) for m in ours.modules())
    assert len(routings) == n_moe and n_moe == (0 if arch == "llama" else 1 if arch == "deepseek_v3" else 2)

    out = ours.export(tmp_path / "export")
    before, after = tensors(src), tensors(out)
    assert sorted(before) == sorted(after)  # transformers' own names, nothing dropped or added
    experts = [k for k in before if ".experts." in k]
    assert len(experts) == sum(".experts." in k for k in after) and (arch == "llama" or experts)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and after[name].shape == t.shape, name
        assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name  # bytes, not values
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x).logits, got, rtol=1e-5, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] and modes["config.json"] & 0o044, modes  # readable


def test_a_bf16_checkpoint_trains_in_fp32_and_exports_back_in_bf16_bit_for_bit(tmp_path):
    src = save_model("qwen3_moe", tmp_path / "src", dtype=torch.bfloat16)
    ours = HFCausalLM(hf_cfg(src), FROM_MODEL)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    out = ours.export(tmp_path / "export")
    before, after = tensors(src), tensors(out)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(after[k].view(torch.uint8), t.view(torch.uint8)) for k, t in before.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_fused_expert_layout_on_disk_loads_to_the_same_model(models, tmp_path):
    fused = save_model("mixtral", tmp_path / "fused", seed=0, fused=True)
    assert any("gate_up_proj" in k for k in tensors(fused))
    a = HFCausalLM(hf_cfg(models["mixtral"]), FROM_MODEL).state_dict()
    b = HFCausalLM(hf_cfg(fused), FROM_MODEL).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_export_missing_one_expert_tensor_is_reported_by_transformers_never_silent(models, tmp_path):
    from safetensors.torch import load_file, save_file

    out = HFCausalLM(hf_cfg(models["mixtral"]), FROM_MODEL).export(tmp_path / "export")
    state = load_file(out / "model.safetensors")
    dropped = next(k for k in state if k.endswith("experts.2.w3.weight"))
    del state[dropped]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception):  # noqa: B017 (transformers refuses a partial fused expert tensor)
        _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info


def test_router_choice_replaces_the_checkpoint_routing_and_an_inexpressible_one_exports_our_format(models, tmp_path):
    from moe.export import load_model

    model = HFCausalLM(hf_cfg(models["olmoe"]), RouterConfig(kind="gumbel", k=2))
    assert model.router_cfg.kind == "gumbel" and model.export_problems
    out = model.export(tmp_path / "export")
    assert (out / "model.safetensors").is_file() and "model" in json.loads((out / "config.json").read_text())
    again = load_model(out)
    assert isinstance(again, HFCausalLM) and again.router_cfg.kind == "gumbel"
    k1 = HFCausalLM(hf_cfg(models["mixtral"]), RouterConfig(k=1))  # softmax top-1: the config can say it
    assert json.loads((k1.export(tmp_path / "k1") / "config.json").read_text())["num_experts_per_tok"] == 1


def test_a_gguf_file_loads_through_model_gguf_file_with_its_own_tokenizer(models, tmp_path):
    """A tiny Llama written as F32 GGUF the way llama.cpp lays it out (q/k rows permuted, BPE tokenizer in the
    metadata): model.gguf_file gives the source model's logits exactly, and the GGUF's tokenizer its ids."""
    pytest.importorskip("gguf")
    from .hf_models import save_gguf

    (tmp_path / "g").mkdir()
    save_gguf(models["llama"], tmp_path / "g" / "tiny.gguf")
    cfg = hf_cfg(tmp_path / "g", gguf_file="tiny.gguf")
    ours = HFCausalLM(cfg, FROM_MODEL).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours(x)[0], AutoModelForCausalLM.from_pretrained(models["llama"]).eval()(x).logits)
    text = "def add(a, b):\n    return naïve café"
    ref = transformers.AutoTokenizer.from_pretrained(models["llama"])
    ids = HFCausalLM.tokenizer(cfg)(text, add_special_tokens=False)["input_ids"]  # (5.1 adds a BOS, 5.25 not)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    out = ours.export(tmp_path / "export")  # GGUF in, safetensors out: the source model's tensors, bit for bit
    before, after = tensors(models["llama"]), tensors(out)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(path=None), r"model.path: required by model=hf"),
        (dict(path="/nonexistent/model"), r"model.path=/nonexistent/model: no such directory"),
        (dict(gguf_file="model.gguf"), r"model.gguf_file=model.gguf: no such file in"),
        (dict(dtype="fp8"), r"model.dtype='fp8': expected one of"),
    ],
)
def test_bad_sources_fail_naming_the_key(models, cfg, match):
    base = dict(path=str(models["mixtral"]))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        HFCausalLM(ModelConfig(_target_="moe.hf.model.HFCausalLM", **{**base, **cfg}), FROM_MODEL)


def test_a_directory_without_config_json_and_an_unconverted_moe_architecture_are_refused(models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        HFCausalLM(hf_cfg(tmp_path / "empty"), FROM_MODEL)
    from moe.hf.model import check_architecture

    with pytest.raises(ValueError, match=r"model_type='jamba' is an MoE architecture"):
        check_architecture(transformers.JambaConfig(num_experts=4))


def test_router_from_model_needs_model_hf_and_init_from_an_hf_directory_says_so(models):
    from moe.export import load_checkpoint
    from moe.nn.model import MoETransformer

    with pytest.raises(ValueError, match=r"router.kind=from_model .* needs model=hf"):
        MoETransformer(ModelConfig(vocab_size=8, max_seq_len=8), FROM_MODEL)
    with pytest.raises(ValueError, match=r"a Hugging Face model config \('mixtral'\).*model=hf model.path="):
        load_checkpoint(models["mixtral"])


def test_cli_export_of_a_checkpoint_refuses_other_runs_and_bad_paths(tmp_path):
    run = subprocess.run([sys.executable, "-m", "moe.hf", "export", str(tmp_path / "none.ckpt"), str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert run.returncode == 1 and run.stderr.startswith("Error: ") and "none.ckpt" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "o").exists()
