"""``data=text`` (moe/data/text.py, corpus.py, windows.py): every file format, groups, the document split, bytes
per token, bits per byte, the token cache, bad input, and ``data=pycode`` as the same pipeline.

Corpora are written into tmp_path; the Hugging Face tokenizer is a tiny byte-level BPE trained here on the test
text (``tokenizers``), wrapped in ``transformers.PreTrainedTokenizerFast``.
"""

import json
import math
import os
import random
import socket

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moe.config import DataConfig, PyCodeConfig, TextConfig
from moe.data import Evaluation, Metrics, TrainData, build_datamodule
from moe.data.corpus import ByteTokenizer, HFTokenizer, expand, file_groups, token_bytes, tokenize_files
from moe.data.pycode import DOMAINS, PyCodeDataModule
from moe.data.text import TextDataModule
from moe.data.windows import BOS, TokenVocab

from .conftest import CONF

WORDS = ["héllo", "wörld", "the", "cat", "sat", "日本語", "🎉", "naïve", "code", "data", "x=1;", "<eos>"]


def prose(seed: int, n: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n)) + "\n"


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([prose(s, 200) for s in range(5)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def write_corpus(root, n_docs=12, seed=0) -> dict[str, str]:
    """Group "prose" (.txt and .md, a file each) and group "lines" (.jsonl, a document per line, in capitals):
    document name -> text."""
    (root / "prose").mkdir(parents=True)
    (root / "lines").mkdir()
    out = {}
    for i in range(n_docs):
        path = root / "prose" / f"doc{i:02d}.{'txt' if i % 2 else 'md'}"
        path.write_text(prose(seed * 100 + i, 60 + 10 * i), encoding="utf-8")
        out[str(path)] = path.read_text(encoding="utf-8")
    for j in range(2):
        lines = [prose(seed * 100 + 50 + 10 * j + k, 40 + 5 * k).upper() for k in range(n_docs)]
        path = root / "lines" / f"part{j}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(lines)), encoding="utf-8")
        out.update({f"{path}#{k}": t for k, t in enumerate(lines)})
    return out


def text_cfg(root, **kw) -> TextConfig:
    base = dict(files={"prose": [f"{root}/prose/*.txt", f"{root}/prose/*.md"], "lines": f"{root}/lines/*.jsonl"},
                tokenizer="bytes", val_fraction=0.25, seq_len=32, batch_size=4, train_windows=32,
                val_windows_per_group=4, cache_dir=str(root / "cache"))  # fmt: skip
    return TextConfig(**{**base, **kw})


def text_dm(root, model_tokenizer=None, **kw) -> TextDataModule:
    dm = TextDataModule(text_cfg(root, **kw), model_tokenizer)
    dm.setup("fit")
    return dm


class Uniform(torch.nn.Module):
    """Logits all zero over ``vocab`` ids: nll = ln(vocab) at every position."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.p = vocab, torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab) + self.p, []


def decoded(tok, i: int) -> str:
    return bytes(tok.ids[tok.offsets[i] : tok.offsets[i + 1]].tolist()).decode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def test_every_format_is_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "c").mkdir()
    texts = {"a.txt": "plain text\nline two é\n", "b.md": "# Title\n\n*mark* down 日本\n", "c/d.py": "x = 1\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "e.jsonl").write_text('{"body": "first"}\n\n{"body": "sécond", "n": 2}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["row 0", "row 1 🎉"], "n": [0, 1]}), tmp_path / "f.parquet")
    (tmp_path / "g.jsonl").write_text("\n", encoding="utf-8")  # no document
    groups = expand(file_groups([f"{tmp_path}/*.*", f"{tmp_path}/c/*.py"]))
    assert list(groups) == ["all"] and [p.name for p in groups["all"]] == ["a.txt", "b.md", "d.py", "e.jsonl",
                                                                             "f.parquet", "g.jsonl"]  # fmt: skip
    tok = tokenize_files(groups, ByteTokenizer(), "body", tmp_path / "cache")
    got = [decoded(tok, i) for i in range(len(tok.size))]
    assert got == [*texts.values(), "first", "sécond", "row 0", "row 1 🎉"]  # blank lines are no documents
    assert tok.size.tolist() == [len(t.encode()) for t in got]
    assert tok.file.tolist() == [0, 1, 2, 3, 3, 4, 4] and tok.nbytes is None


def test_groups_windows_and_val_bpb_per_group(tmp_path):
    write_corpus(tmp_path)
    dm = text_dm(tmp_path)
    assert isinstance(dm, TrainData) and dm.objective == "lm" and dm.task_names == ["prose", "lines"]
    assert dm.eval_tasks == ["prose", "lines"] and dm.train_tasks is None and dm.vocab.size == 257 and dm.seq_len == 32
    batch = next(iter(dm.train_dataloader()))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((4, 33), torch.int64), "target_mask": ((4, 33), torch.bool), "task_id": ((4,), torch.int64),
        "target_bytes": ((4, 33), torch.int32)}  # fmt: skip
    expected = batch["tokens"] != BOS
    expected[:, 0] = False
    assert torch.equal(batch["target_mask"], expected) and torch.equal(batch["target_bytes"], expected.int())
    # a window never crosses groups: "prose" is in small letters, "lines" in capitals
    rows = torch.cat([b["tokens"] for b in dm.train_dataloader()])
    task = torch.cat([b["task_id"] for b in dm.train_dataloader()])
    upper = ((rows >= ord("A")) & (rows <= ord("Z"))).any(1)
    lower = ((rows >= ord("a")) & (rows <= ord("z"))).any(1)
    assert set(task.tolist()) == {0, 1} and not (lower & upper).any() and torch.equal(upper, task == 1)
    assert set(dm.val_split.task_id.tolist()) == {0, 1}
    metrics = dm.metrics()
    assert isinstance(metrics, Metrics)
    for b in dm.val_dataloader():
        nll = F.cross_entropy(torch.zeros(*b["tokens"][:, 1:].shape, 257).transpose(1, 2), b["tokens"][:, 1:],
                              reduction="none") * b["target_mask"][:, 1:]  # fmt: skip
        metrics.update(b, nll, None)
    values = metrics.compute()
    assert set(values) == {"val/bpb", "val/bpb/prose", "val/bpb/lines", "val/loss"}
    assert all(float(v) == pytest.approx(math.log2(257)) for k, v in values.items() if k != "val/loss")
    assert float(values["val/loss"]) == pytest.approx(math.log(257))
    metrics.reset()
    assert metrics.compute() == {}


def test_bpb_sums_over_bytes_not_a_mean_of_windows():
    from moe.data.text import BitsPerByte

    tokens = torch.ones(2, 4, dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    nbytes = torch.tensor([[0, 1, 2, 3], [0, 4, 0, 0]], dtype=torch.int32)
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]) * mask[:, 1:]  # 9s are unscored
    batch = {"tokens": tokens, "target_mask": mask, "target_bytes": nbytes, "task_id": torch.tensor([0, 1])}
    m = BitsPerByte(["a", "b"])
    m.update(batch, nll, None)
    v = m.compute()
    ln2 = math.log(2)
    assert float(v["val/bpb"]) == pytest.approx(10 / ln2 / 10)  # (1 + 2 + 3 + 4) nats over 6 + 4 bytes
    assert float(v["val/bpb/a"]) == pytest.approx(6 / ln2 / 6) and float(v["val/bpb/b"]) == pytest.approx(4 / ln2 / 4)
    assert float(v["val/loss"]) == pytest.approx(10 / 4)
    assert float(m.train_values(batch, nll, None)["train/bpb"]) == pytest.approx(10 / ln2 / 10)


# ---------------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------------


def test_split_is_by_document_deterministic_and_ignores_listing_order(tmp_path):
    texts = write_corpus(tmp_path / "one")
    dm = text_dm(tmp_path / "one", tune_fraction=0.2)
    for name in dm.task_names:
        train, val, tune = (set(d[name]) for d in (dm.train_docs, dm.val_docs, dm.tune_docs))
        assert val and train and tune and not (train & val) and not (train & tune) and not (val & tune)
        assert len(train | val | tune) == sum(k.startswith(str(tmp_path / "one" / name)) for k in texts)
        share = sum(len(texts[d].encode()) for d in val) / sum(len(texts[d].encode()) for d in train | val | tune)
        assert 0.1 < share < 0.4
    # the globs in another order, the same files moved elsewhere: the same held-out text
    files = {"lines": [f"{tmp_path}/one/lines/part1.jsonl", f"{tmp_path}/one/lines/part0.jsonl"],
             "prose": [f"{tmp_path}/one/prose/*.md", f"{tmp_path}/one/prose/*.txt"]}  # fmt: skip
    again = text_dm(tmp_path / "one", files=files, tune_fraction=0.2)
    assert again.val_docs == {k: dm.val_docs[k] for k in again.task_names}
    os.rename(tmp_path / "one", tmp_path / "two")
    moved = text_dm(tmp_path / "two", tune_fraction=0.2)
    assert torch.equal(moved.val_split.tokens, dm.val_split.tokens)
    assert torch.equal(moved.tune_split.tokens, dm.tune_split.tokens)
    assert text_dm(tmp_path / "two", split_seed=5).val_docs != moved.val_docs
    for epoch in (0, 1):  # training windows: a pure function of (seed, epoch)
        a, b = moved.train_dataloader(), text_dm(tmp_path / "two", tune_fraction=0.2).train_dataloader()
        a.sampler.set_epoch(epoch)
        b.sampler.set_epoch(epoch)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_identical_documents_are_never_on_both_sides(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(10):
        (tmp_path / "d" / f"{i}.txt").write_text(prose(i % 3, 50), encoding="utf-8")  # three texts, repeated
    dm = text_dm(tmp_path, files=[f"{tmp_path}/d/*.txt"], val_fraction=0.3)
    text = {name: open(name, encoding="utf-8").read() for name in dm.train_docs["all"] + dm.val_docs["all"]}
    assert not {text[n] for n in dm.train_docs["all"]} & {text[n] for n in dm.val_docs["all"]}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, bytes per token, bits per byte
# ---------------------------------------------------------------------------------------------------------------


def test_token_bytes_by_hand():
    # chars: a (1 byte) é (2) 日 (3) 🎉 (4); token 1 overlaps token 0; a gap leaves 日 uncovered
    assert token_bytes("aé日🎉", [(0, 2), (1, 2), (3, 4)]).tolist() == [3, 0, 4]
    assert token_bytes("aé日🎉", [(0, 1), (0, 3), (3, 4)]).tolist() == [1, 5, 4]
    assert token_bytes("", []).tolist() == []


def test_bytes_per_token_sum_to_the_documents_utf8_bytes(tmp_path, hf_tokenizer):
    texts = write_corpus(tmp_path)
    tok = HFTokenizer(hf_tokenizer, "test")
    groups = expand(file_groups(text_cfg(tmp_path).files))
    t = tokenize_files(groups, tok, "text", tmp_path / "cache")
    assert len(t.size) == len(texts) and t.nbytes is not None
    for i, text in enumerate(texts.values()):  # (write_corpus's order is path order, as the groups are)
        a, b = t.offsets[i], t.offsets[i + 1]
        assert t.ids[a:b].tolist() == hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"]  # fmt: skip
        assert int(t.nbytes[a:b].sum()) == len(text.encode("utf-8")) == t.size[i]
    assert hf_tokenizer.eos_token_id not in t.ids.tolist()  # "<eos>" in the text is text, not the separator


def test_bpb_of_a_uniform_model_by_hand(tmp_path, hf_tokenizer):
    texts = write_corpus(tmp_path)
    dm = text_dm(tmp_path, hf_tokenizer, tokenizer="auto", seq_len=1024, val_fraction=0.1)
    assert dm.val_split.tokens.shape[0] == 2  # each group's validation text fits one (padded) window: all scored
    V = dm.vocab.size
    assert V == len(hf_tokenizer) and isinstance(dm.vocab, TokenVocab)
    ev = dm.evaluate(Uniform(V))
    assert isinstance(ev, Evaluation) and set(ev.results) == {"bpb", "bits_per_byte"} and ev.column == "bits/byte"
    n_tokens = n_bytes = 0
    for name in dm.task_names:
        docs = [texts[d] for d in dm.val_docs[name]]
        g_tokens = sum(len(hf_tokenizer(d, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                       for d in docs)  # fmt: skip
        g_bytes = sum(len(d.encode("utf-8")) for d in docs)
        assert ev.results["bits_per_byte"][name] == pytest.approx(g_tokens * math.log(V) / math.log(2) / g_bytes)
        assert ev.metrics[f"final/bpb/{name}"] == ev.table[name] == ev.results["bits_per_byte"][name]
        n_tokens, n_bytes = n_tokens + g_tokens, n_bytes + g_bytes
    assert ev.results["bpb"] == ev.metrics["final/bpb"] == pytest.approx(n_tokens * math.log2(V) / n_bytes)
    assert (dm.val_split.tokens[dm.val_split.target_mask] != hf_tokenizer.eos_token_id).all()


def test_tokenizer_directory_and_model_tokenizer_agree(tmp_path, hf_tokenizer):
    write_corpus(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    a = text_dm(tmp_path, tokenizer=str(tmp_path / "tok"))
    b = build_datamodule(DataConfig(_target_="moe.data.text.TextDataModule", text=text_cfg(tmp_path, tokenizer="auto")),
                         hf_tokenizer)  # fmt: skip
    b.setup()
    assert a.vocab.size == b.vocab.size == len(hf_tokenizer)
    assert torch.equal(a.val_split.tokens, b.val_split.tokens)
    assert torch.equal(a.val_split.target_bytes, b.val_split.target_bytes)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # same tokenizer, same cache entry


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


def test_cache_is_hit_then_invalidated_and_a_corrupt_entry_is_rebuilt(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    first = text_dm(tmp_path)
    entries = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 1 and not list((tmp_path / "cache").glob(".*"))  # no temporary file left behind

    def refuse(self, texts):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(ByteTokenizer, "encode", refuse)
    cached = text_dm(tmp_path, seq_len=16, val_fraction=0.3)  # window and split settings: no re-tokenization
    assert torch.equal(text_dm(tmp_path).val_split.tokens, first.val_split.tokens) and cached.seq_len == 16
    md = tmp_path / "prose" / "doc00.md"
    st = md.stat()
    os.utime(md, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime: tokenized again
    with pytest.raises(AssertionError, match="tokenized again"):
        text_dm(tmp_path)
    md.write_text(md.read_text(encoding="utf-8") + "more\n", encoding="utf-8")
    os.utime(md, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime, a new size: tokenized again
    with pytest.raises(AssertionError, match="tokenized again"):
        text_dm(tmp_path)
    monkeypatch.undo()
    text_dm(tmp_path)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    for entry in (tmp_path / "cache").glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated: rebuilt, not crashed on
    rebuilt = text_dm(tmp_path)
    assert rebuilt.val_split.tokens.shape == first.val_split.tokens.shape


def test_nothing_touches_the_network(tmp_path, monkeypatch):
    write_corpus(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    text_dm(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad(root, name: str) -> tuple[dict, str]:
    """(TextConfig overrides, the error's pattern) for one kind of bad input, its files written under root."""
    root.mkdir(exist_ok=True)
    good = root / "good.txt"
    good.write_text(prose(0, 400), encoding="utf-8")
    if name == "empty glob":
        return {"files": [str(good), f"{root}/missing/*.txt"]}, r"data.text.files: '.*missing/\*\.txt' matches no file"
    if name == "binary":
        (root / "bin.txt").write_bytes(b"abc\0def")
        return {"files": [str(root / "*.txt")]}, r"data.text.files: .*bin\.txt: a binary file"
    if name == "not utf-8":
        (root / "latin.md").write_bytes("caf\xe9 au lait".encode("latin-1"))
        return {"files": [str(good), str(root / "latin.md")]}, r"data.text.files: .*latin\.md: not UTF-8"
    if name == "jsonl field":
        (root / "x.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n', encoding="utf-8")
        return {"files": [str(good), str(root / "x.jsonl")]}, r"data.text.files: .*x\.jsonl: line 3: no field 'text'"
    if name == "jsonl syntax":
        (root / "y.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
        return {"files": [str(good), str(root / "y.jsonl")]}, r"data.text.files: .*y\.jsonl: line 2: not valid JSON"
    if name == "parquet column":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["a", "b"]}), root / "p.parquet")
        return {"files": [str(good), str(root / "p.parquet")]}, r"data.text.files: .*p\.parquet: .*'text'"
    if name == "unsupported":
        (root / "t.csv").write_text("a,b\n", encoding="utf-8")
        return {"files": [str(root / "*")]}, r"data.text.files: .*t\.csv .*unsupported file type '\.csv'"
    if name == "short group":
        (root / "tiny.txt").write_text("tiny", encoding="utf-8")
        return ({"files": {"big": str(good), "small": str(root / "tiny.txt")}},
                r"data.text.files: group 'small' holds 5 tokens .*seq_len \+ 1 = 33")  # fmt: skip
    raise KeyError(name)


@pytest.mark.parametrize("name", ["empty glob", "binary", "not utf-8", "jsonl field", "jsonl syntax",
                                  "parquet column", "unsupported", "short group"])  # fmt: skip
def test_bad_files_are_refused_naming_them(tmp_path, name):
    overrides, pattern = _bad(tmp_path / "c", name)
    dm = TextDataModule(text_cfg(tmp_path, **overrides))
    with pytest.raises(ValueError, match=pattern):
        dm.setup("fit")


@pytest.mark.parametrize("overrides,pattern", [
    ({"files": None}, r"data.text.files=None: expected a list of globs"),
    ({"files": []}, r"data.text.files.all=\[\]"),
    ({"files": {"a": []}}, r"data.text.files.a=\[\]"),
    ({"val_fraction": 1.0}, r"data.text.val_fraction=1.0: expected 0 < val_fraction < 1"),
    ({"tune_fraction": -0.1}, r"data.text.tune_fraction=-0.1"),
    ({"seq_len": 0}, r"data.text.seq_len=0: expected >= 1"),
    ({"batch_size": 0}, r"data.text.batch_size=0"),
    ({"val_windows_per_group": 0}, r"data.text.val_windows_per_group=0"),
    ({"tokenizer": "/no/such/dir"}, r"data.text.tokenizer='/no/such/dir': .*no such directory"),
    ({"text_field": ""}, r"data.text.text_field=''"),
])  # fmt: skip
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, pattern):
    cfg = DataConfig(_target_="moe.data.text.TextDataModule", text=text_cfg(tmp_path, **overrides))
    with pytest.raises(ValueError, match=pattern):
        TextDataModule.check_config(cfg)


def test_single_document_groups_hold_nothing_out(tmp_path):
    (tmp_path / "one.txt").write_text(prose(1, 300), encoding="utf-8")
    with pytest.raises(ValueError, match="no validation document: every group holds a single document"):
        text_dm(tmp_path, files=[str(tmp_path / "one.txt")])


# ---------------------------------------------------------------------------------------------------------------
# data=pycode is the same pipeline; config
# ---------------------------------------------------------------------------------------------------------------


def test_bytes_text_equals_pycode_on_the_same_files(tmp_path):
    root = tmp_path / "lib"
    sizes = {"email": [300, 40, 480, 260, 350], "json": [200, 350, 30, 410]}  # only the smallest fits 5%
    for domain, ns in sizes.items():
        for i, n in enumerate(ns):
            (root / domain).mkdir(parents=True, exist_ok=True)
            (root / domain / f"m{i}.py").write_text(prose(10 * i + n, n // 6)[:n], encoding="utf-8")
    common = dict(seq_len=24, batch_size=4, train_windows=16, val_fraction=0.05, seed=3)
    py = PyCodeDataModule(PyCodeConfig(root=str(root), domains=["email", "json"], eval_domains=["email", "json"],
                                       val_windows_per_domain=3, **common))  # fmt: skip
    py.setup()
    text = text_dm(tmp_path, files={d: f"{root}/{d}/*.py" for d in sizes}, val_windows_per_group=3, **common)
    # the smallest module of each domain is held out, by either split (paths hashed, or texts)
    assert {f"{root}/{f.path}" for f in py.val_files} == {d for ds in text.val_docs.values() for d in ds}
    ids = torch.tensor([DOMAINS.index(d) for d in text.task_names])
    for a, b in zip(py.train_dataloader(), text.train_dataloader(), strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["target_mask"], b["target_mask"])
        assert torch.equal(a["target_bytes"], b["target_bytes"]) and torch.equal(a["task_id"], ids[b["task_id"]])
    for k in ("tokens", "target_mask", "target_bytes"):
        assert torch.equal(getattr(py.val_split, k), getattr(text.val_split, k))
    assert torch.equal(py.val_split.task_id, ids[text.val_split.task_id])
    model = Uniform(257)
    assert py.evaluate(model).results["bpb"] == pytest.approx(text.evaluate(model).results["bpb"])


def test_yaml_mirrors_the_config_and_composes(tmp_path):
    from hydra import compose, initialize_config_dir

    from moe.config import TrainConfig, register_configs

    node = OmegaConf.load(CONF / "data" / "text.yaml")
    assert node._target_ == "moe.data.text.TextDataModule"
    merged = OmegaConf.merge(OmegaConf.structured(TextConfig), node.text)
    assert OmegaConf.to_object(merged) == TextConfig()
    assert set(node.text) == set(OmegaConf.structured(TextConfig))
    write_corpus(tmp_path)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["output_dir=/tmp/x", "data=text", "data.text.seq_len=16",
                                          f"data.text.files=['{tmp_path}/prose/*.md']",
                                          f"data.text.cache_dir={tmp_path}/cache"])  # fmt: skip
    cfg: TrainConfig = OmegaConf.to_object(cfg)
    TextDataModule.check_config(cfg.data)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    assert dm.task_names == ["all"] and dm.vocab.size == 257
    assert dm.evaluate(Uniform(257)).table == {"all": pytest.approx(math.log2(257))}
