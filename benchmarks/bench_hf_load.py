"""Peak memory of loading a Hugging Face MoE checkpoint with ``model=hf`` (``moe.hf.model.HFCausalLM``) against
transformers' own ``from_pretrained`` of the same directory, in the same dtype, each in a fresh process.

    python benchmarks/bench_hf_load.py [--hidden 512 --layers 8 --experts 8 --ffn 1024] [--repeats 3]

A random Mixtral is saved in bf16 once (a temporary directory). For dtype float32 and bfloat16 it prints the
median peak RSS above the RSS after importing torch, transformers and moe (Linux: the peak, ``VmHWM``, is reset
through ``/proc/self/clear_refs`` once the imports are done) of
(a) transformers alone and (b) ours (transformers' load, then each sparse block swapped for our layer), the ratio
b/a, and the size of the parameters in that dtype: "weights load once" means b stays near a, not a + one more
copy of the experts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
path, dtype, which = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
import moe.hf.model  # imported before the baseline in both cases

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS: imports are not counted
    f.write("5")
base = status("VmRSS")
if which == "ours":
    from moe.config import ModelConfig, RouterConfig
    model = moe.hf.model.HFCausalLM(ModelConfig(_target_="moe.hf.model.HFCausalLM", path=path, dtype=sys.argv[2]),
                                    RouterConfig(kind="from_model"))
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
params = sum(p.numel() * p.element_size() for p in model.parameters())
peak = status("VmHWM")
print(json.dumps({"peak_above_baseline_mb": (peak - base) / 1024, "params_mb": params / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        cfg = transformers.MixtralConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.ffn,
                                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                         num_local_experts=args.experts, num_experts_per_tok=2)  # fmt: skip
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp)
        for dtype in ("float32", "bfloat16"):
            row = {}
            for which in ("transformers", "ours"):
                runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, tmp, dtype, which], check=True,
                                                  capture_output=True, text=True).stdout.strip().splitlines()[-1])
                        for _ in range(args.repeats)]  # fmt: skip
                row[which] = statistics.median(r["peak_above_baseline_mb"] for r in runs)
                row["params_mb"] = runs[0]["params_mb"]
                row[f"{which}_spread"] = (min(r["peak_above_baseline_mb"] for r in runs),
                                          max(r["peak_above_baseline_mb"] for r in runs))  # fmt: skip
            print(f"{dtype}: parameters {row['params_mb']:.0f} MB; peak above baseline (median of {args.repeats}): "
                  f"transformers {row['transformers']:.0f} MB {row['transformers_spread']}, ours {row['ours']:.0f} MB "
                  f"{row['ours_spread']}; ours / transformers = {row['ours'] / row['transformers']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
