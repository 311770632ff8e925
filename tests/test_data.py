"""The embedded dataset: task semantics, determinism, target masks and split disjointness."""

import numpy as np
import pytest
import torch

from moe.config import DataConfig
from moe.data.tasks import ALL_TASKS, DIGIT_BASE, PAD, QUERY, SEP, SYMBOL_BASE, Vocab, build_splits

CFG = DataConfig(train_per_task=300, val_per_task=50)


def decode(row: torch.Tensor, mask: torch.Tensor):
    sep = (row == SEP).nonzero()[0, 0].item()
    return row[1:sep].tolist(), row[mask].tolist()


def digits_value(tokens):
    return sum((t - DIGIT_BASE) * 10**i for i, t in enumerate(tokens))


@pytest.fixture(scope="module")
def splits():
    return build_splits(CFG)


def test_every_task_follows_its_rule(splits):
    train, _ = splits
    vocab = Vocab(CFG.num_symbols)
    seen, counts = set(), []
    for row, mask, task_id in zip(train.tokens, train.target_mask, train.task_id):
        task = ALL_TASKS[task_id]
        seen.add(task)
        assert row[0].item() == vocab.task_token(task)
        inp, tgt = decode(row, mask)
        if task == "copy":
            assert tgt == inp
        elif task == "reverse":
            assert tgt == inp[::-1]
        elif task == "sort":
            assert tgt == sorted(inp)
        elif task == "add":
            d = CFG.add_digits
            assert digits_value(tgt) == digits_value(inp[:d]) + digits_value(inp[d + 1 :])
            assert len(tgt) == d + 1
        elif task == "lookup":
            pairs = dict(zip(inp[0:-2:2], inp[1:-2:2]))
            assert len(pairs) == CFG.lookup_pairs  # distinct keys
            assert tgt == [pairs[inp[-1]]]
        elif task == "count":
            assert inp[-2] == QUERY
            assert tgt == [DIGIT_BASE + inp[:-2].count(inp[-1])]
            counts.append(tgt[0] - DIGIT_BASE)
        # loss/accuracy positions: the target, nothing else; padding only after it
        assert mask.sum() == len(tgt)
        end = mask.nonzero()[-1, 0].item()
        assert (row[end + 1 :] == PAD).all()
    assert seen == set(ALL_TASKS)
    # count targets spread over 1..seq_symbols, so a constant guess cannot score well
    assert set(counts) == set(range(1, CFG.seq_symbols + 1))
    assert max(np.bincount(counts)) / len(counts) < 0.25


def test_deterministic_and_val_disjoint_from_train(splits):
    train, val = splits
    again_train, again_val = build_splits(CFG)
    assert torch.equal(train.tokens, again_train.tokens) and torch.equal(val.tokens, again_val.tokens)
    train_rows = {r.numpy().tobytes() for r in train.tokens}
    assert not any(r.numpy().tobytes() in train_rows for r in val.tokens)
    other = build_splits(DataConfig(train_per_task=300, val_per_task=50, seed=CFG.seed + 1))[0]
    assert not torch.equal(train.tokens, other.tokens)


def test_task_subset_keeps_each_task_stream_and_evaluates_all():
    sub_train, sub_val = build_splits(DataConfig(tasks=["sort"], train_per_task=300, val_per_task=50))
    full_train, full_val = build_splits(CFG)
    sort_id = ALL_TASKS.index("sort")
    assert (sub_train.task_id == sort_id).all()
    assert torch.equal(sub_train.tokens, full_train.tokens[full_train.task_id == sort_id])
    assert torch.equal(sub_val.tokens, full_val.tokens)


def test_minimum_difficulty_holds_by_default():
    cfg = DataConfig()
    assert cfg.seq_symbols >= 6 and cfg.add_digits >= 3 and cfg.lookup_pairs >= 3 and len(cfg.tasks) >= 6
    assert np.unique(build_splits(DataConfig(train_per_task=10, val_per_task=10))[0].tokens[:, 1:]).max() >= SYMBOL_BASE


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"tasks": ["copy", "nope"]}, "data.tasks"),
        ({"tasks": []}, "data.tasks"),
        ({"seq_symbols": 12}, "data.seq_symbols"),
        ({"lookup_pairs": 40}, "data.lookup_pairs"),
        ({"eval_tasks": ["x"]}, "data.eval_tasks"),
    ],
)
def test_bad_data_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        build_splits(DataConfig(**kw))
