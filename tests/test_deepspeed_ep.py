"""DeepSpeed ZeRO-2 with expert parallelism (EP=2) on 2 gloo processes on the CPU (``DS_ACCELERATOR=cpu``).

One engine run checks, against a plain-PyTorch single-process model on the whole batch (each rank gets half):
two AdamW steps with the aux and z losses on and gradient clipping that clips give the same full weights
(atol 1e-6), and the engine's gradient norm is the single-process norm; the optimizer groups are uniquely named
with the expert group marked ``moe``; ``save_checkpoint`` + ``convert_deepspeed_checkpoint`` give exactly the full
unsharded weights, and ``load_checkpoint`` gives each rank its shard back; ``configure_optimizers``' optimizer split
afterwards keeps its LR schedule on every group. (Lightning's strategy on the CPU, end to end:
tests/test_deepspeed_train.py.)
"""

import os
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig, RouterConfig
from moe.nn.model import MoETransformer
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

CFG = ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layer=2, n_head=2, num_experts=4, d_ff=8)
ROUTER = RouterConfig(k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-3, 0.1  # eps ~ |grad|: the update depends on the clipped scale
CLIP_RATIO = 0.5  # clip at half the first step's norm: the threshold always clips


def _loss(model, tokens):
    logits, routings = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    aux = torch.stack([r.aux_loss for r in routings]).sum()
    z = torch.stack([r.z_loss for r in routings]).sum()
    return ce + ROUTER.aux_loss_coef * aux + ROUTER.z_loss_coef * z


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (4, CFG.max_seq_len), generator=g) for _ in range(2)]


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def _reference():
    """Single process, whole batch: the weights after each step and the (unclipped) total gradient norms."""
    torch.manual_seed(0)
    model = MoETransformer(CFG, ROUTER)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(_groups(model), lr=LR, betas=BETAS, eps=EPS)
    clip, norms = None, []
    for tokens in _batches():
        opt.zero_grad()
        _loss(model, tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        clip = clip or CLIP_RATIO * norm.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        norms.append(norm.item())
        opt.step()
    return init, model.state_dict(), norms, clip


def _deepspeed_on_cpu():
    os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    import deepspeed

    from moe.parallel.deepspeed import use_cpu_accelerator

    use_cpu_accelerator()  # (deepspeed imported earlier in the parent on a GPU machine) and no shm op build
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the gloo group tests.distributed made
    return deepspeed


def _engine_case(rank, world, tmp):
    deepspeed = _deepspeed_on_cpu()
    from moe.config import OptimConfig
    from moe.export import load_checkpoint, load_model
    from moe.parallel import gather_state_dict
    from moe.parallel.deepspeed import (
        convert_deepspeed_checkpoint,
        deepspeed_expert_parallel,
        moe_param_groups,
        split_optimizer,
    )
    from moe.train.module import MoELitModule

    init, ref_state, ref_norms, clip = _reference()
    model = MoETransformer(CFG, ROUTER)
    model.load_state_dict(init)
    deepspeed_expert_parallel(model, ep_size=world)
    opt = torch.optim.AdamW(moe_param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    assert engine.has_moe_layers and engine.num_experts == [CFG.num_experts] * CFG.n_layer
    names = [g["name"] for g in ds_opt.param_groups]
    assert names == ["decay", "no_decay", "decay/experts_ep_size_2"], names
    assert [bool(g.get("moe")) for g in ds_opt.param_groups] == [False, False, True]

    norms = []
    for tokens in _batches():
        engine.backward(_loss(engine, tokens[2 * rank : 2 * rank + 2]))  # half of the batch each
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    full = gather_state_dict(model)
    assert sorted(full) == sorted(ref_state)
    diff = max((full[k] - ref_state[k]).abs().max().item() for k in ref_state)
    print(f"rank {rank}: grad norms DeepSpeed {norms}, single process {ref_norms}; max weight diff {diff:.2e}")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), atol=1e-5, rtol=1e-5)
    for k in ref_state:
        torch.testing.assert_close(full[k], ref_state[k], atol=1e-6, rtol=0, msg=k)

    # checkpoint: every expert reaches the export, and engine.load_checkpoint puts each rank's shard back
    hparams = {"model": asdict(CFG), "router": asdict(ROUTER)}  # what Lightning saves as client state
    engine.save_checkpoint(tmp, tag="checkpoint", client_state={"hyper_parameters": hparams})
    if rank == 0:
        out = os.path.join(tmp, "export")
        convert_deepspeed_checkpoint(tmp, out)
        exported = load_model(out).state_dict()
        assert sorted(exported) == sorted(full)
        direct = load_checkpoint(tmp).state  # the engine's own names (no Lightning prefix) are kept
        assert sorted(direct) == sorted(full) and all(torch.equal(direct[k], full[k]) for k in full)
        assert all(torch.equal(exported[k], full[k]) for k in full)
    fresh = deepspeed_expert_parallel(MoETransformer(CFG, ROUTER), ep_size=world)
    fresh_opt = torch.optim.AdamW(moe_param_groups(fresh, WD), lr=LR)
    fresh_engine, *_ = deepspeed.initialize(model=fresh, optimizer=fresh_opt, config=config)
    fresh_engine.load_checkpoint(tmp, tag="checkpoint", load_module_only=True)
    loaded = gather_state_dict(fresh)
    assert all(torch.equal(loaded[k], full[k]) for k in full)

    # what ExpertParallelDeepSpeedStrategy does with configure_optimizers' optimizer: split it, LR schedule kept
    lit = MoELitModule(CFG, ROUTER, OptimConfig(lr=LR, weight_decay=WD, warmup_steps=4), max_steps=10)
    deepspeed_expert_parallel(lit, ep_size=world)
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    split_optimizer(opt, sched)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "decay/experts_ep_size_2"]
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0, WD]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(lit.parameters()))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [LR * 2 / 4] * 3  # warmup step 1 of 4, on every group


def test_deepspeed_zero2_expert_parallel_matches_single_process(tmp_path):
    run_distributed(_engine_case, 2, str(tmp_path))


def test_strategy_refuses_ep_under_zero3_and_fp16_on_the_cpu():
    import lightning as L

    from moe.parallel.deepspeed import ExpertParallelDeepSpeedStrategy

    with pytest.raises(ValueError, match=r"ep_size=2: DeepSpeed refuses MoE layers under ZeRO-3"):
        ExpertParallelDeepSpeedStrategy(ep_size=2, stage=3)
    with pytest.raises(ValueError, match=r"parallel.ep_size=0: expected an int >= 1"):
        ExpertParallelDeepSpeedStrategy(ep_size=0)
    strategy = ExpertParallelDeepSpeedStrategy(ep_size=1, stage=2, timeout=30)
    assert strategy._timeout.total_seconds() == 30
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, precision="16-mixed", max_steps=1,
                        logger=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"on the CPU: trainer.precision=16-mixed is not supported"):
        trainer.strategy.setup_environment()


def test_a_stale_op_build_lock_is_named_with_how_to_clear_it(tmp_path, monkeypatch):
    """torch waits forever on a JIT build lock left by a killed build: the strategy warns before DeepSpeed may build."""
    from moe.parallel.deepspeed import STALE_LOCK_S, stale_extension_locks, warn_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    past = time.time() - STALE_LOCK_S - 60
    os.utime(old, (past, past))
    assert stale_extension_locks() == [old]  # a build still running holds a fresh lock: not named
    with pytest.warns(UserWarning, match=rf"deepspeed_shm_comm.*rm {old}"):
        warn_stale_extension_locks()
