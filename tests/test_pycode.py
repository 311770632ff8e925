"""The stdlib byte-level LM data (moe/data/pycode.py): split by path, whole-file hold-out, determinism, domains,
window format, token classes and bits per byte.

Most tests run on a fake stdlib tree in which every file is one repeated byte of its own, so each byte of a
window names the file it came from.
"""

import math
import random
import re

import pytest
import torch
from omegaconf import OmegaConf

from moe.data.pycode import (
    BOS,
    CLASS_NAMES,
    DOMAINS,
    EpochSampler,
    PyCodeConfig,
    PyCodeDataModule,
    TrainWindows,
    bits_per_byte,
    evaluate_bits_per_byte,
    list_files,
    split_files,
    stdlib_root,
    token_classes,
)

from .conftest import CONF

# path -> size in bytes; each file is filled with one byte value of its own
FAKE = {
    "json/__init__.py": 120,
    "json/decoder.py": 300,
    "json/encoder.py": 260,
    "json/scanner.py": 90,
    "json/tool.py": 70,
    "email/__init__.py": 40,
    "email/message.py": 500,
    "email/parser.py": 150,
    "email/mime/base.py": 60,
    "email/mime/text.py": 80,
    "asyncio/events.py": 400,
    "asyncio/tasks.py": 350,
    "xml/dom/minidom.py": 100,  # a domain with one unit: all of it trains
    "collections/__init__.py": 300,  # a package in "other": held out whole or not at all
    "collections/abc.py": 50,
    "re/__init__.py": 200,
    "re/_parser.py": 250,
    "argparse.py": 400,
    "abc.py": 100,
    "string.py": 120,
    "typing.py": 600,
    "os.py": 350,
}
EXCLUDED = ["email/test/test_email.py", "test/test_os.py", "site-packages/pkg/mod.py", "__pycache__/x.py"]
# Pinned: the split must not change between runs, interpreters or machines (Python's salted hash() would).
FAKE_VAL = [
    "asyncio/tasks.py",
    "email/__init__.py",
    "email/parser.py",
    "json/__init__.py",
    "json/scanner.py",
    "typing.py",
]
SEQ = 16


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    byte_of = {}
    for i, path in enumerate(sorted([*FAKE, *EXCLUDED])):
        byte_of[path] = ord("A") + i
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(bytes([byte_of[path]]) * FAKE.get(path, 100))
    (root / "notes.txt").write_bytes(b"not python")
    (root / "nul.py").write_bytes(b"z\0z")  # NUL cannot be in Python source: skipped when read
    return root, {v: k for k, v in byte_of.items()}


def fake_cfg(root, **kw) -> PyCodeConfig:
    base = dict(root=str(root), val_fraction=0.25, seq_len=SEQ, batch_size=8, train_windows=64)
    return PyCodeConfig(**{**base, **kw})


def fake_dm(root, **kw) -> PyCodeDataModule:
    dm = PyCodeDataModule(fake_cfg(root, **kw))
    dm.setup()
    return dm


def sources(row: torch.Tensor, file_of: dict[int, str]) -> set[str]:
    return {file_of[b] for b in row.tolist() if b != BOS}


def batches(dm: PyCodeDataModule, epoch: int) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ---------------------------------------------------------------------------------------------------------------
# Listing and split
# ---------------------------------------------------------------------------------------------------------------


def test_listing_skips_excluded_directories_and_non_python(fake_root):
    root, _ = fake_root
    files = list_files(root, PyCodeConfig().exclude)
    assert [f.path for f in files] == sorted([*FAKE, "nul.py"])
    domain = {f.path: f.domain for f in files}
    assert domain["json/tool.py"] == "json" and domain["email/mime/text.py"] == "email"
    assert domain["collections/abc.py"] == domain["re/_parser.py"] == domain["os.py"] == "other"


