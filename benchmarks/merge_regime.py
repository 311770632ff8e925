"""Merging in the papers' regime: a general base, one fine-tune per target domain that masters it, N = 2..8 merged.

    python benchmarks/merge_regime.py --work /tmp/regime        # the full run (31 min on the shared 2-core VM)
    python benchmarks/merge_regime.py --work /tmp/regime        # again: reuses the models, only merges
    python benchmarks/merge_regime.py --tiny --work /tmp/tiny   # CI size (seconds); tests/test_merge_regime.py
    python benchmarks/merge_regime.py --work /tmp/regime --report   # render what a cut run finished (partial.json)

1. A base byte-level MoE LM (``moe.data.pycode``) is trained on the stdlib outside the 8 ``--targets`` domains.
2. Per seed, one fine-tune per target domain, from the base, on that domain alone (the seed sets the data order).
3. Per seed and N, N target domains drawn with that seed are merged by every method, at its paper defaults
   (``merging.METHODS[m].params``) and with lambda and its density knob tuned by Optuna's TPE sampler on the
   tuning modules (``data.pycode.tune_fraction``), which are neither trained on nor reported.
4. Score per task: the gain share (``merging.search.gain_share``), (bpb_base - bpb_merged) / (bpb_base -
   bpb_finetune) on the reported held-out modules; averaged over the N tasks, then mean +- std over seeds.

Writes ``--out`` (markdown tables), ``--json`` (every number) and ``--plot`` (gain share against N per method).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# The 8 largest stdlib domains but http, whose held-out modules gain ~0.04 bits/byte from its fine-tune (too small a
# denominator); idlelib instead. The base trains on the rest (concurrent, http, json, logging, urllib, other).
TARGETS = ("asyncio", "email", "tkinter", "xml", "multiprocessing", "unittest", "importlib", "idlelib")
METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_p0.9", "della", "pcb", "star", "breadcrumbs",
           "tsv_m", "iso_c", "divmerge")  # fmt: skip
VARIANTS = {"dare_p0.9": ("dare", {"drop": 0.9})}  # a row -> (method, parameters over its defaults)
# The tuned knobs: lam and the method's own density (DARE: drop = 1 - density; PCB: ratio; STAR: eta, in %)
SPACES = {
    "task_arithmetic": {"lam": (0.1, 2.0)},
    "ties": {"lam": (0.1, 2.5), "density": (0.05, 1.0)},
    "dare": {"lam": (0.1, 2.0), "drop": (0.0, 0.95)},
    "dare_p0.9": {"lam": (0.1, 2.0)},
    "della": {"lam": (0.1, 2.5), "density": (0.1, 0.9)},
    "pcb": {"lam": (0.1, 2.5), "ratio": (0.05, 1.0)},
    "star": {"lam": (0.1, 2.5), "eta": (5.0, 95.0)},
    "breadcrumbs": {"lam": (0.1, 2.0), "density": (0.3, 0.99)},
    "tsv_m": {"lam": (0.1, 2.5)},
    "iso_c": {"lam": (0.1, 2.5)},
}


@dataclass
class Size:
    d_model: int = 64
    d_ff: int = 128
    experts: int = 4
    seq_len: int = 128
    batch: int = 16
    base_steps: int = 1500
    base_lr: float = 3e-3
    ft_steps: int = 150
    ft_lr: float = 1e-3
    windows: int = 64  # evaluation windows per domain and split (24 was too few: see BENCHMARKS.md)
    trials: int = 8  # Optuna trials per (method, N, seed)


TINY = Size(d_model=16, d_ff=16, experts=2, seq_len=32, batch=4, base_steps=12, ft_steps=6, windows=2, trials=2)


def data_cfg(size: Size, domains=None, eval_domains=None):
    from moe.config import PyCodeConfig

    return PyCodeConfig(domains=domains, eval_domains=eval_domains, tune_fraction=0.1, seq_len=size.seq_len,
                        batch_size=size.batch, val_windows_per_domain=size.windows)  # fmt: skip


def train(model, corpus, size: Size, steps: int, lr: float, seed: int, weight_decay: float) -> None:
    """AdamW with 5% warm-up and cosine decay to 10%, on random windows of ``corpus``, gradient clip 1."""
    from moe.data.pycode import TrainWindows
    from moe.nn.losses import router_loss

    windows, g = TrainWindows(corpus, size.seq_len), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))  # fmt: skip
    model.train()
    for _ in range(steps):
        batch = windows.__getitems__(torch.randint(len(windows), (size.batch,), generator=g).tolist())
        logits, routings = model(batch["tokens"][:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        mask = batch["target_mask"][:, 1:]
        loss = (ce * mask).sum() / mask.sum() + router_loss(routings, 1e-2, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def domains_of(corpus, domains):
    """The segments of ``corpus`` (a ``moe.data.pycode.ByteCorpus``) that hold ``domains``, sharing its bytes."""
    from moe.data.pycode import DOMAINS, ByteCorpus

    keep = torch.tensor([DOMAINS[d] in domains for d in corpus.seg_domain.tolist()], dtype=torch.bool)
    return ByteCorpus(corpus.data, corpus.seg_domain[keep], corpus.seg_start[keep], corpus.seg_end[keep], [])


def build_models(size: Size, corpus, targets, seeds, work: Path) -> tuple[Path, dict[int, dict[str, Path]]]:
    """The base and every fine-tune as export directories under ``work`` (kept: a rerun trains nothing)."""
    from moe.adapters.moe_adapter import load_any
    from moe.config import ModelConfig, RouterConfig
    from moe.data.pycode import DOMAINS
    from moe.export import export_model
    from moe.nn.model import MoETransformer

    def done(path: Path) -> bool:
        return (path / "model.safetensors").is_file()

    base = work / "base"
    if not done(base):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=257, max_seq_len=size.seq_len, d_model=size.d_model, n_layer=2, n_head=4,
                          num_experts=size.experts, d_ff=size.d_ff)  # fmt: skip
        model = MoETransformer(cfg, RouterConfig())
        general = domains_of(corpus, [d for d in DOMAINS if d not in targets])
        train(model, general, size, size.base_steps, size.base_lr, seed=0, weight_decay=0.1)
        export_model(model, base)
        print(f"base: {size.base_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    fts: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        for task in targets:
            out = fts.setdefault(seed, {})[task] = work / f"ft_{task}_s{seed}"
            if done(out):
                continue
            t0 = time.perf_counter()
            model = load_any(base)
            ft_seed = 1000 * seed + 1  # the data order
            train(model, domains_of(corpus, [task]), size, size.ft_steps, size.ft_lr, ft_seed, weight_decay=0.0)
            export_model(model, out)
            print(f"fine-tune {task} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return base, fts


class Scorer:
    """Bits per byte per target domain on the reported ("val") or tuning ("search") modules; inputs cached."""

    def __init__(self, size: Size, targets):
        from moe.adapters.pycode_adapter import PyCodeAdapter
        from moe.config import DataConfig

        self.adapter = PyCodeAdapter()
        self.data = DataConfig(_target_="moe.data.pycode.PyCodeDataModule", pycode=data_cfg(size, None, list(targets)))
        self.dm = self.adapter.datamodule(self.data)  # every domain's training text: the models train on it
        self.cache: dict[tuple, dict[str, float]] = {}

    def __call__(self, path: Path, split: str, tasks=None, cache: bool = True) -> dict[str, float]:
        """Scores on ``tasks`` only (default: every target), from the rows of those domains."""
        from moe.data.pycode import DOMAINS, evaluate_bits_per_byte
        from moe.data.tasks import TaskSplit

        key = (str(path), split, tuple(tasks or ()))
        if not cache or key not in self.cache:
            rows = self.dm.val_split if split == "val" else self.dm.tune_split
            if tasks:
                keep = torch.isin(rows.task_id, torch.tensor([DOMAINS.index(t) for t in tasks]))
                rows = TaskSplit(rows.tokens[keep], rows.target_mask[keep], rows.task_id[keep])
            scores = evaluate_bits_per_byte(self.adapter.load(str(path)), rows)
            self.cache[key] = {d: v for d, v in scores.items() if d != "all"}
        return self.cache[key]


def merge_one(method: str, base: Path, fts: list[Path], tasks: list[str], params: dict, out: Path, scorer) -> Path:
    from merging import merge
    from merging.divmerge import divmerge

    name, extra = VARIANTS.get(method, (method, {}))
    if name == "divmerge":
        a, d = scorer.adapter, scorer.data  # prompts: the first half of training windows of each task's domain
        prompts = [a.unlabeled(d, t, prompts=True, batches=2) for t in tasks]
        res = divmerge(str(base), [str(f) for f in fts], prompts, a, max_new_tokens=a.answer_length(d, tasks[0]))
        a.save(res.model, out)
        return out
    merge(base, fts, out, method=name, overwrite=True, progress=False, report=False, **{**extra, **params})
    return out


def share(scorer, merged: Path, base: Path, fts: list[Path], tasks: list[str], split: str, per_task=None) -> float:
    """The mean gain share over ``tasks``; ``per_task`` (a dict) receives each task's."""
    from merging.search import gain_share

    own = {t: scorer(f, split)[t] for t, f in zip(tasks, fts)}
    shares = gain_share(scorer(merged, split, tasks, cache=False), scorer(base, split), own)
    if per_task is not None:
        per_task.update({t: round(shares[t], 4) for t in tasks})
    return float(np.mean([shares[t] for t in tasks]))


