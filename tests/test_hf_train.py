"""`python train.py model=hf data=text` end to end on tiny random Hugging Face models built in code: each
architecture trains a few steps on a corpus of files, with routing statistics, and ends with an export that
transformers loads with our logits and our tensors bit for bit; under `trainer=ddp parallel.ep_size=2` too, and
`python -m moe.hf export` of the run's checkpoint writes the same tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .hf_models import TEXT, save_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM  # noqa: E402

from moe.config import ModelConfig, RouterConfig  # noqa: E402
from moe.export import load_checkpoint  # noqa: E402
from moe.hf.export import hf_state_dict  # noqa: E402
from moe.hf.model import HFCausalLM  # noqa: E402
from moe.train.run import run  # noqa: E402

from .test_configs import compose_train  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "code").mkdir()
    (root / "prose").mkdir()
    lines = TEXT.splitlines()
    for i in range(12):  # documents of a few hundred tokens: both groups hold validation windows
        (root / "code" / f"m{i}.py").write_text("\n".join(lines[(i + j) % 6] for j in range(60)) + "\n")
        (root / "prose" / f"d{i}.txt").write_text(" ".join(lines[6:] * (20 + i)) + "\n")
    return root


def overrides(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    files = f'data.text.files={{code: "{corpus}/code/*.py", prose: "{corpus}/prose/*.txt"}}'
    return ["model=hf", f"model.path={model_dir}", "data=text", files, "data.text.seq_len=32",
            "data.text.batch_size=4", "data.text.val_windows_per_group=4",
            f"data.text.cache_dir={out.parent / 'cache'}",
            "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "logger=csv",
            "optim.warmup_steps=1", f"output_dir={out}", *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def train_cli(model_dir: Path, corpus: Path, run_dir: Path, *extra: str, timeout: int = 240) -> None:
    """``python train.py`` in a subprocess (2-process runs) with ``overrides``, ``extra`` replacing their keys."""
    keys = {e.split("=", 1)[0] for e in extra}
    args = [a for a in overrides(model_dir, corpus, run_dir) if a.split("=", 1)[0] not in keys | {"output_dir"}]
    cmd = [sys.executable, "train.py", *args, *extra, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def export_cli(ckpt: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moe.hf", "export", str(ckpt), str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def trained_model(run_dir: Path) -> HFCausalLM:
    ck = load_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    model = HFCausalLM(ck.model, ck.router)
    model.load_state_dict(ck.state)
    return model.eval()


def assert_export_is_the_model(export: Path, model: HFCausalLM) -> None:
    reloaded, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    got, want = reloaded.state_dict(), hf_state_dict(model)
    assert sorted(got) == sorted(want)
    for name, t in want.items():  # bit for bit, every tensor (experts included)
        assert torch.equal(got[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name
    x = torch.randint(0, model.hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[0], reloaded.eval()(x).logits
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_on_text_files_and_exports_what_it_trained(arch, corpus, tmp_path):
    src = save_model(arch, tmp_path / "src")
    before = HFCausalLM(ModelConfig(_target_="moe.hf.model.HFCausalLM", path=str(src)),
                        RouterConfig(kind="from_model")).state_dict()
    results = run(compose_train(overrides(src, corpus, tmp_path / "run")))
    assert set(results["bits_per_byte"]) == {"code", "prose"} and 0 < results["bpb"] < 20
    model = trained_model(tmp_path / "run")
    after = model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if ".experts." in k)  # the experts trained
    assert_export_is_the_model(Path(results["export"]), model)
    assert (tmp_path / "run" / "routing" / "stats.jsonl").stat().st_size > 0  # routing statistics of our layers
    assert (Path(results["export"]) / "tokenizer.json").is_file()


def test_bf16_mixed_precision_trains_on_the_cpu(corpus, tmp_path):
    src = save_model("olmoe", tmp_path / "src")
    results = run(compose_train(overrides(src, corpus, tmp_path / "run", "trainer.precision=bf16-mixed")))
    assert torch.isfinite(torch.tensor(results["bpb"]))


@pytest.mark.distributed
def test_expert_parallel_run_exports_the_gathered_experts_and_the_cli_export_equals_it(corpus, tmp_path):
    src = save_model("mixtral", tmp_path / "src", num_local_experts=4)
    run_dir = tmp_path / "run"
    train_cli(src, corpus, run_dir, "trainer=ddp", "trainer.devices=2", "parallel.ep_size=2")
    model = trained_model(run_dir)
    assert model.moe_blocks[0].moe.experts.w_gate.shape[0] == 4  # the checkpoint holds every expert
    assert_export_is_the_model(run_dir / "export", model)
    out = tmp_path / "cli"
    export_cli(run_dir / "checkpoints" / "final.ckpt", out)
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(run_dir / "export" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(".experts." in k for k in a) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4


def test_resume_from_last_continues_the_run_to_the_uninterrupted_weights(corpus, tmp_path):
    src = save_model("qwen3_moe", tmp_path / "src")
    flat_lr = ["optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "callbacks.last_checkpoint.every_n_train_steps=2"]
    full = run(compose_train(overrides(src, corpus, tmp_path / "full", "trainer.max_steps=6", *flat_lr)))
    run(compose_train(overrides(src, corpus, tmp_path / "cut", "trainer.max_steps=4", *flat_lr)))
    resumed = run(compose_train(overrides(src, corpus, tmp_path / "cut", "trainer.max_steps=6", "ckpt_path=last",
                                          *flat_lr)))  # fmt: skip
    assert resumed["steps"] == full["steps"] == 6
    from safetensors.torch import load_file

    a = load_file(Path(full["export"]) / "model.safetensors")
    b = load_file(Path(resumed["export"]) / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_deepspeed_expert_parallel_run_exports_and_its_checkpoint_directory_exports_the_same(corpus, tmp_path):
    src = save_model("mixtral", tmp_path / "src", num_local_experts=4)
    run_dir = tmp_path / "run"
    train_cli(src, corpus, run_dir, "trainer=deepspeed", "trainer.devices=2", "trainer.accelerator=cpu",
              "trainer.precision=32-true", "parallel.ep_size=2", timeout=300)  # fmt: skip
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    assert ckpt.is_dir()  # DeepSpeed's checkpoint: a directory of per-rank files
    out = tmp_path / "cli"
    export_cli(ckpt, out)
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(run_dir / "export" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(".experts." in k for k in a) == 2 * 4 * 3


@pytest.mark.distributed
def test_an_upcycled_dense_model_trains_expert_parallel_and_exports_as_mixtral(corpus, tmp_path):
    src = save_model("llama", tmp_path / "src")
    run_dir = tmp_path / "run"
    train_cli(src, corpus, run_dir, "trainer.max_steps=5", "model.upcycle.num_experts=4", "model.upcycle.method=drop",
              "model.upcycle.layers=upper_half", "trainer=ddp", "trainer.devices=2", "parallel.ep_size=2")  # fmt: skip
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 5
    model = trained_model(run_dir)
    assert [i for i, layer in enumerate(model.hf.model.layers) if layer.mlp.__class__.__name__ == "HFMoEBlock"] == [1]
    reloaded, info = AutoModelForCausalLM.from_pretrained(run_dir / "export", output_loading_info=True)
    assert not any(info.values()) and reloaded.config.model_type == "mixtral"
    x = torch.randint(0, model.hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[0], reloaded.eval()(x).logits
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
