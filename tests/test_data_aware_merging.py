"""DivMerge (merging.divmerge) and PLeaS (merging.pleas) on our MoE model through moe.adapters.moe_adapter.

1. Hand-worked pieces: JS/KL of known distributions, greedy decoding's EOS mask, least squares recovering known
   weights (and keeping PLeaS's zero blocks), partial matching of a known cost.
2. An exact round trip: B = A with every unit kind permuted by hand (residual channels, heads, experts, each
   expert's hidden units); PLeaS recovers every permutation and reproduces A's outputs, at width 1x and 1.5x.
3. Demos on trained models (numbers printed with ``-s``, recorded in BENCHMARKS.md). A module fixture trains tiny
   MoEs (d_model 32, 2 layers, 2 heads, 4 experts of d_ff 32, top-2): "copy" from seed 0 and from seed 1 (no
   shared base), and fine-tunes of the seed-0 model on "sort" and on "lookup" (tasks it cannot do).
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from merging.divmerge import divmerge, greedy_decode, js_divergence, kl_divergence
from merging.pleas import match_units, pleas, solve_least_squares
from merging.protocols import UnlabeledData
from moe.adapters.moe_adapter import MoEAdapter, unlabeled_batches
from moe.config import DataConfig, ModelConfig, MoEConfig, RouterConfig
from moe.data.tasks import Vocab, build_splits, max_example_len
from moe.nn.losses import router_loss
from moe.nn.model import MoETransformer
from moe.train.evaluate import target_loss_and_correct, task_metrics

from .conftest import ROOT

DATA = DataConfig(
    tasks=["copy", "sort", "lookup"], eval_tasks=["copy", "sort", "lookup"], train_per_task=2000, val_per_task=200
)
MODEL = ModelConfig(vocab_size=Vocab(DATA.num_symbols).size, max_seq_len=max_example_len(DATA) - 1, d_model=32,
                    n_layer=2, n_head=2, num_experts=4, d_ff=32)  # fmt: skip
ROUTER = RouterConfig(k=2)


def _train(task: str, seed: int, steps: int, batch: int, init: MoETransformer | None = None) -> MoETransformer:
    """AdamW at 3e-3 on one task, with the router's aux and z losses as ``train.py`` adds them."""
    train, _ = build_splits(replace(DATA, tasks=[task], eval_tasks=[task]))
    torch.manual_seed(seed)
    model = MoETransformer(MODEL, ROUTER)
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, train.tokens.shape[0], (batch,), generator=gen)
        tokens = train.tokens[ix]
        logits, routings = model(tokens[:, :-1])
        loss = target_loss_and_correct(logits, tokens, train.target_mask[ix])[0].mean()
        loss = loss + router_loss(routings, ROUTER.aux_loss_coef, ROUTER.z_loss_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast as two here and does not stall when other processes hold the
    cores (measured: 100 training steps 1.6 s either way, half the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    copy0 = _train("copy", seed=0, steps=300, batch=64)
    return {
        "copy0": copy0,
        "copy1": _train("copy", seed=1, steps=300, batch=64),
        "sort": _train("sort", seed=0, steps=400, batch=32, init=copy0),
        "lookup": _train("lookup", seed=0, steps=400, batch=32, init=copy0),
    }


@pytest.fixture(scope="module")
def splits():
    return build_splits(DATA)


# ------------------------------------------------------------------------------------------ hand-worked pieces


def test_js_and_kl_of_known_distributions():
    log = lambda *p: torch.tensor(p).log()  # noqa: E731
    # disjoint supports: JS reaches its maximum log 2 (the zero entries must not produce NaN)
    torch.testing.assert_close(js_divergence(log(1.0, 0.0), log(0.0, 1.0)), torch.tensor(math.log(2)))
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); KL(p||m) = 1/2 log(4/3), KL(q||m) = log(4/3) -> JS = 3/4 log(4/3)
    torch.testing.assert_close(js_divergence(log(0.5, 0.5), log(1.0, 0.0)), torch.tensor(0.75 * math.log(4 / 3)))
    torch.testing.assert_close(js_divergence(log(1.0, 0.0), log(0.5, 0.5)), torch.tensor(0.75 * math.log(4 / 3)))
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3); not symmetric
    torch.testing.assert_close(kl_divergence(log(0.5, 0.5), log(0.25, 0.75)), torch.tensor(0.5 * math.log(4 / 3)))
    assert kl_divergence(log(0.25, 0.75), log(0.5, 0.5)) != kl_divergence(log(0.5, 0.5), log(0.25, 0.75))
    assert js_divergence(log(0.3, 0.7), log(0.3, 0.7)).abs() < 1e-7


