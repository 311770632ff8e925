"""Expert compute alone (``moe.nn.experts.swiglu_experts``), forward + backward, every implementation against the others
over a sweep of rows per expert: the measurements behind ``moe.nn.experts.pick_impl``.

    python benchmarks/bench_experts.py --threads 2 --wait-quiet 600

Rows are routed uniformly at random (multinomial counts, as a balanced router gives), about ``--rows`` of them, so
the sweep over rows per expert n is a sweep over E = rows / n. fp32 on the CPU; time of one forward + backward,
best of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from benchmarks.timing import load_average, time_interleaved, wait_quiet  # noqa: E402
from moe.nn.experts import BMM_MAX_ROWS_PER_EXPERT, pick_impl, swiglu_experts  # noqa: E402

IMPLS = ("grouped_mm", "bmm", "loop")


def case(n: int, d: int, f: int, rows: int, seed: int = 0):
    """(step function per impl, E, padding fraction) for about ``rows`` rows, n per expert on average."""
    E = max(1, round(rows / n))
    g = torch.Generator().manual_seed(seed)
    S = n * E
    counts_E = torch.bincount(torch.randint(0, E, (S,), generator=g), minlength=E)
    x_SD = torch.randn(S, d, generator=g).requires_grad_()
    ws = [(torch.randn(E, a, b, generator=g) / math.sqrt(a)).requires_grad_() for a, b in ((d, f), (d, f), (f, d))]
    grad_SD = torch.randn(S, d, generator=g)

    def step(impl):
        def run():
            for t in (x_SD, *ws):
                t.grad = None
            swiglu_experts(x_SD, counts_E, *ws, impl=impl).backward(grad_SD)

        return run

    padding = E * int(counts_E.max()) / S - 1
    return {impl: step(impl) for impl in IMPLS}, E, padding, pick_impl(x_SD, counts_E, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8192, help="rows (token, expert slots) per case")
    parser.add_argument("--per-expert", default="32,64,128,192,256,384,512,1024", help="rows per expert to sweep")
    parser.add_argument("--dims", default="128x256,256x128,128x64", help="d x f pairs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s for load < 0.5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.wait_quiet > 0:
        waited, load = wait_quiet(args.wait_quiet)
        print(f"waited {waited:.0f} s for a quiet machine; 1-min load average {load:.2f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward + backward, "
          f"best of {args.rounds} interleaved rounds; pick_impl threshold n <= {BMM_MAX_ROWS_PER_EXPERT}")  # fmt: skip
    print(f"\n| d x f | rows/expert n | E | padding | {' | '.join(IMPLS)} (ms) | fastest | pick_impl | load |")
    print("|---|---:|---:|---:|" + "---:|" * len(IMPLS) + "---|---|---:|")
    for dims in args.dims.split(","):
        d, f = (int(v) for v in dims.split("x"))
        for n in (int(v) for v in args.per_expert.split(",")):
            steps, E, padding, picked = case(n, d, f, args.rows)
            times = time_interleaved(steps, torch.device("cpu"), warmup=1, rounds=args.rounds, stat="min")
            ms = {k: v / 1e3 for k, v in times.items() if isinstance(v, float)}
            best = min(ms, key=ms.get)
            cells = " | ".join(f"{ms[k]:.2f}" if k in ms else str(times[k])[:30] for k in IMPLS)
            print(f"| {d}x{f} | {n} | {E} | {padding:.0%} | {cells} | {best} | {picked} | {load_average():.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