def test_split_holds_out_whole_modules_and_is_pinned(fake_root):
    root, _ = fake_root
    files = list_files(root, PyCodeConfig().exclude)
    train, val = split_files(files, val_fraction=0.25)
    assert [f.path for f in val] == FAKE_VAL
    assert {f.path for f in train}.isdisjoint(f.path for f in val)
    assert len(train) + len(val) == len(files)
    # a package in "other" goes one way whole
    val_paths = {f.path for f in val}
    for pkg in ("collections", "re"):
        assert len({f.path in val_paths for f in files if f.path.startswith(pkg + "/")}) == 1
    _, val3 = split_files(files, val_fraction=0.25, salt=3)
    other = ["collections/__init__.py", "collections/abc.py", "re/__init__.py", "re/_parser.py"]
    assert [f.path for f in val3 if f.domain == "other"] == other  # both packages held out, every file of them
    # every domain with two or more units gets both sides; a one-unit domain trains on all of it
    for domain in ("json", "email", "asyncio", "other"):
        assert any(f.domain == domain for f in val) and any(f.domain == domain for f in train)
    assert not any(f.domain == "xml" for f in val)


def test_split_ignores_listing_order_and_follows_split_seed(fake_root):
    root, _ = fake_root
    files = list_files(root, PyCodeConfig().exclude)
    ref = split_files(files, 0.25)
    for _ in range(3):
        shuffled = files[:]
        random.Random(_).shuffle(shuffled)
        assert split_files(shuffled, 0.25) == ref
    assert split_files(files, 0.25, salt=1) != ref


def test_real_stdlib_split_is_stable_and_disjoint():
    files = list_files(stdlib_root(), PyCodeConfig().exclude)
    train, val = split_files(files, 0.1)
    shuffled = files[::-1]
    assert split_files(shuffled, 0.1) == (train, val)
    assert {f.path for f in train}.isdisjoint(f.path for f in val)
    assert {f.unit for f in train}.isdisjoint(f.unit for f in val)  # whole modules: e.g. all of logging/ or none
    assert not any("/test/" in f"/{f.path}" or f.path.startswith("site-packages") for f in files)
    present = {f.domain for f in files}
    assert {f.domain for f in val} == present  # every domain found has validation text
    val_share = sum(f.size for f in val) / sum(f.size for f in files)
    assert 0.05 < val_share < 0.2


# ---------------------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------------------


def test_training_never_sees_a_validation_byte(fake_root):
    root, file_of = fake_root
    dm = fake_dm(root)
    val_files = {f.path for f in dm.val_files}
    assert sorted(val_files) == FAKE_VAL
    assert set(dm.train_corpus.files).isdisjoint(val_files)
    assert "nul.py" not in dm.train_corpus.files
    seen = set()
    for epoch in range(3):
        for batch in batches(dm, epoch):
            for row, task in zip(batch["tokens"], batch["task_id"].tolist()):
                src = sources(row, file_of)
                seen |= src
                assert src.isdisjoint(val_files)
                assert src <= set(dm.train_corpus.files)
                assert {DOMAINS.index(next(f.domain for f in dm.train_files if f.path == s)) for s in src} == {task}
    assert len(seen) > 8  # the sampler covers the corpus, not one corner of it
    for row, task in zip(dm.val_split.tokens, dm.val_split.task_id.tolist()):
        src = sources(row, file_of)
        assert src and src <= val_files
        assert {DOMAINS.index(next(f.domain for f in dm.val_files if f.path == s)) for s in src} == {task}


