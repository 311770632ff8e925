"""Router benchmark: the fused router (``moe.kernels``) against plain PyTorch, torch.compile and DeepSpeed.

Per shape (T tokens, E experts, k), in one process, interleaved:

- ``fused router``: ``moe.kernels.fused_router`` (weights, ids, counts, prob_sums, lse);
- ``fused full``: the above + ``slot_rows`` (expert-sorted slot positions) + the aux- and z-loss scalars, i.e.
  everything the "full" baselines compute;
- ``fused full (CUDA graph)``: the same replayed from a CUDA graph (GPU time without Python/launch overhead);
- ``eager softmax_topk``: fp32 softmax -> topk -> renormalise;
- ``eager full``: + bincount counts, Switch aux loss, z-loss, stable argsort of the expert ids;
- ``compiled full``: ``torch.compile`` of the eager full router;
- ``deepspeed topkgating``: ``deepspeed.moe.sharded_moe.topkgating`` (capacity factor 1, dense ``[T, E, C]``
  masks; fp32 logits as it expects), only where its masks fit in ``--ds-max-gb``.

Effective bandwidth uses the byte floor of ../shared/reference/README.md for every candidate: read the logits once,
write fp32 weights, int64 ids and int64 order once (``T*E*elt + T*k*(4+8+8) + E*8`` bytes).

Run (GPU: the reference shapes; CPU: small shapes):

    python benchmarks/bench_router.py --json router.json
    python benchmarks/bench_router.py --shapes 262144x64x8,262144x256x8 --dtype bf16
    python benchmarks/bench_router.py --sweep          # GPU: tile/top-k strategy sweep of the Triton launcher
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from benchmarks.timing import DTYPES, Result, environment, print_table, time_interleaved, write_json  # noqa: E402
from moe import kernels  # noqa: E402

GPU_SHAPES = "65536x8x2,65536x64x8,65536x256x8,262144x64x8,262144x256x8,8192x8x2,16384x8x2,8192x64x8"
CPU_SHAPES = "4096x8x2,4096x64x8,2048x256x8"
PROJECT = "fused full"
BASELINES = ["eager softmax_topk", "eager full", "compiled full", "deepspeed topkgating"]


def eager_softmax_topk(logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def eager_full(logits: torch.Tensor, k: int):
    """What a training step needs from the router, in plain PyTorch (the issue's baseline)."""
    E = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    ids_S = ids.reshape(-1)
    counts = torch.bincount(ids_S, minlength=E)
    aux = E * torch.dot(counts.float() / ids_S.numel(), probs.mean(dim=0))
    z = torch.logsumexp(logits.float(), dim=-1).square().mean()
    order = torch.argsort(ids_S, stable=True)
    return weights, ids, counts, aux, z, order


def fused_router_only(logits: torch.Tensor, k: int):
    return kernels.fused_router(logits, k)


def fused_full(logits: torch.Tensor, k: int):
    T, E = logits.shape
    weights, ids, counts, prob_sums, lse = kernels.fused_router(logits, k)
    rows = kernels.slot_rows(ids, counts)
    aux = E * torch.dot(counts.float() / (T * k), prob_sums / T)
    z = lse.square().mean()
    return weights, ids, counts, aux, z, rows


def cuda_graphed(fn, *args):
    """Capture ``fn(*args)`` in a CUDA graph (after a warm-up on a side stream); returns the replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def deepspeed_bytes(T: int, E: int, k: int) -> int:
    """Rough peak of topkgating's dense tensors: combine weights (fp32) + dispatch mask (bool) + temporaries."""
    capacity = max(4, math.ceil(T / E * k))
    return T * E * capacity * (4 + 1 + 4)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--shapes: expected TxExk items like 65536x64x8, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def check_agreement(logits: torch.Tensor, k: int) -> None:
    """The fused top-k weights equal the eager ones (sorted values agree even where tie order differs)."""
    w_fused, _, counts, _, _ = kernels.fused_router(logits, k)
    w_eager, _ = eager_softmax_topk(logits, k)
    if not torch.allclose(w_fused, w_eager, atol=1e-5, rtol=1e-4) or int(counts.sum()) != w_fused.numel():
        raise RuntimeError(f"fused router disagrees with the eager baseline at shape {tuple(logits.shape)}, k={k}")


def sweep(logits: torch.Tensor, k: int, device: torch.device, warmup: int, rounds: int) -> list[Result]:
    """Triton launcher over tile heights and top-k strategies (router only, no autograd or validation)."""
    from moe.kernels import triton_router

    T, E = logits.shape
    block_e = 1 << (E - 1).bit_length()
    candidates = {}
    for block_t in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if not 256 <= block_t * block_e <= 16384:
            continue
        for topk in ("rounds", "bitonic"):
            candidates[f"triton block_t={block_t} {topk}"] = lambda bt=block_t, tk=topk: triton_router.fused_router(
                logits, k, block_t=bt, topk=tk
            )
    times = time_interleaved(candidates, device, warmup, rounds)
    return [
        Result("router_sweep", f"T={T} E={E} k={k}", name, t if isinstance(t, float) else None, error=str(t))
        for name, t in times.items()
    ]


def candidates_for(logits: torch.Tensor, k: int, compiled, topkgating, ds_note: str, ds_max_gb: float):
    """(candidates name -> callable, notes name -> text, skipped name -> reason) for one shape."""
    T, E = logits.shape
    candidates = {
        "fused router": lambda: fused_router_only(logits, k),
        PROJECT: lambda: fused_full(logits, k),
        "eager softmax_topk": lambda: eager_softmax_topk(logits, k),
        "eager full": lambda: eager_full(logits, k),
    }
    notes = {"fused router": "no slot positions, no loss scalars"}
    skipped = {}
    if logits.is_cuda:
        try:
            candidates["fused full (CUDA graph)"] = cuda_graphed(fused_full, logits, k)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            skipped["fused full (CUDA graph)"] = f"capture failed: {exc}"
    if compiled is not None:
        candidates["compiled full"] = lambda: compiled(logits, k)
    if topkgating is None:
        skipped["deepspeed topkgating"] = ds_note
    elif deepspeed_bytes(T, E, k) > ds_max_gb * 1e9:
        skipped["deepspeed topkgating"] = f"skipped: ~{deepspeed_bytes(T, E, k) / 1e9:.0f} GB of dense masks"
    else:
        logits32 = logits.float()
        candidates["deepspeed topkgating"] = lambda: topkgating(logits32, k, 1.0, 4, drop_tokens=True)
        notes["deepspeed topkgating"] = ds_note
    return candidates, notes, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help=f"TxExk list; GPU default {GPU_SHAPES}; CPU {CPU_SHAPES}")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="logits dtype")
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing (GPU 10, CPU 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per candidate (GPU 50, CPU 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--ds-max-gb", type=float, default=8.0, help="skip DeepSpeed where its masks exceed this")
    parser.add_argument("--sweep", action="store_true", help="also sweep the Triton launcher's tiles (CUDA)")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    shapes = parse_shapes(args.shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES))
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    rounds = args.rounds if args.rounds is not None else (50 if on_gpu else 5)
    dtype = DTYPES[args.dtype]
    print(environment(device), f"logits {args.dtype}, median of {rounds} interleaved rounds")

    compiled = None if args.no_compile else torch.compile(eager_full)
    try:
        from deepspeed.moe.sharded_moe import topkgating

        ds_note = "fp32 logits, capacity factor 1"
    except Exception as exc:  # noqa: BLE001 - DeepSpeed is optional here
        topkgating, ds_note = None, f"deepspeed unavailable: {type(exc).__name__}: {str(exc)[:120]}"

    results: list[Result] = []
    for T, E, k in shapes:
        shape = f"T={T} E={E} k={k}"
        logits = torch.randn(T, E, device=device).to(dtype)
        check_agreement(logits, k)
        floor_bytes = T * E * logits.element_size() + T * k * (4 + 8 + 8) + E * 8
        candidates, notes, skipped = candidates_for(logits, k, compiled, topkgating, ds_note, args.ds_max_gb)
        times = time_interleaved(candidates, device, warmup, rounds)
        for name, t in times.items():
            ok = isinstance(t, float)
            results.append(
                Result(
                    "router",
                    shape,
                    name,
                    t if ok else None,
                    metric=floor_bytes / (t * 1e3) if ok else None,
                    metric_name="eff GB/s",
                    note=notes.get(name, ""),
                    error="" if ok else str(t),
                    extra={"T": T, "E": E, "k": k, "dtype": args.dtype, "floor_bytes": floor_bytes},
                )
            )
        for name, why in skipped.items():
            results.append(Result("router", shape, name, None, metric_name="eff GB/s", note=why))
        if args.sweep and on_gpu:
            results.extend(sweep(logits, k, device, warmup, rounds))
        if on_gpu:
            del logits, candidates
            torch.cuda.empty_cache()

    print_table("router", [r for r in results if r.bench == "router"], PROJECT, BASELINES)
    if any(r.bench == "router_sweep" for r in results):
        print_table("Triton launcher sweep (router only)", [r for r in results if r.bench == "router_sweep"], "", [])
    write_json(args.json, "router", device, vars(args), results)


if __name__ == "__main__":
    main()
