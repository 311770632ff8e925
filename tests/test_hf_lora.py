"""LoRA for model=hf (model.lora, through PEFT): the base stays frozen, adapters on attention projections and on
our batched expert parameters train, and the run exports the merged model plus the PEFT adapter directory, which
`merging` reads against the source model to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe.config import LoraConfig, ModelConfig, RouterConfig

from .hf_models import VOCAB, save_model

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM  # noqa: E402

from moe.hf.model import HFCausalLM  # noqa: E402
from moe.train.run import run  # noqa: E402

from .test_configs import compose_train  # noqa: E402
from .test_hf_train import corpus, overrides  # noqa: E402, F401 (the corpus fixture)


def test_lora_on_attention_and_batched_experts_exports_the_merged_model_with_equal_logits(tmp_path):
    src = save_model("mixtral", tmp_path / "src")
    lora = LoraConfig(r=4, target=["q_proj", "v_proj"], target_parameters=["experts.w_gate", "experts.w_down"])
    model = HFCausalLM(ModelConfig(_target_="moe.hf.model.HFCausalLM", path=str(src), lora=lora),
                       RouterConfig(kind="from_model"))  # fmt: skip
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable) and any("q_proj" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(x)[0]
    out = model.export(tmp_path / "export")
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x).logits, ours, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x)[0], ours)  # exporting merged a copy, not the model
    assert (tmp_path / "export_adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_lora_run_trains_only_the_adapters_and_merging_reads_its_adapter(corpus, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from merging import merge

    src = save_model("llama", tmp_path / "src")
    targets = "model.lora.target=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    results = run(compose_train(overrides(src, corpus, tmp_path / "run", "model.lora.r=4", targets,
                                          "optim.lr=0.01")))  # fmt: skip
    export, adapter = Path(results["export"]), tmp_path / "run" / "export_adapter"
    base, tuned = load_file(src / "model.safetensors"), load_file(export / "model.safetensors")
    assert sorted(base) == sorted(tuned)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only what the adapters cover moved
    merged = merge(src, [adapter], tmp_path / "merged", method="task_arithmetic", lam=1.0)
    got = load_file(merged)
    for k in base:
        assert torch.allclose(got[k], tuned[k], rtol=1e-5, atol=1e-6), k


def test_expert_adapters_with_expert_parallelism_are_refused_before_any_work():
    from moe.train.checks import check_parallel

    cfg = compose_train(["model=hf", "model.path=/nowhere", "model.lora.r=4", "trainer=ddp", "parallel.ep_size=2",
                         "model.lora.target_parameters=[experts.w_gate]"])  # fmt: skip
    with pytest.raises(ValueError, match=r"model.lora.target_parameters with parallel.ep_size=2"):
        check_parallel(cfg)
