"""MoE layer forward + backward: the fused dispatch path (``moe.kernels``) against the loop over experts and
sort + ``grouped_mm``, in one process, interleaved, on the same weights.

Layer: router ``logits = x @ W_r`` (``[T, E]``), top-k softmax routing (renormalised), SwiGLU experts
``down(silu(x @ w1_e) * (x @ w3_e))`` with ``w1, w3: [E, d, f]`` and ``w2: [E, f, d]``, weighted combine.
FLOPs counted = 3 passes (forward, 2x backward) x 3 matmuls x ``2*T*k*d*f`` (the router's matmul is not counted).

Candidates:

- ``moe.kernels + grouped_mm`` (the project): ``fused_router`` -> ``permute`` -> three ``grouped_mm`` over the
  expert-contiguous rows (offsets = cumsum of counts, no host sync) -> ``unpermute``;
- ``moe.kernels + per-expert matmuls``: the same dispatch, experts as a loop of matmuls over the contiguous
  blocks (``counts.tolist()``), the form ``moe.nn.layers.SwiGLUExperts`` uses;
- ``loop over experts``: per expert, ``torch.where(ids == e)``, gather, SwiGLU, ``index_add_`` (the common model-zoo
  block);
- ``sort + grouped_mm``: ``argsort`` + ``bincount`` + gather + ``grouped_mm`` + ``index_add_`` (the best plain-torch
  path of ../shared/reference/README.md);
- ``compiled sort + grouped_mm`` with ``--compile``;
- ``HF MixtralSparseMoeBlock``: Hugging Face transformers' Mixtral block with the experts implementation a
  ``MixtralModel`` resolves by default (``grouped_mm`` in transformers 5.x), our weights copied in; its output and
  input gradient must match ``moe.nn.layers.MoELayer`` before anything is timed.

On the CPU the project path runs the PyTorch kernels (``impl="auto"``). CPU targets, printed at the end:
``moe.nn.layers.MoELayer`` >= 1.2x faster than the HF block on every shape (issue 14), and the kernels path >= 2x
faster than the loop over experts. Default: the median of 9 interleaved rounds (GPU: 10), repeated 5 times (GPU:
once); the summary gives the medians and the ratio's median and range over the repeats. CPU: fp32, the three CPU shapes:

    python benchmarks/bench_moe_layer.py --threads 2 --wait-quiet 900      # CPU: ours vs HF, summary table
    python benchmarks/bench_moe_layer.py --json layer.json                 # GPU: the reference configs, bf16
    python benchmarks/bench_moe_layer.py --threads 2 --configs smollm2-upcycled   # a real upcycled shape
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    DTYPES,
    Result,
    environment,
    load_average,
    print_table,
    time_interleaved,
    wait_quiet,
    write_json,
)
from moe import kernels  # noqa: E402
from moe.config import RouterConfig  # noqa: E402
from moe.nn.experts import pick_impl  # noqa: E402
from moe.nn.layers import MoELayer  # noqa: E402

CONFIGS = {  # name: (T, d, f, E, k)
    "mixtral-like": (8192, 4096, 14336, 8, 2),
    "fine-grained": (16384, 2048, 768, 128, 8),
    "fine-grained-64": (16384, 2048, 1408, 64, 6),
    "cpu-default": (2176, 128, 256, 8, 2),  # the default model's MoE layer: a batch of 128 x 17 tokens
    "cpu-fine": (2048, 256, 128, 32, 4),
    "cpu-fine-64": (1024, 128, 64, 64, 8),
    "smollm2-upcycled": (2048, 576, 1536, 8, 2),  # SmolLM2-135M's MLP as 8 experts, top-2 (experiment=upcycle_smollm2)
}
GPU_DEFAULT = "mixtral-like,fine-grained,fine-grained-64"
CPU_DEFAULT = "cpu-default,cpu-fine,cpu-fine-64"
PROJECT = "moe.kernels + grouped_mm"
HF = "HF MixtralSparseMoeBlock"
OURS_LAYER = "moe.nn.layers.MoELayer"
BASELINES = ["loop over experts", "sort + grouped_mm", "compiled sort + grouped_mm", HF]
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # torch._grouped_mm: older torch
HAS_GROUPED_MM = GROUPED_MM is not None


class Layer:
    """Router and SwiGLU expert weights shared by every candidate. Shapes: w_r ``[d, E]``, w1/w3 ``[E, d, f]``,
    w2 ``[E, f, d]``."""

    def __init__(self, T: int, d: int, f: int, E: int, k: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator(device="cpu").manual_seed(0)

        def param(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

        self.k = k
        self.w_r = param(d, E, scale=1 / math.sqrt(d))
        self.w1 = param(E, d, f, scale=1 / math.sqrt(d))
        self.w3 = param(E, d, f, scale=1 / math.sqrt(d))
        self.w2 = param(E, f, d, scale=1 / math.sqrt(f))

    def params(self) -> list[torch.Tensor]:
        """The shared weights and those of the modules built from them (``moe_layer``, ``hf_block``), so a timed
        step starts with every gradient unset, as after ``optimizer.zero_grad()`` (no accumulation ``add_``)."""
        modules = [getattr(self, name) for name in ("moe_layer", "hf_block") if hasattr(self, name)]
        return [self.w_r, self.w1, self.w3, self.w2, *(p for m in modules for p in m.parameters())]


def moe_layer(x: torch.Tensor, L: Layer) -> torch.Tensor:
    """``moe.nn.layers.MoELayer`` itself (router via ``moe.nn.routing.route``, kernels permute/unpermute, grouped GEMM
    experts), holding copies of L's weights."""
    layer = getattr(L, "moe_layer", None)
    if layer is None:
        d, E = L.w_r.shape
        layer = MoELayer(d, L.w1.shape[2], E, RouterConfig(k=L.k), causal=False).to(L.w1.device, L.w1.dtype)
        with torch.no_grad():
            layer.router.weight.copy_(L.w_r.t())
            for ours, theirs in (
                (layer.experts.w_gate, L.w1),
                (layer.experts.w_up, L.w3),
                (layer.experts.w_down, L.w2),
            ):
                ours.copy_(theirs)
        L.moe_layer = layer
    return layer(x)[0]