def tune(method, base, fts, tasks, out, scorer, trials: int, seed: int) -> dict:
    """Optuna TPE over SPACES[method] on the tuning split, starting from the defaults; the best parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, extra = VARIANTS.get(method, (method, {}))
    defaults = {k: float({**{p: v.default for p, v in _params(name).items()}, **extra}[k]) for k in SPACES[method]}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, trials))  # then TPE proper
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(defaults)

    def objective(trial):
        params = {k: trial.suggest_float(k, lo, hi) for k, (lo, hi) in SPACES[method].items()}
        merged = merge_one(method, base, fts, tasks, params, out, scorer)
        return share(scorer, merged, base, fts, tasks, "search")

    study.optimize(objective, n_trials=trials)
    return study.best_params


def _params(name):
    from merging import METHODS

    return METHODS[name].params


def run(size: Size, targets, sizes, seeds, methods, work: Path, tuned: bool = True) -> dict:
    """Every number of the benchmark: {"gap": ..., "defaults"/"tuned": {method: {N: [share per seed]}}, ...}."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".* is experimental")  # optuna 2.10's enqueue_trial
    start = time.perf_counter()
    scorer = Scorer(size, targets)
    base, fts = build_models(size, scorer.dm.train_corpus, targets, seeds, work)
    gap = {s: {t: {"base": scorer(base, "val")[t], "finetune": scorer(fts[s][t], "val")[t]} for t in targets}
           for s in seeds}  # fmt: skip
    print(json.dumps({"gap (bpb base, fine-tune)": gap}), flush=True)
    res = {"gap": gap, "defaults": {}, "tuned": {}, "params": {}, "seconds": {}, "subsets": {}, "per_task": {}}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for n in sizes:
            tasks = [targets[i] for i in sorted(rng.choice(len(targets), n, replace=False))]
            res["subsets"][f"{seed}/{n}"] = tasks
            paths = [fts[seed][t] for t in tasks]
            for method in methods:
                out, t0 = work / "merged" / method, time.perf_counter()
                merged = merge_one(method, base, paths, tasks, {}, out, scorer)
                detail = res["per_task"].setdefault(f"defaults/{method}/{seed}/{n}", {})
                res["defaults"].setdefault(method, {}).setdefault(n, []).append(
                    share(scorer, merged, base, paths, tasks, "val", detail)
                )
                if tuned and method in SPACES:
                    best = tune(method, base, paths, tasks, out, scorer, size.trials, seed)
                    merged = merge_one(method, base, paths, tasks, best, out, scorer)
                    detail = res["per_task"].setdefault(f"tuned/{method}/{seed}/{n}", {})
                    res["tuned"].setdefault(method, {}).setdefault(n, []).append(
                        share(scorer, merged, base, paths, tasks, "val", detail)
                    )
                    res["params"][f"{method}/{seed}/{n}"] = best
                res["seconds"][f"{method}/{seed}/{n}"] = round(time.perf_counter() - t0, 2)
                print(json.dumps({"seed": seed, "n": n, "method": method,
                                  "default": round(res["defaults"][method][n][-1], 4),
                                  "tuned": round(res["tuned"][method][n][-1], 4) if method in res["tuned"] else None,
                                  "s": res["seconds"][f"{method}/{seed}/{n}"]}), flush=True)  # fmt: skip
            (work / "partial.json").write_text(json.dumps(res, default=str))  # --report renders what is done
    shutil.rmtree(work / "merged", ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - start)
    return res


