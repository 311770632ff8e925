"""Expert parallelism on the CPU: training throughput of EP=2 against EP=1 on the same global batch, where an EP=2
step's time goes, and the bytes its exchanges move.

- EP=1: one process, the unsharded ``MoETransformer``, the whole global batch.
- EP=2: two gloo processes (``tests.distributed.run_distributed``), each with half of the global batch and half of
  every layer's experts (``moe.parallel.expert_parallel``: all-to-all dispatch, routers reduce their counts over
  both ranks). Dense gradients are averaged by hand: one flat ``all_reduce`` of all dense gradients, then / 2;
  expert gradients are already the gradient of both ranks' losses and are divided by 2
  (``moe.parallel.comm.reduce_expert_grads``). No DDP, no gradient clipping; both runs take the same AdamW
  step on the same global gradient (the first step's global loss is compared as a check).

The cores are split evenly: with ``--cores 2``, EP=1 runs 2 intra-op threads and each EP=2 process 1. Rounds
alternate EP=1, EP=2, EP=1, ... in fresh processes; each round warms up, then times ``--steps`` steps
(forward + backward + AdamW step; EP=2: the slower rank's time). Reported: the fastest step, the best round and
the median round (each round's median step). tokens/s counts every input position of the global batch (padding
included: the layers route it too). The CPU time other processes took during each round is measured (/proc/stat
minus this benchmark's own CPU time) and printed: 2 OpenMP threads that wait for each other at every op are far
more sensitive to a busy core than 2 single-threaded processes, so only quiet rounds compare the two fairly.

Breakdown: ``torch.profiler`` over ``--profile-steps`` extra steps per round (the round whose profiled steps were
fastest is shown; EP=2: the mean of its two ranks), from the ``moe/...`` ranges in the
library (``MoELayer`` router and experts calls, ``_exchange``, the count all-to-all) and ``bench/...`` ranges
this script adds (dispatcher dispatch/combine, gradient all-reduce, optimizer). Backward time is attributed through
autograd sequence numbers: a backward node (``autograd::engine::evaluate_function: XBackward0``) counts for the
part whose forward range created it; ``_exchange`` runs its own range in backward too. Times are exclusive (a range
nested in another counts once, for the inner one), so the parts plus "rest" add up to the profiled step.

    python benchmarks/bench_ep.py                          # default model shape, 2 cores
    python benchmarks/bench_ep.py --d-model 256 --d-ff 512 --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from moe.config import DataConfig, ModelConfig, OptimConfig, RouterConfig  # noqa: E402
from moe.data.tasks import Vocab, build_splits, max_example_len  # noqa: E402
from moe.nn.layers import MoELayer  # noqa: E402
from moe.nn.model import MoETransformer  # noqa: E402
from moe.train.evaluate import target_loss_and_correct  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

# profiler range -> part of the step; backward nodes created inside a forward range count for the same part
FORWARD_PARTS = {
    "moe/router": "routing",
    "moe/experts": "experts",
    "bench/dispatch": "local dispatch/combine",
    "bench/combine": "local dispatch/combine",
}
OTHER_PARTS = {
    "moe/all_to_all": "all-to-all rows",
    "moe/all_to_all_counts": "all-to-all counts",
    "bench/grad_all_reduce": "grad all-reduce",
    "bench/optimizer": "optimizer",
}
PARTS = [
    "routing",
    "local dispatch/combine",
    "all-to-all rows",
    "all-to-all counts",
    "experts",
    "count all-reduce",
    "grad all-reduce",
    "optimizer",
    "rest",
]
DESCRIBE = {
    "routing": "router + its aux/z losses",
    "local dispatch/combine": "sort, permute, rank->expert reorder, weighted combine",
    "all-to-all rows": "2 row exchanges per layer (fwd) + 2 (bwd)",
    "all-to-all counts": "1 count exchange per layer",
    "experts": "SwiGLUExperts, per-expert matmuls",
    "count all-reduce": "routers' global counts (aux loss)",
    "grad all-reduce": "dense grads, 1 flat all_reduce",
    "optimizer": "AdamW step",
    "rest": "attention, embed, norms, head, loss, zero_grad",
}
BACKWARD = "autograd::engine::evaluate_function: "
QUIET = 0.1  # a round is quiet when other processes used fewer cores than this on average


def is_collective(name: str) -> bool:
    return name.startswith(("c10d::", "gloo:", "record_param_comms")) or "allreduce" in name


# ---- the training step ------------------------------------------------------------------------------------------


def configs(args) -> tuple[ModelConfig, RouterConfig, DataConfig]:
    data = DataConfig(train_per_task=max(64, args.batch), val_per_task=8)
    model = ModelConfig(
        vocab_size=Vocab(data.num_symbols).size,
        max_seq_len=max_example_len(data) - 1,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        num_experts=args.num_experts,
        d_ff=args.d_ff,
    )
    return model, RouterConfig(k=args.k), data


def global_batch(args, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``args.batch`` sequences of the six tasks mixed, the same in every process."""
    train, _ = build_splits(data)
    pick = torch.randperm(train.tokens.shape[0], generator=torch.Generator().manual_seed(0))[: args.batch]
    return train.tokens[pick], train.target_mask[pick]