def hf_block(L: Layer):
    """The HF Mixtral block of a one-layer ``MixtralModel`` (so its experts implementation is the one transformers
    resolves by default), holding L's weights: ``gate.weight = w_r^T``, ``gate_up_proj[e] = [w1_e | w3_e]^T``,
    ``down_proj[e] = w2_e^T``. None without transformers."""
    block = getattr(L, "hf_block", None)
    if block is None:
        try:
            from transformers import MixtralConfig, MixtralModel
        except ImportError:
            return None
        d, E = L.w_r.shape
        f = L.w1.shape[2]
        cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=L.k,
                            num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                            vocab_size=8)  # fmt: skip
        model = MixtralModel(cfg)
        block = model.layers[0].mlp.to(L.w1.device, L.w1.dtype)
        with torch.no_grad():
            block.gate.weight.copy_(L.w_r.t())
            block.experts.gate_up_proj.copy_(torch.cat([L.w1, L.w3], dim=2).transpose(1, 2))
            block.experts.down_proj.copy_(L.w2.transpose(1, 2))
        L.hf_block, L.hf_impl = block, model.config._experts_implementation
    return block


def hf_mixtral(x: torch.Tensor, L: Layer) -> torch.Tensor:
    return hf_block(L)(x[None])[0]


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def project_grouped_mm(x: torch.Tensor, L: Layer) -> torch.Tensor:
    weights, ids, counts, _, _ = kernels.fused_router(x @ L.w_r, L.k)
    x_sorted, rows = kernels.permute(x, ids, counts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.silu(GROUPED_MM(x_sorted, L.w1, offs=offs)) * GROUPED_MM(x_sorted, L.w3, offs=offs)
    return kernels.unpermute(GROUPED_MM(h, L.w2, offs=offs), weights, rows)


def project_per_expert(x: torch.Tensor, L: Layer) -> torch.Tensor:
    weights, ids, counts, _, _ = kernels.fused_router(x @ L.w_r, L.k)
    x_sorted, rows = kernels.permute(x, ids, counts)
    outs = []
    for e, x_e in enumerate(torch.split(x_sorted, counts.tolist())):
        outs.append((F.silu(x_e @ L.w1[e]) * (x_e @ L.w3[e])) @ L.w2[e])
    return kernels.unpermute(torch.cat(outs), weights, rows)


def loop_over_experts(x: torch.Tensor, L: Layer) -> torch.Tensor:
    weights, ids = topk_softmax(x @ L.w_r, L.k)
    out = torch.zeros_like(x)
    for e in range(L.w1.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        x_e = x[tok]
        y_e = (F.silu(x_e @ L.w1[e]) * (x_e @ L.w3[e])) @ L.w2[e]
        out = out.index_add(0, tok, y_e * weights[tok, slot, None].to(y_e.dtype))
    return out


def sort_grouped_mm(x: torch.Tensor, L: Layer) -> torch.Tensor:
    weights, ids = topk_softmax(x @ L.w_r, L.k)
    ids_S = ids.reshape(-1)
    order = torch.argsort(ids_S, stable=True)
    offs = torch.cumsum(torch.bincount(ids_S, minlength=L.w1.shape[0]), 0).to(torch.int32)
    token = order // L.k
    x_sorted = x[token]
    h = F.silu(GROUPED_MM(x_sorted, L.w1, offs=offs)) * GROUPED_MM(x_sorted, L.w3, offs=offs)
    y = GROUPED_MM(h, L.w2, offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y)


def fwd_bwd(fn, x: torch.Tensor, L: Layer, grad: torch.Tensor):
    def step():
        for t in [x, *L.params()]:
            t.grad = None
        fn(x, L).backward(grad)

    return step


def check_same(x: torch.Tensor, L: Layer, grad: torch.Tensor, tol: float) -> None:
    """Raise unless the HF block and ``moe.nn.layers.MoELayer`` agree on the output and the input gradient."""
    errs = []
    for fn in (moe_layer, hf_mixtral):
        out = fn(x, L)
        errs.append((out, *torch.autograd.grad(out, x, grad)))
    err_out, err_dx = rel_err(errs[1][0], errs[0][0]), rel_err(errs[1][1], errs[0][1])
    print(f"  HF ({L.hf_impl}) vs {OURS_LAYER}: rel err out {err_out:.1e}, dx {err_dx:.1e}")
    if not (err_out <= tol and err_dx <= tol):
        raise RuntimeError(f"HF block and {OURS_LAYER} disagree (rel err {err_out:.1e} / {err_dx:.1e} > {tol})")


def experts_impl(x: torch.Tensor, L: Layer) -> str:
    """The expert implementation ``moe.nn.experts.pick_impl`` chooses for this layer's routing."""
    _, ids, counts, _, _ = kernels.fused_router(x.detach() @ L.w_r.detach(), L.k)
    return pick_impl(x.new_empty(ids.numel(), x.shape[1]), counts, L.w1.shape[2])


def _median(values: list) -> float | str:
    """The median of the timings (an error string, if any repeat failed, instead)."""
    errors = [v for v in values if not isinstance(v, float)]
    return errors[0] if errors else statistics.median(values)


def print_summary(summary: list[tuple], stat: str, rounds: int, repeat: int) -> None:
    """One line per shape: our layer, the HF block (medians over the repeats), the ratio's median and range over
    the repeats, and the 1-min load average around the timing."""
    print(f"\n## Summary: {OURS_LAYER} vs {HF} ({stat} of {rounds} rounds, {repeat} repeats, forward + backward; "
          "target >= 1.2x)")  # fmt: skip
    print("\n| shape | ours (ms) | HF (ms) | HF / ours: median [min-max] | our experts | HF experts | load avg |")
    print("|---|---:|---:|---:|---|---|---|")
    for shape, ours, hf, ratios, hf_impl, load0, load1, impl in summary:
        ok = isinstance(ours, float) and isinstance(hf, float) and ratios
        spread = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]" if ok else "-"
        cells = f"{ours / 1e3:.2f} | {hf / 1e3:.2f} | {spread}" if ok else f"{ours} | {hf} | -"
        print(f"| {shape} | {cells} | {impl} | {hf_impl} | {load0:.2f} / {load1:.2f} |")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs", default=None, help=f"names from {list(CONFIGS)}; GPU {GPU_DEFAULT}; CPU {CPU_DEFAULT}"
    )
    parser.add_argument("--shape", default=None, help="a custom T,d,f,E,k (instead of --configs)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="GPU default bf16, CPU fp32")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (GPU 3, CPU 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per candidate (GPU 10, CPU 9)")
    parser.add_argument("--stat", choices=["median", "min"], default="median", help="per candidate, over the rounds")
    parser.add_argument("--repeat", type=int, default=None, help="repeats of the timing, for medians and a range "
                        "(CPU 5, GPU 1: benchmarks/gpu_check.sh has a time budget)")  # fmt: skip
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="first wait up to this many s for load < 0.5")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of sort + grouped_mm")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    rounds = args.rounds if args.rounds is not None else (10 if on_gpu else 9)
    stat = args.stat
    args.repeat = args.repeat or (1 if on_gpu else 5)
    if args.shape:
        configs = {"custom": tuple(int(v) for v in args.shape.split(","))}
    else:
        names = (args.configs or (GPU_DEFAULT if on_gpu else CPU_DEFAULT)).split(",")
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise ValueError(f"--configs: unknown {unknown}, expected names from {list(CONFIGS)}")
        configs = {n: CONFIGS[n] for n in names}
    if args.wait_quiet > 0:
        waited, load = wait_quiet(args.wait_quiet)
        print(f"waited {waited:.0f} s for a quiet machine (1-min load average {load:.2f})")
    print(environment(device), f"{dtype}, {stat} of {rounds} interleaved rounds, forward + backward")

    candidates_all = {
        OURS_LAYER: moe_layer,
        "moe.kernels + per-expert matmuls": project_per_expert,
        "loop over experts": loop_over_experts,
    }
    if HAS_GROUPED_MM:
        candidates_all = {PROJECT: project_grouped_mm, **candidates_all, "sort + grouped_mm": sort_grouped_mm}
        if args.compile:
            candidates_all["compiled sort + grouped_mm"] = torch.compile(sort_grouped_mm)
    if importlib.util.find_spec("transformers") is not None:
        candidates_all[HF] = hf_mixtral
    results: list[Result] = []
    summary: list[tuple] = []
    for name, (T, d, f, E, k) in configs.items():
        shape = f"{name}: T={T} d={d} f={f} E={E} k={k}"
        L = Layer(T, d, f, E, k, device, dtype)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(T, d, generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(T, d, generator=g).to(device, dtype)
        flops = 18 * T * k * d * f

        # the candidates compute the same layer: compare outputs and input gradients with the loop
        reference_out = loop_over_experts(x, L)
        (reference_gx,) = torch.autograd.grad(reference_out, x, grad)
        notes = {}
        for cname, fn in candidates_all.items():
            try:
                out = fn(x, L)
                (gx,) = torch.autograd.grad(out, x, grad)
                notes[cname] = (
                    f"rel err vs loop: out {rel_err(out, reference_out):.1e}, dx {rel_err(gx, reference_gx):.1e}"
                )
            except Exception as exc:  # noqa: BLE001 - reported in the table
                notes[cname] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del reference_out, reference_gx
        if HF in candidates_all:  # HF and our layer compute the same function: check it before timing anything
            check_same(x, L, grad, 1e-5 if dtype == torch.float32 else 2e-2)

        steps = {cname: fwd_bwd(fn, x, L, grad) for cname, fn in candidates_all.items()}
        load0 = load_average()
        repeats = [time_interleaved(steps, device, warmup, rounds, stat) for _ in range(args.repeat)]
        times = {c: _median([t[c] for t in repeats]) for c in repeats[0]}  # per candidate, over the repeats
        ratios = [t[HF] / t[OURS_LAYER] for t in repeats
                  if isinstance(t.get(HF), float) and isinstance(t.get(OURS_LAYER), float)]  # fmt: skip
        hf_impl = getattr(L, "hf_impl", None)
        row = (shape, times.get(OURS_LAYER), times.get(HF), ratios, hf_impl, load0, load_average(), experts_impl(x, L))
        summary.append(row)
        for cname, t in times.items():
            ok = isinstance(t, float)
            results.append(
                Result(
                    "moe_layer_fwd_bwd",
                    shape,
                    cname,
                    t if ok else None,
                    metric=flops / (t * 1e-6) / (1e12 if on_gpu else 1e9) if ok else None,
                    metric_name="TFLOP/s" if on_gpu else "GFLOP/s",
                    note=notes.get(cname, ""),
                    error="" if ok else str(t),
                    extra={"T": T, "d": d, "f": f, "E": E, "k": k, "dtype": str(dtype), "flops": flops},
                )
            )
        del L, x, grad
        if on_gpu:
            torch.cuda.empty_cache()

    project = OURS_LAYER if not on_gpu or not HAS_GROUPED_MM else PROJECT
    print_table("MoE layer forward + backward", results, project, BASELINES)
    if not on_gpu:
        print("\nCPU target: the reference path (moe.kernels on CPU) >= 2x faster than the loop over experts")
        by_shape: dict[str, dict[str, float]] = {}
        for r in results:
            if r.us:
                by_shape.setdefault(r.shape, {})[r.impl] = r.us
        for shape, t in by_shape.items():
            for ours in ("moe.nn.layers.MoELayer", PROJECT, "moe.kernels + per-expert matmuls"):
                if ours in t and "loop over experts" in t:
                    print(f"  {shape}  [{ours}]  loop / ours = {t['loop over experts'] / t[ours]:.2f}x")
    print_summary(summary, stat, rounds, args.repeat)
    write_json(args.json, "moe_layer", device, vars(args), results)


if __name__ == "__main__":
    main()