def table(res: dict, key: str, sizes) -> str:
    rows = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " | N=8 - N=2 |" if 2 in sizes and 8 in sizes
            else "| method | " + " | ".join(f"N={n}" for n in sizes) + " |"]  # fmt: skip
    rows.append("|---|" + "---:|" * (len(rows[0].split("|")) - 3))
    for method, by_n in res[key].items():
        cells = [f"{np.mean(by_n[n]):.3f} ± {np.std(by_n[n]):.3f}" if n in by_n else "-" for n in sizes]
        if 2 in by_n and 8 in by_n:
            cells.append(f"{np.mean(by_n[8]) - np.mean(by_n[2]):+.3f}")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(res: dict, sizes, path: Path, floor: float = -1.0) -> None:
    """Gain share against N per method, defaults and tuned side by side (methods without knobs dashed in both);
    a method's points below ``floor`` are clipped to it, and its legend entry gives its minimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys([*res["defaults"], *res["tuned"]]))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), sharey=True)
    for ax, key in zip(axes, ("defaults", "tuned")):
        rows = {**{m: v for m, v in res["defaults"].items() if m not in res["tuned"]}, **res[key]}
        for method, by_n in rows.items():
            ns = [n for n in sizes if n in by_n]
            mean, std = np.array([np.mean(by_n[n]) for n in ns]), np.array([np.std(by_n[n]) for n in ns])
            low = f" (min {mean.min():.1f})" if mean.min() < floor else ""
            ax.errorbar(
                ns,
                np.maximum(mean, floor),
                yerr=np.where(mean < floor, 0, std),
                marker="o",
                capsize=3,
                color=colors[method],
                ls="--" if method not in res["tuned"] else "-",
                label=method + low,
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{key} (mean ± std over seeds)", xlabel="N merged tasks", xticks=list(sizes))
        ax.set_ylim(floor - 0.05, None)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)
    axes[0].set_ylabel("gain share kept (1 = fine-tune, 0 = base)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "merge_regime", help="trained models (kept)")
    ap.add_argument("--out", type=Path, default=None, help="markdown tables (default: WORK/merge_regime.md)")
    ap.add_argument("--json", type=Path, default=None, help="every number (default: WORK/merge_regime.json)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "merging" / "merge_regime.png")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--sizes", default="2,4,6,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--trials", type=int, default=None, help="Optuna trials per (method, N, seed); 0: no tuning")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows per domain and split")
    ap.add_argument("--tiny", action="store_true", help="CI size: tiny model, a few steps")
    ap.add_argument("--report", action="store_true", help="only render WORK/partial.json (what a cut run finished)")
    args = ap.parse_args()
    size = TINY if args.tiny else Size()
    if args.trials is not None:
        size = replace(size, trials=args.trials)
    if args.windows is not None:
        size = replace(size, windows=args.windows)
    sizes, targets = [int(s) for s in args.sizes.split(",")], tuple(args.targets.split(","))
    if args.report:
        res = json.loads((args.work / "partial.json").read_text())
        for key in ("defaults", "tuned"):
            res[key] = {m: {int(n): v for n, v in by_n.items()} for m, by_n in res[key].items()}
        res["wall_s"] = "(partial)"
    else:
        res = run(size, targets, sizes, [int(s) for s in args.seeds.split(",")], args.methods.split(","),
                  args.work, tuned=size.trials > 0)  # fmt: skip
    gaps = {t: np.mean([g[t]["base"] - g[t]["finetune"] for g in res["gap"].values()]) for t in targets}
    base_bpb = {t: res["gap"][next(iter(res["gap"]))][t]["base"] for t in targets}
    text = "\n\n".join([
        f"Size {size}; targets {', '.join(targets)}; wall {res['wall_s']} s.",
        "Base bits/byte and its gap to the fine-tune (mean over seeds) per target: "
        + ", ".join(f"{t} {base_bpb[t]:.3f} (-{gaps[t]:.3f})" for t in targets),
        "Paper defaults (gain share on the reported modules, mean ± std over seeds):\n\n"
        + table(res, "defaults", sizes),
        f"Tuned (lambda and density, {size.trials} Optuna TPE trials on the tuning modules):\n\n"
        + table(res, "tuned", sizes) if res["tuned"] else "",
    ])  # fmt: skip
    print(text)
    out, js = args.out or args.work / "merge_regime.md", args.json or args.work / "merge_regime.json"
    out.write_text(text + "\n")
    js.write_text(json.dumps({"size": size.__dict__, **res}, indent=1, default=str))
    plot(res, sizes, args.plot)
    print(f"tables: {out}\nnumbers: {js}\nplot: {args.plot}")


if __name__ == "__main__":
    main()
