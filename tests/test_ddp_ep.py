"""Lightning DDP with expert parallelism on 2 (and 4) gloo processes.

- One optimizer step at EP=2, each rank on half of the batch, equals one process on the whole batch: gradients
  (expert ones reduced with DDP's scaling), the clipped-gradient norm, and the weights after AdamW.
- Checkpoints are EP-portable: saved at EP=2, resumed in one process, resumed at EP=4, all exact.
"""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moe.config import ModelConfig, OptimConfig, RouterConfig
from moe.train.module import MoELitModule
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layer=2, n_head=2, num_experts=4, d_ff=8)
ROUTER = RouterConfig(k=2, aux_loss_coef=0.5, z_loss_coef=1e-2)  # a large aux loss: its gradient matters
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1)
CLIP = 0.05  # below the gradient norm, so the step is clipped
N = 8


def examples():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 11, (N, 9), generator=g)
    mask = torch.rand(N, 9, generator=g) < 0.5
    mask[:, -1] = True
    return [{"tokens": tokens[i], "target_mask": mask[i], "task_id": torch.tensor(0)} for i in range(N)]


def module():
    torch.manual_seed(0)
    return MoELitModule(MODEL, ROUTER, OPTIM, max_steps=10, eval_tasks=["copy"])


class Grads(L.Callback):
    """Records the gradients the optimizer is about to use (expert ones gathered to full size)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from moe.parallel import gather_state_dict, sharded_layers

        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        self.grads = gather_state_dict(pl_module, grads) if sharded_layers(pl_module) else grads


def trainer(max_steps, strategy="auto", devices=1, callbacks=(), clip=CLIP, precision="32-true"):
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, gradient_clip_val=clip,
        precision=precision,
        logger=False, enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip


def _ddp_step(rank, world, ref_path):
    from moe.parallel.ddp import ExpertParallelDDPStrategy

    ref = torch.load(ref_path)
    grads, strategy, m = Grads(), ExpertParallelDDPStrategy(ep_size=2), module()
    t = trainer(1, strategy, devices=2, callbacks=[grads], precision="64-true")
    t.fit(m, DataLoader(examples(), batch_size=N // world))
    assert m.model.blocks[0].moe.experts.w_gate.shape[0] == 2  # sharded
    norm = strategy.last_grad_norm.item()
    assert norm == pytest.approx(ref["norm"], rel=1e-6)
    assert norm > 2 * CLIP
    for n, g in ref["grads"].items():  # the reference recorded them before Lightning clipped them
        torch.testing.assert_close(grads.grads[n], g * (CLIP / (ref["norm"] + 1e-6)), atol=1e-6, rtol=0, msg=n)
    state = strategy.lightning_module_state_dict()
    for n, w in ref["weights"].items():
        torch.testing.assert_close(state[n], w, atol=1e-6, rtol=0, msg=n)


def test_one_ddp_ep2_step_equals_one_process_on_the_whole_batch(tmp_path):
    grads, m = Grads(), module()
    # fp64: AdamW's first step is lr * g / (|g| + eps), which turns fp32 summation-order noise in gradients near
    # eps into 1e-6 weight differences; in fp64 that noise is gone and 1e-6 tests the step itself
    trainer(1, callbacks=[grads], precision="64-true").fit(m, DataLoader(examples(), batch_size=N))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.grads.values()]))
    ref = {"grads": grads.grads, "norm": norm.item(), "weights": m.state_dict()}
    torch.save(ref, tmp_path / "ref.pt")
    run_distributed(_ddp_step, 2, str(tmp_path / "ref.pt"))


def _fit_and_save(rank, world, ep_size, steps, resume, out):
    from moe.parallel.ddp import ExpertParallelDDPStrategy

    strategy = ExpertParallelDDPStrategy(ep_size=ep_size)
    t = trainer(steps, strategy, devices=world)
    t.fit(module(), DataLoader(examples(), batch_size=N // world), ckpt_path=resume)
    t.save_checkpoint(out)


def _opt_tensors(ckpt):
    state = ckpt["optimizer_states"][0]["state"]
    return {(i, k): v for i, s in state.items() for k, v in s.items()}


def test_checkpoint_round_trip_ep2_ep1_ep4(tmp_path):
    ep2, ep1, ep4 = (str(tmp_path / f"{n}.ckpt") for n in ("ep2", "ep1", "ep4"))
    run_distributed(_fit_and_save, 2, 2, 2, None, ep2)  # 2 steps at EP=2
    saved = torch.load(ep2, weights_only=True)
    assert saved["state_dict"]["model.blocks.0.moe.experts.w_gate"].shape[0] == 4  # full experts on disk
    t = trainer(2)  # resume in one process: nothing left to train, so it restores and saves again
    t.fit(module(), DataLoader(examples(), batch_size=N), ckpt_path=ep2)
    t.save_checkpoint(ep1)
    run_distributed(_fit_and_save, 4, 4, 2, ep1, ep4)  # and at EP=4 (one expert per rank)
    for path in (ep1, ep4):
        back = torch.load(path, weights_only=True)
        assert back["global_step"] == 2
        assert back["state_dict"].keys() == saved["state_dict"].keys()
        assert all(torch.equal(back["state_dict"][k], v) for k, v in saved["state_dict"].items()), path
        a, b = _opt_tensors(saved), _opt_tensors(back)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