def traced(fn, name: str):
    def wrapper(*a, **kw):
        with record_function(name):
            return fn(*a, **kw)

    return wrapper


def all_reduce_mean_(grads: list[torch.Tensor], world: int) -> None:
    """Average gradients over the ranks in one collective (one flat buffer, as a single DDP bucket would)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def build(rank: int, world: int, args):
    """Model (same init everywhere, then sharded when world > 1), AdamW, this rank's part of the batch, step()."""
    from moe.parallel import expert_parallel, is_expert_param, sharded_layers
    from moe.parallel.comm import reduce_expert_grads

    model_cfg, router_cfg, data = configs(args)
    torch.manual_seed(0)
    model = MoETransformer(model_cfg, router_cfg)
    groups = None
    if world > 1:
        expert_parallel(model, ep_size=world)
        groups = sharded_layers(model)[0][1].ep_groups
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.dispatcher.dispatch = traced(m.dispatcher.dispatch, "bench/dispatch")
            m.dispatcher.combine = traced(m.dispatcher.combine, "bench/combine")
    dense = [p for p in model.parameters() if not is_expert_param(p)]
    experts = [p for p in model.parameters() if is_expert_param(p)]
    optim = OptimConfig()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=optim.betas,
    )
    tokens, mask = global_batch(args, data)
    b = args.batch // world
    tokens, mask = tokens[rank * b : (rank + 1) * b], mask[rank * b : (rank + 1) * b]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits, routings = model(tokens[:, :-1])
        ce = target_loss_and_correct(logits, tokens, mask)[0].mean()
        aux = torch.stack([r.aux_loss for r in routings]).sum()
        z = torch.stack([r.z_loss for r in routings]).sum()
        loss = ce + router_cfg.aux_loss_coef * aux + router_cfg.z_loss_coef * z
        loss.backward()
        if world > 1:
            with record_function("bench/grad_all_reduce"):
                for p in dense:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                all_reduce_mean_([p.grad for p in dense], world)
                reduce_expert_grads(experts, groups)
        with record_function("bench/optimizer"):
            opt.step()
        return loss.item()

    return model, step, tokens[:, :-1].numel()


# ---- breakdown from the profiler ---------------------------------------------------------------------------------