def test_windows_format_and_range(fake_root):
    root, _ = fake_root
    dm = fake_dm(root)
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == batch["target_mask"].shape == (8, SEQ + 1)
    assert batch["tokens"].dtype == batch["task_id"].dtype == torch.int64 and batch["target_mask"].dtype == torch.bool
    assert dm.vocab.size == dm.vocab_size == 257 and dm.seq_len == SEQ
    for split in (batch, {"tokens": dm.val_split.tokens, "target_mask": dm.val_split.target_mask}):
        tok, mask = split["tokens"], split["target_mask"]
        assert tok.min() >= 0 and tok.max() <= BOS
        expected = tok != BOS
        expected[:, 0] = False
        assert torch.equal(mask, expected)  # every byte target is scored; BOS and the first position never
    # every window of the training corpus, exhaustively: inside one segment, from its start to its end
    ds = TrainWindows(dm.train_corpus, SEQ)
    corpus = dm.train_corpus
    seg_len = corpus.seg_end - corpus.seg_start
    assert len(ds) == int((seg_len - SEQ).clamp_min(0).sum())
    every = ds.__getitems__(list(range(len(ds))))
    firsts = torch.cat([torch.zeros(1, dtype=torch.int64), ds.cum[:-1]])
    assert (every["tokens"][firsts, 0] == BOS).all()  # a segment starts with its first file's BOS
    last = every["tokens"][ds.cum - 1, -1]
    assert torch.equal(last, corpus.data[corpus.seg_end - 1].long())
    assert torch.equal(every["task_id"][firsts], corpus.seg_domain)


def test_short_validation_segments_are_padded_with_unscored_bos(fake_root):
    root, _ = fake_root
    dm = fake_dm(root, seq_len=1024)  # longer than any domain's validation text
    by_domain = {}
    for f in dm.val_files:
        by_domain[DOMAINS.index(f.domain)] = by_domain.get(DOMAINS.index(f.domain), 0) + f.size
    assert sorted(dm.val_split.task_id.tolist()) == sorted(by_domain)  # one padded window per domain
    for tok, mask, d in zip(dm.val_split.tokens, dm.val_split.target_mask, dm.val_split.task_id.tolist()):
        assert int(mask.sum()) == by_domain[d]  # exactly the domain's validation bytes are scored
        assert tok[-1] == BOS and not mask[-1]


def test_batches_are_deterministic_per_epoch(fake_root):
    root, _ = fake_root
    a, b = fake_dm(root), fake_dm(root)
    for epoch in (0, 1):
        for x, y in zip(batches(a, epoch), batches(b, epoch), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(getattr(a.val_split, k), getattr(b.val_split, k)) for k in ("tokens", "task_id"))
    # epoch e depends on (seed, e) only: not on the epochs before it
    e0, e1 = batches(a, 0), batches(a, 1)
    assert not torch.equal(e0[0]["tokens"], e1[0]["tokens"])
    fresh = fake_dm(root)
    assert torch.equal(batches(fresh, 1)[0]["tokens"], e1[0]["tokens"])
    assert not torch.equal(batches(fake_dm(root, seed=7), 0)[0]["tokens"], e0[0]["tokens"])
    assert len(EpochSampler(100, 64, 0)) == 64


def test_real_stdlib_datamodule_is_deterministic():
    cfg = PyCodeConfig(batch_size=4, train_windows=8, val_windows_per_domain=2)
    a, b = PyCodeDataModule(cfg), PyCodeDataModule(cfg)
    a.setup()
    b.setup()
    for x, y in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a.val_split.tokens, b.val_split.tokens)
    present = {DOMAINS.index(f.domain) for f in a.val_files}
    assert set(a.val_split.task_id.tolist()) == present
    assert 1_000_000 < a.train_corpus.data.numel() < 50_000_000


def test_domain_restriction(fake_root):
    root, file_of = fake_root
    dm = fake_dm(root, domains=["json", "asyncio"], eval_domains=["email"])
    allowed = {DOMAINS.index("json"), DOMAINS.index("asyncio")}
    assert {f.split("/")[0] for f in dm.train_corpus.files} == {"json", "asyncio"}
    tasks = torch.cat([b["task_id"] for b in batches(dm, 0)])
    assert set(tasks.tolist()) == allowed
    assert set(dm.val_split.task_id.tolist()) == {DOMAINS.index("email")}
    assert dm.eval_tasks == ["email"]
    # the split itself does not depend on the selection
    assert [f.path for f in dm.val_files] == FAKE_VAL
    with pytest.raises(ValueError, match="data.pycode.domains: unknown domain 'jsn'"):
        PyCodeDataModule(fake_cfg(root, domains=["jsn"]))
    with pytest.raises(ValueError, match="data.pycode.eval_domains"):
        PyCodeDataModule(fake_cfg(root, eval_domains=[]))


