"""Tests for deepseek_mini.data: sources, bad data, caches, batches, resumable order.

Every test makes its own tiny corpus under tmp_path; nothing touches the network.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import warnings
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import deepseek_mini.data.packing as packing_mod
import deepseek_mini.data.tokenizer as tokenizer_mod
from deepseek_mini.data import (
    EOS_TOKEN,
    CorpusSpec,
    DataError,
    ResumableSampler,
    TextDataModule,
    load_corpus,
    split_large_text,
)
from deepseek_mini.data.sources import stdlib_files

WORDS = [
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their",
]


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def docs(n: int, words: int = 150, seed: int = 0) -> list[str]:
    return [make_text(words, seed * 1000 + i) for i in range(n)]


def write(path, kind: str, texts: list[str], field: str = "text") -> str:
    """Write documents as .txt (joined with <|endoftext|> lines), .txt.gz, .jsonl[.gz], .json, .parquet."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind in ("txt", "txt.gz"):
        data = f"\n{EOS_TOKEN}\n".join(texts).encode()
        with (gzip.open if kind == "txt.gz" else open)(path, "wb") as f:
            f.write(data)
    elif kind in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
        with (gzip.open if kind == "jsonl.gz" else open)(path, "wb") as f:
            f.write(data)
    elif kind == "json":
        with open(path, "w") as f:
            json.dump([{field: t} for t in texts], f)
    elif kind == "parquet":
        pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path)
    else:
        raise ValueError(kind)
    return path


def dm_for(tmp_path, **kw) -> TextDataModule:
    args = {"source": "text", "vocab_size": 300, "seq_len": 16, "batch_size": 2,
            "cache_dir": str(tmp_path / "cache")}
    args.update(kw)
    return TextDataModule(**args)


def check_batches(dm: TextDataModule) -> None:
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (dm.batch_size, dm.seq_len)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < dm.vocab_size
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape[1] == dm.seq_len and torch.equal(vx[:, 1:], vy[:, :-1])


# ------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("kind", ["txt", "txt.gz", "jsonl", "jsonl.gz", "json", "parquet"])
def test_file_types(tmp_path, kind):
    texts = docs(20)
    f = write(tmp_path / "data" / f"corpus.{kind}", kind, texts)
    dm = dm_for(tmp_path, train_files=f, val_fraction=0.2).prepare()
    d = dm.describe()
    assert d["train_docs"] + d["val_docs"] == 20 and d["val_docs"] >= 1
    # every character survives (txt: the newline before each <|endoftext|> line stays)
    assert d["train_chars"] + d["val_chars"] == sum(len(t) for t in texts) + (19 if kind.startswith("txt") else 0)
    assert dm.eos_token_id == 0 and dm.tokenizer.token_to_id(EOS_TOKEN) == 0
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() <= 300
    assert os.path.isfile(dm.tokenizer_path) and dm.tokenizer_path.startswith(str(tmp_path / "cache" / "tokenizers"))
    assert dm.train_tokens.dtype == np.uint16 and len(dm.train_tokens) == d["train_tokens"]
    # one <|endoftext|> after every document
    assert int((np.asarray(dm.train_tokens) == 0).sum()) == d["train_docs"]
    check_batches(dm)