def breakdown(events, n_steps: int) -> dict[str, float]:
    """Milliseconds per step for each part (``fwd``/``bwd`` keys too), exclusive of nested parts; see the docstring."""
    seq_part: dict[int, str] = {}

    def descendants(e):
        for c in e.cpu_children:
            yield c
            yield from descendants(c)

    def under(e, name: str) -> bool:
        while e is not None:
            if e.name == name:
                return True
            e = e.cpu_parent
        return False

    for e in events:  # the forward ranges do not nest in one another
        if e.name in FORWARD_PARTS:
            for c in descendants(e):
                if c.sequence_nr >= 0:
                    seq_part[c.sequence_nr] = FORWARD_PARTS[e.name]

    def part_of(e) -> str | None:
        if e.name in FORWARD_PARTS:
            return FORWARD_PARTS[e.name]
        if e.name in OTHER_PARTS:
            return OTHER_PARTS[e.name]
        if e.name.startswith(BACKWARD):
            return seq_part.get(e.sequence_nr)
        if is_collective(e.name) and under(e, "moe/router"):
            return "count all-reduce"
        return None

    def in_backward(e) -> bool:
        while e is not None:
            if e.name.startswith(BACKWARD):
                return True
            e = e.cpu_parent
        return False

    out: dict[str, float] = defaultdict(float)
    step_us = 0.0
    for e in events:
        if e.name == "bench/step":
            step_us += e.cpu_time_total
        part = part_of(e)
        if part is None:
            continue
        nested = 0.0  # the nearest descendants that are parts of their own
        stack = list(e.cpu_children)
        while stack:
            c = stack.pop()
            if part_of(c) is not None:
                nested += c.cpu_time_total
            else:
                stack.extend(c.cpu_children)
        us = e.cpu_time_total - nested
        out[part] += us
        out[f"{part} {'bwd' if in_backward(e) else 'fwd'}"] += us
    out = {k: v / n_steps / 1e3 for k, v in out.items()}
    out["step"] = step_us / n_steps / 1e3
    out["rest"] = out["step"] - sum(out.get(p, 0.0) for p in PARTS if p != "rest")
    return out


# ---- bytes of the exchanges --------------------------------------------------------------------------------------