class _Counter:
    """A stub adapter: the next token is always the last one + 1."""

    def logits(self, model, tokens, params=None):
        return torch.nn.functional.one_hot(tokens + 1, 16).float() * 10


def test_greedy_decode_counts_tokens_up_to_eos():
    tokens, mask = greedy_decode(_Counter(), None, torch.tensor([[3], [0]]), max_new_tokens=4, eos=5)
    assert tokens.tolist() == [[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]  # row 0 ends at its EOS
    tokens, mask = greedy_decode(_Counter(), None, torch.tensor([[3], [2]]), max_new_tokens=4, eos=5)
    assert tokens.shape == (2, 4) and mask.tolist() == [[True, True, False], [True, True, True]]  # all done: stop


def test_least_squares_recovers_known_weights_and_keeps_zero_blocks():
    torch.manual_seed(0)
    X = torch.randn(200, 6, dtype=torch.float64)
    W = torch.randn(6, 5, dtype=torch.float64)
    every = torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    got = solve_least_squares(X.T @ X, X.T @ (X @ W), *every, torch.ones(5, dtype=torch.bool),
                              torch.ones(5, dtype=torch.bool), ridge=0.0)  # fmt: skip
    torch.testing.assert_close(got, W, atol=1e-10, rtol=0)
    # inputs [merged, merged, A, A, B, B], outputs [merged, merged, A, B, B]: an A-only output reads no B-only input
    in_a, in_b = torch.tensor([1, 1, 1, 1, 0, 0]).bool(), torch.tensor([1, 1, 0, 0, 1, 1]).bool()
    out_a, out_b = torch.tensor([1, 1, 1, 0, 0]).bool(), torch.tensor([1, 1, 0, 1, 1]).bool()
    allowed = (in_a[:, None] & out_a[None]) | (in_b[:, None] & out_b[None])
    W_ok = W * allowed
    got = solve_least_squares(X.T @ X, X.T @ (X @ W_ok), in_a, in_b, out_a, out_b, ridge=0.0)
    torch.testing.assert_close(got, W_ok, atol=1e-10, rtol=0)
    got = solve_least_squares(X.T @ X, X.T @ (X @ W), in_a, in_b, out_a, out_b, ridge=0.0)  # unreachable target
    assert (got[~allowed] == 0).all() and (got[allowed] != 0).all()


def test_partial_matching_of_a_known_cost():
    # the best assignment: 0 -> 0 (cost 0), 1 -> 2 (-1), 2 -> 1 (-2); with one pair separate, the worst (2, 1)
    cost = torch.tensor([[0.0, -5, -5], [-5, -5, -1], [-5, -2, -5]])
    m = match_units(cost, n_separate=1)
    assert m.perm.tolist() == [0, 2, 1] and m.merged.tolist() == [True, True, False]
    assert m.a_index.tolist() == [0, 1, 2, -1] and m.b_index.tolist() == [0, 2, -1, 1]  # [merged | A | B]
    full = match_units(cost, n_separate=0)
    assert full.a_index.tolist() == [0, 1, 2] and full.b_index.tolist() == [0, 2, 1]


# ------------------------------------------------------------------------------------------ exact permutation


def _permuted(model: MoETransformer, seed: int):
    """B = ``model`` with its units reordered, unit j of B = unit s[j] of A; returns B and every s (written out
    tensor by tensor, independently of the adapter's spec)."""
    g = torch.Generator().manual_seed(seed)
    cfg, sd = model.cfg, {k: v.clone() for k, v in model.state_dict().items()}
    d, H, E, f = cfg.d_model, cfg.n_head, cfg.num_experts, cfg.d_ff
    s_d = torch.randperm(d, generator=g)
    perms = {"res": s_d}
    sd["embed.weight"], sd["head.weight"] = sd["embed.weight"][:, s_d], sd["head.weight"][:, s_d]
    sd["shift.weight"], sd["norm.weight"] = sd["shift.weight"][s_d][:, s_d], sd["norm.weight"][s_d]
    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        s_h, s_e = torch.randperm(H, generator=g), torch.randperm(E, generator=g)
        s_f = torch.stack([torch.randperm(f, generator=g) for _ in range(E)])  # hidden order of B's expert j
        perms |= {f"{b}.heads": s_h, f"{b}.experts": s_e, f"{b}.hidden": s_f}
        for norm in ("norm_attn", "norm_moe"):
            sd[f"{b}.{norm}.weight"] = sd[f"{b}.{norm}.weight"][s_d]
        sd[f"{b}.attn.qkv.weight"] = sd[f"{b}.attn.qkv.weight"].view(3, H, -1, d)[:, s_h][..., s_d].reshape(3 * d, d)
        sd[f"{b}.attn.proj.weight"] = sd[f"{b}.attn.proj.weight"].view(d, H, -1)[s_d][:, s_h].reshape(d, d)
        sd[f"{b}.moe.router.weight"] = sd[f"{b}.moe.router.weight"][s_e][:, s_d]
        sd[f"{b}.moe.router.expert_bias"] = sd[f"{b}.moe.router.expert_bias"][s_e]
        for w in ("w_gate", "w_up"):
            t = sd[f"{b}.moe.experts.{w}"][s_e][:, s_d]
            sd[f"{b}.moe.experts.{w}"] = torch.stack([t[j][:, s_f[j]] for j in range(E)])
        t = sd[f"{b}.moe.experts.w_down"][s_e][..., s_d]
        sd[f"{b}.moe.experts.w_down"] = torch.stack([t[j][s_f[j]] for j in range(E)])
    out = MoETransformer(cfg, model.router_cfg)
    out.load_state_dict(sd)
    return out.eval(), perms


@pytest.mark.parametrize("ratio, d_ff", [(0.0, 32), (0.5, 48)])
def test_pleas_undoes_a_permutation_exactly(trained, splits, ratio, d_ff):
    a = trained["copy0"]
    b, perms = _permuted(a, seed=1)
    adapter = MoEAdapter.of(a)
    data = unlabeled_batches(splits[1], 128)[:3]
    x = data[0]
    close = lambda m: torch.testing.assert_close(adapter.logits(m, x), adapter.logits(a, x), atol=1e-4, rtol=1e-5)  # noqa: E731
    close(adapter.canonical(a))  # gains folded: the same function
    close(b)
    for least_squares in (False, True):
        res = pleas(a, b, data, adapter, ratio=ratio, least_squares=least_squares)
        assert res.model.cfg.d_ff == d_ff
        for i in range(MODEL.n_layer):
            for kind in ("heads", "experts"):
                assert torch.equal(res.matches[f"blocks.{i}.{kind}"].perm, perms[f"blocks.{i}.{kind}"].argsort())
            s_e, s_f = perms[f"blocks.{i}.experts"], perms[f"blocks.{i}.hidden"]
            # A's expert e is B's expert s_e^-1(e), whose hidden unit k is A's unit s_f[s_e^-1(e)][k]
            assert torch.equal(res.matches[f"blocks.{i}.hidden"].perm, s_f[s_e.argsort()].argsort(-1))
        assert torch.equal(res.matches["res"].perm, perms["res"].argsort())
        # separate pairs are two copies of one unit, each w_down row halved: still A's function
        close(res.model)


# ---------------------------------------------------------------------------------------------------- demos


def test_pleas_merges_two_models_from_different_seeds(trained, splits):
    """Naive averaging of two independently trained models fails; PLeaS (permutations + least squares) does not."""
    a, b = trained["copy0"], trained["copy1"]
    adapter = MoEAdapter.of(a)
    train, val = splits
    data = unlabeled_batches(train, 128, task="copy")[:4]
    copy_val = replace(val, **{k: getattr(val, k)[val.task_id == 0] for k in ("tokens", "target_mask", "task_id")})

    def score(model):
        m = task_metrics(model, copy_val)["copy"]
        return m["loss"], m["accuracy"]

    average = adapter.build({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
    rows = {"A (seed 0)": score(a), "B (seed 1)": score(b), "weight average": score(average)}
    for ratio in (0.0, 0.5, 1.0):
        for least_squares in (False, True):
            res = pleas(a, b, data, adapter, ratio=ratio, least_squares=least_squares)
            rows[f"pleas ratio={ratio} d_ff={res.model.cfg.d_ff} ls={least_squares}"] = score(res.model)
    for ridge in (0.0, 1e-3, 1e-1):  # the default 1e-2 is above; 0: plain least squares
        rows[f"pleas ratio=0.5 ridge={ridge:g}"] = score(pleas(a, b, data, adapter, ratio=0.5, ridge=ridge).model)
    for name, (loss, acc) in rows.items():
        print(f"pleas-demo {name:38s} copy loss {loss:.3f} exact match {acc:.3f}")
    loss, acc = rows["pleas ratio=0.5 d_ff=48 ls=True"]
    assert rows["weight average"][0] > 2.0 and rows["weight average"][1] < 0.05
    assert loss < 0.1 * rows["weight average"][0] and acc > 0.5


def test_divmerge_beats_task_arithmetic_at_every_lambda(trained, splits):
    """DivMerge's JS objective at its coefficients vs task arithmetic's (every coefficient = lambda) on a grid.

    The prompts come from the training split (unlabeled: cut at SEP); accuracies are on the validation split."""
    train, val = splits
    tasks, fts = ("sort", "lookup"), [trained["sort"], trained["lookup"]]
    prompts = [unlabeled_batches(train, 32, prompts=True, task=t)[:13] for t in tasks]  # 416 per task (paper: 400)
    adapter = MoEAdapter.of(trained["copy0"])
    new = [8, 1]  # each task's answer length (our data has no EOS)
    ll = divmerge(trained["copy0"], fts, prompts, adapter, max_new_tokens=new)
    tl = divmerge(trained["copy0"], fts, prompts, adapter, granularity="task", max_new_tokens=new)
    assert ll.coefficients.shape == (2, len(ll.layers)) == (2, 20)  # one per task and parameter tensor
    J = ll.objective
    ta = {lam: J.evaluate(torch.full(J.shape, lam)) for lam in (0.1, 0.3, 0.5, 0.7, 1.0, 1.3)}
    best = min(ta, key=ta.get)

    def accuracy(model):
        return ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in task_metrics(model, val).items())

    def js(gamma):
        return J.evaluate(gamma), "/".join(f"{j:.3f}" for j in J.per_task(gamma))

    ta_model = lambda lam: adapter.build({**trained["copy0"].state_dict(), **J.params(torch.full(J.shape, lam))})  # noqa: E731
    rows = [(f"fine-tune {t}", None, accuracy(m)) for t, m in zip(tasks, fts)]
    rows += [(f"task arithmetic lam={lam:.1f}", js(torch.full(J.shape, lam)),
              accuracy(ta_model(lam)) if lam in (1.0, best) else "") for lam in ta]  # fmt: skip
    rows += [(f"DivMerge TL {[round(c, 2) for c in tl.coefficients.flatten().tolist()]}",
              js(tl.coefficients.expand(J.shape)), accuracy(tl.model)),
             ("DivMerge LL", js(ll.coefficients), accuracy(ll.model))]  # fmt: skip
    print(f"divmerge-demo {'':38s} JS (sort/lookup)  exact match")
    for label, j, acc in rows:
        cell = "-" if j is None else f"{j[0]:.4f} ({j[1]})"
        print(f"divmerge-demo {label:38s} {cell:20s} {acc}")
    j_ll, j_tl = rows[-1][1][0], rows[-2][1][0]
    assert j_ll < ta[best] and j_ll < 0.8 * ta[0.1] and j_ll < ta[1.3]
    assert j_tl <= ta[best] + 0.01  # TL contains every lambda
    assert j_ll < J.evaluate(torch.full(J.shape, 0.5))  # better than where it started (1/T)


# ------------------------------------------------------------------------------------------------- contracts


def test_parameters_are_checked_by_name():
    torch.manual_seed(0)
    small = replace(MODEL, d_model=16, d_ff=8)
    a, b = MoETransformer(small, ROUTER).eval(), MoETransformer(small, ROUTER).eval()
    adapter, data = MoEAdapter.of(a), [torch.randint(0, MODEL.vocab_size, (4, 12))]
    assert isinstance(data, UnlabeledData)
    for ratio, match in [(1.5, "ratio"), ({"res": 0.5}, "cannot widen"), ({"nope": 0.5}, "unknown groups")]:
        with pytest.raises(ValueError, match=match):
            pleas(a, b, data, adapter, ratio=ratio)
    with pytest.raises(ValueError, match="no batches"):
        pleas(a, b, [], adapter)
    with pytest.raises(ValueError, match="ridge"):
        pleas(a, b, data, adapter, ridge=-1.0)
    shared = MoETransformer(replace(small, moe=MoEConfig(n_shared=1)), ROUTER).eval()
    with pytest.raises(ValueError, match="model.moe"):
        pleas(shared, shared, data, MoEAdapter.of(shared))
    for kwargs, match in [({"granularity": "block"}, "granularity"), ({"divergence": "tv"}, "divergence"),
                          ({"lr": 0.0}, "lr"), ({"max_new_tokens": 0}, "max_new_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            divmerge(a, [b], [data], adapter, **kwargs)
    with pytest.raises(ValueError, match="data"):
        divmerge(a, [b, b], [data], adapter)


def test_the_methods_import_nothing_from_moe():
    code = "import sys, merging.divmerge, merging.pleas, merging.protocols\n"
    code += "print([m for m in sys.modules if m.split('.')[0] == 'moe'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
