"""One training step of the default model (``python train.py``'s config), broken down into router, dispatch
(permute / unpermute), experts, attention and optimizer, forward and backward each, with times and shares.

    python benchmarks/bench_train_step.py --threads 2 --steps 10 --wait-quiet 600

The step is ``MoELitModule.training_step`` (cross-entropy + router losses) on a real batch of the default data,
``backward``, gradient clipping at ``trainer.gradient_clip_val``, ``AdamW.step`` and the LR scheduler, as the Lightning
loop runs it. Attribution: the benchmark labels module forwards with ``record_function`` scopes (hooks on
``CausalSelfAttention``, the routers and the experts; wrappers on each dispatcher's ``dispatch`` / ``combine``); a
backward op (``autograd::engine::evaluate_function: ...``) is charged to the scope of the forward op with the same
autograd sequence number. "other" is the rest of the step: embeddings, norms, residuals, the loss, the head.
Times are medians over ``--steps`` profiled steps (the profiler adds a few percent).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.timing import load_average, wait_quiet  # noqa: E402
from moe.config import register_configs  # noqa: E402
from moe.data import build_datamodule  # noqa: E402
from moe.nn.layers import MoELayer, SwiGLUExperts  # noqa: E402
from moe.nn.model import CausalSelfAttention  # noqa: E402
from moe.train.module import MoELitModule  # noqa: E402

PARTS = ("router", "dispatch", "experts", "attention", "optimizer")
CONF = Path(__file__).resolve().parents[1] / "conf"


def label_forward(module: torch.nn.Module, name: str) -> None:
    """Run ``module``'s forward inside a ``record_function(name)`` scope."""
    scopes: list[record_function] = []

    def enter(mod, args):
        scopes.append(record_function(name))
        scopes[-1].__enter__()

    def leave(mod, args, out):
        scopes.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def label_method(obj, method: str, name: str) -> None:
    fn = getattr(obj, method)

    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    setattr(obj, method, wrapped)


def build(overrides: list[str]):
    """(lit module, optimizer, scheduler, batch, clip value) for the default config plus ``overrides``."""
    register_configs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("train", overrides=["output_dir=/tmp/bench_train_step", *overrides]))
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    model_cfg = cfg.model
    model_cfg.vocab_size = model_cfg.vocab_size or dm.vocab.size
    model_cfg.max_seq_len = model_cfg.max_seq_len or dm.seq_len
    module = MoELitModule(model_cfg, cfg.router, cfg.optim, cfg.trainer.max_steps, eval_tasks=dm.eval_tasks,
                          train_tasks=cfg.data.tasks, task_names=dm.task_names)  # fmt: skip
    opts = module.configure_optimizers()
    batch = next(iter(dm.train_dataloader()))
    for m in module.modules():
        if isinstance(m, CausalSelfAttention):
            label_forward(m, "attention")
        elif isinstance(m, MoELayer):
            label_forward(m.router, "router")
            label_method(m.dispatcher, "dispatch", "dispatch")
            label_method(m.dispatcher, "combine", "dispatch")
        elif isinstance(m, SwiGLUExperts):
            label_forward(m, "experts")
    return module, opts["optimizer"], opts["lr_scheduler"]["scheduler"], batch, cfg.trainer.gradient_clip_val


def train_step(module, opt, sched, batch, clip: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def attribute(events) -> dict[str, float]:
    """Microseconds per part: forward scopes, plus backward nodes charged to their forward op's scope."""
    seq_part: dict[int, str] = {}
    out: dict[str, float] = defaultdict(float)
    for ev in events:
        part, up = None, ev
        while up is not None and part is None:
            part, up = (up.name if up.name in PARTS else None), up.cpu_parent
        if part is None:
            continue
        if ev.name == part and not _inside(ev.cpu_parent):
            out[part] += ev.cpu_time_total  # the scope itself, counted once (not nested in another part)
        if ev.sequence_nr >= 0:
            seq_part.setdefault(ev.sequence_nr, part)
    for ev in events:
        if ev.name.startswith("autograd::engine::evaluate_function"):
            part = seq_part.get(ev.sequence_nr)
            if part is not None:
                out[part + " bwd"] += ev.cpu_time_total
    return out


def _inside(ev) -> bool:
    """Whether ``ev`` is or sits inside a part's scope."""
    while ev is not None:
        if ev.name in PARTS:
            return True
        ev = ev.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="first wait up to this many s for load < 0.5")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.num_experts=16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, opt, sched, batch, clip = build(args.overrides)
    for _ in range(3):
        train_step(module, opt, sched, batch, clip)
    if args.wait_quiet > 0:
        waited, load = wait_quiet(args.wait_quiet)
        print(f"waited {waited:.0f} s for a quiet machine (1-min load average {load:.2f})")
    load0 = load_average()
    per_step: list[dict[str, float]] = []
    walls: list[float] = []
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            train_step(module, opt, sched, batch, clip)
            walls.append((time.perf_counter() - t0) * 1e6)
        per_step.append(attribute(prof.events()))
    wall = statistics.median(walls)
    T = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    shape = tuple(batch["tokens"].shape)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default model, batch {shape} ({T} tokens "
          f"per MoE layer); median of {args.steps} profiled steps; load average {load0:.2f} -> "
          f"{load_average():.2f}\n")  # fmt: skip
    print("| part | forward / in scope (ms) | backward (ms) | total (ms) | share of the step |")
    print("|---|---:|---:|---:|---:|")
    accounted = 0.0
    for part in PARTS:
        fwd = statistics.median(s.get(part, 0.0) for s in per_step)
        bwd = statistics.median(s.get(part + " bwd", 0.0) for s in per_step)
        accounted += fwd + bwd
        print(f"| {part} | {fwd / 1e3:.2f} | {bwd / 1e3:.2f} | {(fwd + bwd) / 1e3:.2f} | {(fwd + bwd) / wall:.0%} |")
    other = max(wall - accounted, 0.0)
    print(f"| other | | | {other / 1e3:.2f} | {other / wall:.0%} |")
    print(f"| **step** | | | **{wall / 1e3:.2f}** | 100% |")


if __name__ == "__main__":
    main()