def count_exchanges(step) -> tuple[list[dict], float]:
    """Run ``step`` once with ``dist.all_to_all_single`` wrapped; one record per call, in call order: elements
    sent to / received from each rank of the group (the own rank's split included), element size, fwd/bwd.
    Returns the records and what ``step`` returned."""
    calls: list[dict] = []
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        P = dist.get_world_size(group)
        row = math.prod(input.shape[1:])
        send = input_split_sizes or [input.shape[0] // P] * P
        recv = output_split_sizes or [output.shape[0] // P] * P
        calls.append(
            {
                "kind": "counts" if input.dtype == torch.int64 else "rows",
                "backward": torch._C._current_graph_task_id() >= 0,  # inside the autograd engine
                "send": [n * row for n in send],
                "recv": [n * row for n in recv],
                "itemsize": input.element_size(),
                "me": dist.get_rank(group),
            }
        )
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        out = step()
    finally:
        dist.all_to_all_single = original
    return calls, out


def check_exchanges(calls: list[dict], n_layer: int, T: int, k: int, d: int, E: int) -> list[dict]:
    """Per layer: what this rank sent in each exchange. Raises unless a dropless layer's dispatch sends exactly its
    ``T*k*d`` routed elements (own split included), its combine brings ``T*k*d`` back, the backward mirrors both,
    and the count exchange sends ``E`` counts."""
    fwd = [c for c in calls if c["kind"] == "rows" and not c["backward"]]
    bwd = [c for c in calls if c["kind"] == "rows" and c["backward"]]
    counts = [c for c in calls if c["kind"] == "counts"]
    if not (len(fwd) == len(bwd) == 2 * n_layer and len(counts) == n_layer):
        raise RuntimeError(f"expected {2 * n_layer} row exchanges each way and {n_layer} count exchanges, got "
                           f"{len(fwd)} fwd, {len(bwd)} bwd, {len(counts)} counts")  # fmt: skip
    routed = T * k * d
    layers = []
    for i in range(n_layer):
        dispatch, combine = fwd[2 * i], fwd[2 * i + 1]
        # backward runs the layers in reverse, each as combine then dispatch
        combine_bwd, dispatch_bwd = bwd[2 * (n_layer - 1 - i)], bwd[2 * (n_layer - 1 - i) + 1]
        checks = {
            "dispatch sends T*k*d": sum(dispatch["send"]),
            "combine receives T*k*d": sum(combine["recv"]),
            "combine backward sends T*k*d": sum(combine_bwd["send"]),
            "dispatch backward receives T*k*d": sum(dispatch_bwd["recv"]),
        }
        for what, got in checks.items():
            if got != routed:
                raise RuntimeError(f"layer {i}: {what} = {routed} elements expected, got {got}")
        if combine["send"] != dispatch["recv"] or dispatch_bwd["send"] != dispatch["recv"]:
            raise RuntimeError(f"layer {i}: the combine must send back exactly what the dispatch received")
        if sum(counts[i]["send"]) != E:
            raise RuntimeError(f"layer {i}: the count exchange sends {sum(counts[i]['send'])} counts, expected {E}")
        me = dispatch["me"]

        def off(c, key, me=me):
            return sum(n for j, n in enumerate(c[key]) if j != me)

        layers.append(
            {
                "layer": i,
                "routed_elements": routed,
                "dispatch_send": sum(dispatch["send"]),
                "dispatch_send_off_rank": off(dispatch, "send"),
                "combine_send": sum(combine["send"]),
                "combine_send_off_rank": off(combine, "send"),
                "row_itemsize": dispatch["itemsize"],
                "counts_send": sum(counts[i]["send"]),
                "counts_send_off_rank": off(counts[i], "send"),
                "counts_itemsize": counts[i]["itemsize"],
                "send_to": dispatch["send"],
                "recv_from": dispatch["recv"],
            }
        )
    return layers


# ---- one run (one process of EP=1, or one rank of EP=2) ---------------------------------------------------------


def run(rank: int, world: int, args, out_dir: str) -> None:
    torch.set_num_threads(args.cores // world)
    result: dict = {"rank": rank, "world": world, "threads": torch.get_num_threads()}
    phases, t_phase = {}, time.perf_counter()

    def phase(name: str) -> None:
        nonlocal t_phase
        phases[name] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()

    model, step, tokens = build(rank, world, args)
    result["tokens"] = tokens
    phase("build")
    # the first step: same weights and global batch in both runs; EP=2 counts what its exchanges send
    if world > 1:
        calls, result["first_loss"] = count_exchanges(step)
        result["exchanges"] = check_exchanges(calls, args.n_layer, tokens, args.k, args.d_model, args.num_experts)
    else:
        result["first_loss"] = step()
    for _ in range(args.warmup):
        step()
    phase("warmup")
    if world > 1:
        dist.barrier()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result["step_s"] = times
    phase("timed")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            with record_function("bench/step"):
                step()
    phase("profiled")
    result["breakdown_ms"] = breakdown(prof.events(), args.profile_steps)
    phase("attribution")
    if world == 1:  # what record_function costs when no profiler runs (the library's ranges stay in every step)
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            with record_function("moe/x"):
                pass
        result["record_function_us"] = (time.perf_counter() - t0) / n * 1e6
    phase("rest")
    result["phases_s"] = phases
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, from /proc/stat; CPU seconds of this process and its finished
    children). Their difference over a round is what other processes took from the cores (Linux only)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return math.nan, math.nan
    busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))  # fmt: skip
    return busy, own


def wait_quiet(limit_s: float, window_s: float = 3.0) -> float:
    """Wait (at most ``limit_s``) until other processes use < ``QUIET`` cores over a ``window_s`` window; returns
    the seconds waited. Called between runs, when nothing of this benchmark is running."""
    t0 = time.perf_counter()
    while True:
        busy0, _ = cpu_seconds()
        time.sleep(window_s)
        busy1, _ = cpu_seconds()
        if not (busy1 - busy0) / window_s >= QUIET or time.perf_counter() - t0 > limit_s:  # nan: no /proc/stat
            return time.perf_counter() - t0