# ---------------------------------------------------------------------------------------------------------------
# Token classes, bits per byte, config
# ---------------------------------------------------------------------------------------------------------------

CODE = {c[0].upper(): i for i, c in enumerate(CLASS_NAMES)}  # L D W P K O


def classes_of(text: str) -> list[int]:
    return [CODE[c] for c in text.replace(" ", "")]


def test_token_classes_on_a_hand_made_string():
    src = b"if x1==0:\n\treturn None  # elif_ \xc3\xa9 def9 \xc3if classy\x00def"
    expected = (
        "KK W LD PP D P W W KKKKKK W KKKK W W P W LLLLP W O O W LLLD W O L L W LLLLLL O KKK"  # one letter per byte
    )
    got = token_classes(torch.tensor(list(src)))
    assert got.tolist() == classes_of(expected)
    assert got.dtype == torch.int64
    # BOS is "other" and ends a word; words never run across rows; any leading shape is kept
    rows = torch.tensor([[BOS, *b"def", BOS, *b"i"], [*b"f", BOS, *b"not", BOS]])
    assert token_classes(rows).tolist() == [classes_of("O KKK O L"), classes_of("L O KKK O")]
    assert token_classes(rows[None].expand(3, 2, 6)).shape == (3, 2, 6)


def reference_classes(row: list[int]) -> list[int]:
    """Byte by byte, with a regex for the words (slow; the oracle)."""
    data = bytes(0 if t == BOS else t for t in row)
    out = []
    for b in data:
        c = chr(b)
        if b < 128 and c.isalpha():
            out.append(CODE["L"])
        elif b < 128 and c.isdigit():
            out.append(CODE["D"])
        elif c in " \t\n\r\x0b\x0c":
            out.append(CODE["W"])
        elif b < 128 and c.isprintable() and not c.isalnum():
            out.append(CODE["P"])
        else:
            out.append(CODE["O"])
    import keyword

    for m in re.finditer(rb"[A-Za-z0-9_\x80-\xff]+", data):
        if m.group().decode("latin-1") in keyword.kwlist:
            out[m.start() : m.end()] = [CODE["K"]] * (m.end() - m.start())
    return out


def test_token_classes_match_a_regex_reference_on_real_code():
    dm = PyCodeDataModule(PyCodeConfig(val_windows_per_domain=4))
    dm.setup()
    tokens = dm.val_split.tokens
    got = token_classes(tokens)
    for row, cls in zip(tokens.tolist(), got.tolist()):
        assert cls == reference_classes(row)
    share = torch.bincount(got.flatten(), minlength=len(CLASS_NAMES)).float() / got.numel()
    assert (share > 0).all() and share[CLASS_NAMES.index("keyword")] > 0.02  # every class occurs in real code


class Uniform(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, BOS + 1) + self.p, []


def test_bits_per_byte(fake_root):
    assert bits_per_byte(3 * math.log(2)) == pytest.approx(3.0)
    assert bits_per_byte(torch.tensor(math.log(2))) == pytest.approx(1.0)
    dm = fake_dm(root=fake_root[0])
    bpb = evaluate_bits_per_byte(Uniform(), dm.val_split, batch_size=5)
    assert set(bpb) == {DOMAINS[d] for d in dm.val_split.task_id.tolist()} | {"all"}
    assert all(v == pytest.approx(math.log2(257)) for v in bpb.values())


def test_yaml_mirrors_the_config():
    node = OmegaConf.load(CONF / "data" / "pycode.yaml")
    assert node._target_ == "moe.data.pycode.PyCodeDataModule"
    merged = OmegaConf.merge(OmegaConf.structured(PyCodeConfig), node.pycode)
    assert OmegaConf.to_object(merged) == PyCodeConfig()
    assert set(node.pycode) == set(OmegaConf.structured(PyCodeConfig))