def test_directory_glob_list_and_val_files(tmp_path):
    write(tmp_path / "d" / "a.txt", "txt", docs(3, seed=1))
    write(tmp_path / "d" / "sub" / "b.jsonl", "jsonl", docs(4, seed=2))
    write(tmp_path / "d" / "sub" / "c.parquet", "parquet", docs(5, seed=3))
    (tmp_path / "d" / "notes.md").write_text("ignored")
    c = load_corpus("text", train_files=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))
    assert len(c.files) == 3 and c.files == sorted(c.files)
    assert len(c.train) + len(c.val) == 12
    g = load_corpus("text", train_files=str(tmp_path / "d" / "**" / "*.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert [os.path.basename(p) for p in g.files] == ["b.jsonl"]
    lst = load_corpus(
        "text",
        train_files=[str(tmp_path / "d" / "a.txt"), str(tmp_path / "d" / "sub" / "*.parquet")],
        val_files=str(tmp_path / "d" / "sub" / "b.jsonl"),
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(lst.train) == 8 and len(lst.val) == 4  # explicit val: no split


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    write(tmp_path / "rel" / "a.txt", "txt", docs(10))
    monkeypatch.chdir(tmp_path)
    dm = TextDataModule(source="text", train_files="rel/a.txt", cache_dir="c", vocab_size=300, seq_len=16,
                        batch_size=2)
    monkeypatch.chdir("/")
    dm.prepare()
    assert dm.tokenizer_path.startswith(str(tmp_path / "c"))


def test_split_large_text():
    big = ("para " * 100 + "\n\n") * 2000  # ~1 MB, no <|endoftext|>
    parts = split_large_text(big, doc_chars=50_000)
    assert "".join(parts) == big and len(parts) > 10 and max(map(len, parts)) < 60_000
    joined = f"one\n{EOS_TOKEN}\ntwo\n{EOS_TOKEN}\n\n{EOS_TOKEN}\nthree"
    assert split_large_text(joined) == ["one\n", "two\n", "three"]


def test_stdlib_source(tmp_path):
    files = stdlib_files()
    assert files and all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    c = load_corpus("stdlib", max_chars=60_000, cache_dir=str(tmp_path / "cache"))
    assert c.train_chars + c.val_chars == 60_000 and len(c.val) >= 1
    assert c.description.startswith("stdlib:")
    dm = TextDataModule(max_chars=60_000, vocab_size=300, seq_len=16, batch_size=2,
                        cache_dir=str(tmp_path / "cache")).prepare()
    assert dm.source == "stdlib"
    check_batches(dm)


def test_hub_local_copy(tmp_path):
    d = tmp_path / "hubcopy" / "data"
    write(d / "train.parquet", "parquet", docs(12, seed=1), field="story")
    write(d / "validation.parquet", "parquet", docs(3, seed=2), field="story")
    dm = dm_for(tmp_path, source="hub", hub_name=str(tmp_path / "hubcopy"), hub_val_split="validation",
                text_field="story").prepare()
    d_ = dm.describe()
    assert (d_["train_docs"], d_["val_docs"]) == (12, 3)
    check_batches(dm)
    # a single local file as hub_name, auto split
    f = write(tmp_path / "one.jsonl", "jsonl", docs(10, seed=4))
    c = load_corpus("hub", hub_name=f, cache_dir=str(tmp_path / "cache"))
    assert len(c.train) + len(c.val) == 10 and len(c.val) >= 1


def test_hub_offline_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_corpus("hub", hub_name="roneneldan/TinyStories", cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "roneneldan/TinyStories" in msg and "offline" in msg and "data=text" in msg and "\n" not in msg


# ------------------------------------------------------------------------------ split


def test_deterministic_split(tmp_path):
    for i, t in enumerate(docs(40)):
        write(tmp_path / "a" / f"f{i:02d}.txt", "txt", [t])
    kw = {"val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}
    c1 = load_corpus("text", train_files=str(tmp_path / "a"), **kw)
    c2 = load_corpus("text", train_files=str(tmp_path / "a"), **kw)
    assert c1.train_hash == c2.train_hash and c1.val_hash == c2.val_hash
    assert 1 <= len(c1.val) < 40 and len(c1.train) + len(c1.val) == 40
    # the key is the path relative to the corpus root: a moved corpus splits the same way
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "b")
    c3 = load_corpus("text", train_files=str(tmp_path / "moved" / "b"), **kw)
    assert (c3.train_hash, c3.val_hash) == (c1.train_hash, c1.val_hash)
    # at least one val document even for a tiny fraction
    c4 = load_corpus("text", train_files=str(tmp_path / "a"), val_fraction=1e-6, cache_dir=str(tmp_path / "cache"))
    assert len(c4.val) == 1
    # a single document is split by text at 1 - val_fraction
    text = make_text(3000)
    f = write(tmp_path / "single.jsonl", "jsonl", [text])
    c5 = load_corpus("text", train_files=f, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    tr, va = c5.train[0]["text"], c5.val[0]["text"]
    assert tr + va == text and 0.05 < len(va) / len(text) < 0.15


# ------------------------------------------------------------------------------ caches


def test_cache_reuse(tmp_path, monkeypatch, caplog):
    f = write(tmp_path / "a.txt", "txt", docs(20))
    dm1 = dm_for(tmp_path, train_files=f).prepare()
    tok_mtime = os.path.getmtime(dm1.tokenizer_path)
    bin_mtime = os.path.getmtime(dm1.token_cache.path("train"))

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", boom)
    monkeypatch.setattr(packing_mod, "_tokenize_split", boom)
    with caplog.at_level(logging.INFO, logger="deepseek_mini.data"):
        dm2 = dm_for(tmp_path, train_files=f).prepare()
    assert "reusing cached tokenizer" in caplog.text and "reusing cached tokens" in caplog.text
    assert dm2.tokenizer_path == dm1.tokenizer_path and dm2.token_cache.dir == dm1.token_cache.dir
    assert os.path.getmtime(dm2.tokenizer_path) == tok_mtime
    assert os.path.getmtime(dm2.token_cache.path("train")) == bin_mtime
    assert np.array_equal(dm1.train_tokens, dm2.train_tokens)
    # seq_len/batch_size do not affect the caches
    dm_for(tmp_path, train_files=f, seq_len=8, batch_size=3).prepare()
    # changed content -> new caches (so the patched builders must run)
    write(tmp_path / "a.txt", "txt", docs(20, seed=9))
    with pytest.raises(AssertionError, match="should have used the cache"):
        dm_for(tmp_path, train_files=f).prepare()


def test_unchanged_files_come_from_their_record_and_are_read_only_when_used(tmp_path, monkeypatch):
    """A second start over the same files reads none of them (hashes, sizes and description from the record); the
    documents are read when something needs them, and must hash as recorded. A file rewritten in place, even with
    its size and mtime put back, is read again (its ctime moved)."""
    import deepseek_mini.data.corpus as corpus_mod

    f = write(tmp_path / "d" / "a.txt", "txt", docs(30))
    g = write(tmp_path / "d" / "b.txt", "txt", docs(30, seed=3))
    kw = {"train_files": str(tmp_path / "d"), "cache_dir": str(tmp_path / "cache")}
    first = load_corpus("text", **kw)
    real_read = corpus_mod.read_files
    reads = []
    monkeypatch.setattr(corpus_mod, "read_files", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    again = load_corpus("text", **kw)
    assert reads == []
    fields = ("description", "train_hash", "val_hash", "train_chars", "val_chars", "train_docs", "val_docs", "files")
    assert [getattr(again, k) for k in fields] == [getattr(first, k) for k in fields]
    assert [r["text"] for r in again.train] == [r["text"] for r in first.train] and len(reads) == 1
    assert again.val_docs == len(again.val) and len(reads) == 1  # read once

    stat = os.stat(g)
    text = Path(g).read_text()
    Path(g).write_text(text.replace("a", "b", 1) if "a" in text else "x" + text[1:])  # same size, new content
    os.utime(g, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert os.path.getsize(g) == stat.st_size and os.stat(g).st_mtime_ns == stat.st_mtime_ns
    changed = load_corpus("text", **kw)
    assert len(reads) == 2 and changed.content_hash != first.content_hash

    # recorded, then changed before its documents were needed: refused, not used under the old hash
    recorded = load_corpus("text", **kw)
    assert len(reads) == 2
    Path(f).write_text("other text " * 50)
    with pytest.raises(DataError, match="no longer hash as recorded"):
        len(recorded.train)


def test_existing_tokenizer_json(tmp_path, monkeypatch):
    f = write(tmp_path / "a.txt", "txt", docs(20))
    dm1 = dm_for(tmp_path, train_files=f, vocab_size=350).prepare()
    mine = shutil.copy(dm1.tokenizer_path, tmp_path / "my_tokenizer.json")
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", lambda *a, **k: pytest.fail("trained"))
    dm2 = dm_for(tmp_path, train_files=f, vocab_size=4096, tokenizer_path=str(mine),
                 cache_dir=str(tmp_path / "other_cache")).prepare()
    assert dm2.tokenizer_path == str(mine) and dm2.vocab_size == dm1.vocab_size
    assert np.array_equal(dm1.train_tokens, dm2.train_tokens)
    with pytest.raises(DataError, match="nope.json"):
        dm_for(tmp_path, train_files=f, tokenizer_path=str(tmp_path / "nope.json")).prepare()


def test_stale_cache_rebuilt(tmp_path, caplog):
    f = write(tmp_path / "a.txt", "txt", docs(20))
    dm = dm_for(tmp_path, train_files=f).prepare()
    ref_train, ref_val = np.array(dm.train_tokens), np.array(dm.val_tokens)
    cdir, tok_path = dm.token_cache.dir, dm.tokenizer_path
    meta = os.path.join(cdir, "meta.json")
    def truncate(path, n):
        with open(path, "r+b") as fh:
            fh.truncate(n)

    def overwrite(path, text):
        with open(path, "w") as fh:
            fh.write(text)

    def other_tokenizer(path):
        with open(path) as fh:
            m = json.load(fh)
        with open(path, "w") as fh:
            json.dump({**m, "tokenizer_sha": "x"}, fh)

    damage = [
        lambda: truncate(os.path.join(cdir, "train.bin"), 10),  # truncated .bin
        lambda: os.remove(os.path.join(cdir, "val.bin")),  # missing .bin
        lambda: overwrite(meta, "{not json"),  # garbled meta
        lambda: os.remove(meta),  # missing meta
        lambda: other_tokenizer(meta),  # built with another tokenizer
        lambda: overwrite(tok_path, "garbage"),  # garbled tokenizer
    ]
    for i, hurt in enumerate(damage):
        hurt()
        with caplog.at_level(logging.WARNING, logger="deepseek_mini.data"):
            caplog.clear()
            dm2 = dm_for(tmp_path, train_files=f).prepare()
        assert "rebuilding" in caplog.text or "retraining" in caplog.text, i
        assert np.array_equal(dm2.train_tokens, ref_train) and np.array_equal(dm2.val_tokens, ref_val), i
    assert not [p for p in os.listdir(cdir) if p.startswith(".tmp")]


# ------------------------------------------------------------------------------ bad data


@pytest.mark.parametrize(
    "case",
    ["missing", "glob", "empty_txt", "empty_jsonl", "empty_dir", "jsonl_field", "parquet_column", "blank_txt"],
)
def test_bad_data(tmp_path, case):
    p = tmp_path / "data"
    p.mkdir()
    if case == "missing":
        spec, name = str(p / "nope.txt"), "nope.txt"
    elif case == "glob":
        spec, name = str(p / "*.jsonl"), "*.jsonl"
    elif case == "empty_txt":
        (p / "e.txt").write_bytes(b"")
        spec, name = str(p / "e.txt"), "e.txt"
    elif case == "blank_txt":
        (p / "e.txt").write_text("\n \n\t\n")
        spec, name = str(p / "e.txt"), "e.txt"
    elif case == "empty_jsonl":
        (p / "e.jsonl").write_text("")
        spec, name = str(p / "e.jsonl"), "e.jsonl"
    elif case == "empty_dir":
        spec, name = str(p), str(p)
    elif case == "jsonl_field":
        spec = name = write(p / "x.jsonl", "jsonl", docs(3), field="body")
    else:
        spec = name = write(p / "x.parquet", "parquet", docs(3), field="body")
    with pytest.raises(DataError) as e:
        dm_for(tmp_path, train_files=spec).prepare()
    msg = str(e.value)
    assert name in msg and "\n" not in msg, msg
    if case in ("jsonl_field", "parquet_column"):
        assert "'text'" in msg and "body" in msg


def test_too_small_corpus(tmp_path):
    f = write(tmp_path / "tiny.txt", "txt", ["a few words only. " * 3, "and some more words here " * 3])
    with pytest.raises(DataError) as e:
        dm_for(tmp_path, train_files=f, seq_len=64, batch_size=8).prepare()
    msg = str(e.value)
    assert "tiny.txt" in msg and "tokens" in msg and str(8 * 64 + 1) in msg


def test_invalid_utf8_replaced_counted_warned(tmp_path):
    good = make_text(2000).encode()
    raw = good[:3000] + b"\xff" + good[3000:6000] + b"\xc3\x28" + good[6000:] + "\ufffd ok".encode()
    f = tmp_path / "bad.txt"
    f.write_bytes(raw)
    with pytest.warns(UserWarning, match=r"2 invalid UTF-8 sequences replaced in .*bad\.txt"):
        dm = dm_for(tmp_path, train_files=str(f)).prepare()
    assert dm.describe()["invalid_utf8_replaced"] == 2
    check_batches(dm)
    with pytest.warns(UserWarning, match=r"2 invalid UTF-8 sequences replaced in .*bad\.txt"):  # from its record
        again = dm_for(tmp_path, train_files=str(f)).prepare()
    assert again.describe()["invalid_utf8_replaced"] == 2


# ------------------------------------------------------------------------------ batches / order


def test_windows_and_val_loader(tmp_path):
    f = write(tmp_path / "a.txt", "txt", docs(30))
    dm = dm_for(tmp_path, train_files=f, val_fraction=0.2, val_batch_size=3).prepare()
    T, stream = dm.seq_len, np.asarray(dm.val_tokens)
    xs = torch.cat([x for x, _ in dm.val_dataloader()])
    assert len(xs) == (len(stream) - 1) // T  # every window, in order, no shuffling
    for i in (0, len(xs) - 1):
        assert xs[i].tolist() == stream[i * T : (i + 1) * T].tolist()


def test_sampler_resume_and_ranks():
    full = list(islice(iter(ResumableSampler(10, seed=3)), 35))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]  # new permutation each epoch
    assert list(islice(iter(ResumableSampler(10, seed=3, start=17)), 18)) == full[17:35]
    r0 = list(islice(iter(ResumableSampler(10, seed=3, start=4, rank=0, world_size=2)), 10))
    r1 = list(islice(iter(ResumableSampler(10, seed=3, start=4, rank=1, world_size=2)), 10))
    assert r0 == full[4:24:2] and r1 == full[5:25:2]
    assert len(ResumableSampler(10)) > 10**9


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen.append(x.clone())
        return self.lin(x[:, :1].float()).mean()

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", self.lin(x[:, :1].float()).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_resume_continues_exact_stream(tmp_path):
    f = write(tmp_path / "a.txt", "txt", docs(40))

    def run(max_steps, ckpt=None):
        dm = dm_for(tmp_path, train_files=f, seed=7)
        model = _Recorder()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
            use_distributed_sampler=False, val_check_interval=4, limit_val_batches=2,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path / "runs"),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, dm, model.seen

    t_full, _, full = run(6)
    assert t_full.global_step == 6 and len(full) == 12  # 2 micro-batches per optimizer step
    t_half, _, first = run(3)
    ck = str(tmp_path / "half.ckpt")
    t_half.save_checkpoint(ck)
    t_res, dm_res, rest = run(6, ckpt=ck)
    assert t_res.global_step == 6 and dm_res.train_start_sample == 3 * 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(first, full[:6]))
    assert len(rest) == 6 and all(torch.equal(a, b) for a, b in zip(rest, full[6:]))
    assert not torch.equal(rest[0], full[0])


def test_corpus_spec_is_the_one_home_of_the_corpus_settings(tmp_path):
    """load_corpus takes a CorpusSpec or its fields alike; the datamodule builds the spec from the same keywords
    and its settings hash (stored in checkpoints, checked on resume) is what it was before the spec existed."""
    write(tmp_path / "a.txt", "txt", docs(10))
    kw = dict(train_files=str(tmp_path / "a.txt"), val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    by_fields, by_spec = load_corpus("text", **kw), load_corpus(CorpusSpec("text", **kw))
    assert (by_spec.train_hash, by_spec.val_hash, by_spec.description) == (
        by_fields.train_hash, by_fields.val_hash, by_fields.description)
    with pytest.raises(TypeError):
        load_corpus(CorpusSpec("text", **kw), max_chars=5)
    dm = TextDataModule(**kw, source="text", vocab_size=300, seq_len=16)
    assert dm.corpus_spec == CorpusSpec("text", **kw) and dm.train_files == kw["train_files"]
    assert TextDataModule().settings_hash() == "dda19fe278f6c412"  # the value before CorpusSpec
    with pytest.raises(TypeError):
        TextDataModule(train_file="a.txt")