def launch(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(run, world, args, tmp)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# ---- report -----------------------------------------------------------------------------------------------------


def summarize(rounds: list[list[dict]]) -> dict:
    """Step time = the slowest rank's. Per round: the median step; over rounds: the best and the median of those,
    and the fastest single step. The breakdown comes from the round whose profiled steps were fastest (the least
    disturbed by other processes), averaged over its ranks."""
    per_round, fastest = [], math.inf
    for ranks in rounds:
        slowest = [max(ts) for ts in zip(*(r["step_s"] for r in ranks))]
        per_round.append(statistics.median(slowest))
        fastest = min(fastest, min(slowest))
    tokens = sum(r["tokens"] for r in rounds[0])
    best, med = min(per_round), statistics.median(per_round)
    others = [ranks[0].get("other_cores", math.nan) for ranks in rounds]
    quiet = [t for t, o in zip(per_round, others) if o < QUIET]
    quietest = min(rounds, key=lambda ranks: statistics.fmean(r["breakdown_ms"]["step"] for r in ranks))
    parts: dict[str, list[float]] = defaultdict(list)
    for r in quietest:
        for key, ms in r["breakdown_ms"].items():
            parts[key].append(ms)
    return {
        "rounds_ms": [t * 1e3 for t in per_round],
        "rounds_other_cores": others,
        "quiet_rounds": len(quiet),
        "quiet_median_ms": statistics.median(quiet) * 1e3 if quiet else math.nan,
        "tokens_per_s_quiet": tokens / statistics.median(quiet) if quiet else math.nan,
        "fastest_ms": fastest * 1e3,
        "best_ms": best * 1e3,
        "median_ms": med * 1e3,
        "tokens": tokens,
        "tokens_per_s_fastest": tokens / fastest,
        "tokens_per_s_best": tokens / best,
        "tokens_per_s_median": tokens / med,
        "threads": rounds[0][0]["threads"],
        "processes": len(rounds[0]),
        "first_loss": statistics.fmean(r["first_loss"] for r in rounds[0]),
        "breakdown_round": rounds.index(quietest) + 1,
        "breakdown_ms": {k: statistics.fmean(v) for k, v in parts.items()},
    }


def print_report(args, ep1: dict, ep2: dict, exchanges: list[list[dict]], rf_us: float) -> None:
    _, _, data = configs(args)
    S = max_example_len(data) - 1
    print(f"\n## Training step (forward + backward + AdamW), global batch {args.batch} x {S} = {ep1['tokens']} tokens")
    print(f"model d={args.d_model} layers={args.n_layer} heads={args.n_head} E={args.num_experts} f={args.d_ff} "
          f"k={args.k}, dropless, fp32; {args.rounds} rounds (EP=1 and EP=2 alternating, fresh processes), "
          f"{args.warmup + 1} warm-up + {args.steps} timed steps each")  # fmt: skip
    print(f"\n  {'run':<6} {'procs x threads':>16} {'step ms':>22} {'tokens/s':>24}  per round: median step ms "
          "(cores other processes used)")  # fmt: skip
    print(f"  {'':<6} {'':>16} {'fastest':>7} {'best':>6} {'median':>7} {'fastest':>7} {'best':>7} {'median':>8}")
    for name, s in (("EP=1", ep1), ("EP=2", ep2)):
        rounds = " ".join(f"{t:.1f} ({o:.2f})" for t, o in zip(s["rounds_ms"], s["rounds_other_cores"]))
        print(f"  {name:<6} {s['processes']:>12} x {s['threads']:<2} {s['fastest_ms']:>7.1f} {s['best_ms']:>6.1f} "
              f"{s['median_ms']:>7.1f} {s['tokens_per_s_fastest']:>7.0f} {s['tokens_per_s_best']:>7.0f} "
              f"{s['tokens_per_s_median']:>8.0f}  {rounds}")  # fmt: skip
    ratio = {k: ep2[f"tokens_per_s_{k}"] / ep1[f"tokens_per_s_{k}"] for k in ("fastest", "best", "median", "quiet")}
    print(f"\n  EP=2 / EP=1 tokens/s: {ratio['fastest']:.2f} (fastest steps), {ratio['best']:.2f} (best rounds), "
          f"{ratio['median']:.2f} (median rounds)")  # fmt: skip
    print(f"  quiet rounds only (other processes < {QUIET} cores): EP=1 {ep1['quiet_rounds']} rounds, median "
          f"{ep1['quiet_median_ms']:.1f} ms = {ep1['tokens_per_s_quiet']:.0f} tokens/s; EP=2 {ep2['quiet_rounds']} "
          f"rounds, median {ep2['quiet_median_ms']:.1f} ms = {ep2['tokens_per_s_quiet']:.0f} tokens/s; "
          f"EP=2 / EP=1 {ratio['quiet']:.2f}")  # fmt: skip
    diff = abs(ep2["first_loss"] - ep1["first_loss"])
    print(f"  first-step global loss: EP=1 {ep1['first_loss']:.6f}, EP=2 (mean of the ranks) {ep2['first_loss']:.6f}, "
          f"|diff| {diff:.1e}")  # fmt: skip
    if diff > 1e-4:
        raise RuntimeError("EP=1 and EP=2 do not compute the same first-step loss: they are not the same training")

    b1, b2 = ep1["breakdown_ms"], ep2["breakdown_ms"]
    print(
        f"\n## Where a step goes: torch.profiler, {args.profile_steps} extra steps after the timed ones, ms per "
        f"step, exclusive times; from the round with the fastest profiled steps "
        f"(EP=1 round {ep1['breakdown_round']}, EP=2 round {ep2['breakdown_round']}: mean of the 2 ranks)"
    )
    print(f"  {'part':<24} {'EP=1 fwd':>9} {'bwd':>7} {'total':>7} {'%':>6}   {'EP=2 fwd':>9} {'bwd':>7} {'total':>7} "
          f"{'%':>6}   what")  # fmt: skip

    def cells(b, p):
        if p == "rest":
            return f"{'':>9} {'':>7} {b['rest']:>7.1f} {100 * b['rest'] / b['step']:>5.1f}%"
        f, w, t = b.get(f"{p} fwd", 0.0), b.get(f"{p} bwd", 0.0), b.get(p, 0.0)
        return f"{f:>9.1f} {w:>7.1f} {t:>7.1f} {100 * t / b['step']:>5.1f}%"

    for p in PARTS:
        print(f"  {p:<24} {cells(b1, p)}   {cells(b2, p)}   {DESCRIBE[p]}")
    print(f"  {'step (profiled)':<24} {'':>9} {'':>7} {b1['step']:>7.1f} {'':>6}   {'':>9} {'':>7} {b2['step']:>7.1f}")
    same = [s["rounds_ms"][s["breakdown_round"] - 1] for s in (ep1, ep2)]
    print(f"  {'step (no profiler)':<24} {'':>9} {'':>7} {same[0]:>7.1f} {'':>6}   {'':>9} {'':>7} {same[1]:>7.1f}   "
          "median timed step of the same round")  # fmt: skip
    comm = sum(b2.get(p, 0.0) for p in ("all-to-all rows", "all-to-all counts"))
    allcomm = comm + sum(b2.get(p, 0.0) for p in ("count all-reduce", "grad all-reduce"))
    print(f"\n  EP=2: the all-to-alls (rows + counts) take {comm:.1f} ms = {100 * comm / b2['step']:.1f}% of the "
          f"profiled step; all collectives {allcomm:.1f} ms = {100 * allcomm / b2['step']:.1f}% (collective times "
          f"include waiting for the other rank)")  # fmt: skip
    print("  attribution: forward time by the moe/... and bench/... ranges; a backward node counts for the range "
          "that created it (autograd sequence number); _exchange's range also runs in backward; gradient "
          "accumulation into leaves (AccumulateGrad) is in 'rest'")  # fmt: skip
    print(f"  record_function enter+exit with no profiler running: {rf_us:.2f} us; the library runs "
          f"{2 * args.n_layer} per EP=1 step and {7 * args.n_layer} per EP=2 step "
          f"({7 * args.n_layer * rf_us / 1e3:.3f} ms)")  # fmt: skip

    print("\n## Bytes each rank sends per layer per direction, EP=2 (the first step; all_to_all_single includes the "
          "split a rank sends to itself: 'total' counts it, 'off-rank' does not)")  # fmt: skip
    print(f"  {'rank':>4} {'layer':>5} {'T*k rows':>9} {'dispatch total':>15} {'off-rank':>10} {'combine total':>14} "
          f"{'off-rank':>10} {'counts total':>13} {'off-rank':>9}  rows to ranks / from ranks")  # fmt: skip
    for rank, layers in enumerate(exchanges):
        for x in layers:
            r, c = x["row_itemsize"], x["counts_itemsize"]
            rows = x["routed_elements"] // args.d_model
            sizes = [
                f"{x['dispatch_send'] * r:>13} B",
                f"{x['dispatch_send_off_rank'] * r:>8} B",
                f"{x['combine_send'] * r:>12} B",
                f"{x['combine_send_off_rank'] * r:>8} B",
                f"{x['counts_send'] * c:>11} B",
                f"{x['counts_send_off_rank'] * c:>7} B",
            ]
            to, frm = ([n // args.d_model for n in x[key]] for key in ("send_to", "recv_from"))
            print(f"  {rank:>4} {x['layer']:>5} {rows:>9} {' '.join(sizes)}  {to} / {frm}")
    print("  check passed: on every rank and layer the dispatch sends exactly T_rank*k*d elements (own split "
          "included), the combine receives T_rank*k*d back and sends back exactly the rows the dispatch received, "
          "the backward exchanges mirror both, and the count exchange sends E int64 counts; the backward moves the "
          "same bytes as the forward")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2, help="cores shared out: EP=1 gets all, each EP=2 rank half")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="global batch (sequences); EP=2 ranks take half each")
    parser.add_argument("--rounds", type=int, default=5, help="alternating EP=1 / EP=2 rounds")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (after the first step)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per round (breakdown)")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="before each run, wait up to this many s for idle cores"
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.cores % 2 or args.batch % 2 or args.num_experts % 2:
        raise ValueError("--cores, --batch and --num-experts must be even (split over 2 ranks)")

    print({"machine": f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}",
           "torch": torch.__version__, "python": platform.python_version(),
           "threads": f"EP=1: 1 process x {args.cores}; EP=2: 2 processes x {args.cores // 2}"})  # fmt: skip
    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    busiest_other = 0.0
    for i in range(args.rounds):
        for world in (1, 2):
            waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
            t0, (busy0, own0) = time.perf_counter(), cpu_seconds()
            runs[world].append(launch(world, args))
            wall, (busy1, own1) = time.perf_counter() - t0, cpu_seconds()
            others = max(0.0, (busy1 - busy0) - (own1 - own0))
            busiest_other = max(busiest_other, others / wall)
            runs[world][-1][0]["other_cores"] = others / wall
            phases = ", ".join(f"{k} {v:.1f}" for k, v in runs[world][-1][0]["phases_s"].items())
            print(f"round {i + 1}/{args.rounds} EP={world}: {wall:.1f} s ({phases}; waited {waited:.0f} s before); "
                  f"other processes used {others:.1f} CPU-s = {others / wall:.2f} cores", flush=True)  # fmt: skip
    if busiest_other >= QUIET:
        print(f"WARNING: other processes took up to {busiest_other:.2f} of the {os.cpu_count()} cores during a "
              "round; the EP=1 run (2 OpenMP threads that wait for each other) suffers most; compare the quiet "
              "rounds, or rerun on a quiet machine (--wait-quiet)")  # fmt: skip
    ep1, ep2 = summarize(runs[1]), summarize(runs[2])
    exchanges = [r["exchanges"] for r in runs[2][0]]
    for layer0, layer1 in zip(*exchanges):  # what rank 0 sends to rank 1 is what rank 1 receives from rank 0
        if layer0["send_to"][1] != layer1["recv_from"][0] or layer1["send_to"][0] != layer0["recv_from"][1]:
            raise RuntimeError(f"layer {layer0['layer']}: the ranks disagree on the rows they exchange")
    rf_us = statistics.median(r[0]["record_function_us"] for r in runs[1])
    print_report(args, ep1, ep2, exchanges, rf_us)
    if args.json:
        payload = {"args": vars(args), "torch": torch.__version__, "ep1": ep1, "ep2": ep2, "exchanges": exchanges}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
