"""The train/val corpus of a run: which text (CorpusSpec), read by sources.py, split into train and val by
document, and hashed.

Every source (the interpreter's stdlib, local files, a Hub dataset) ends up as two
`datasets.Dataset`s, train and val, each with a single "text" column of documents, plus a content
hash. The hash is what keys all later caches (tokenizer, packed tokens), so a changed file or a
different `max_chars` can never silently reuse stale tokens.

Reading, splitting and hashing local files takes ~1.3 s of every start at the Gutenberg corpus, even when the
tokenizer and tokens are cached. So load_corpus records what it found for a set of files (hashes, sizes,
description: `<cache_dir>/corpus/<key>.json`), keyed by each file's path, size, inode, mtime and ctime (the
system sets ctime at every write; no tool sets it back) and by this package's reading code. A later run with
the same files takes the record and reads the documents only if something needs them (a tokenizer or token
cache to build), checking then that they hash as recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .sources import (
    STDLIB_MAX_CHARS,
    DataError,
    cap_dataset,
    docs_dataset,
    expand_files,
    load_hub,
    parts_to_dataset,
    read_files,
    read_stdlib,
    resolve_path,
)

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Train/val documents (datasets with a "text" column, read on first use when the corpus came from its record)
    and what they were made from."""

    description: str  # human-readable source spec, also stored in the token cache's meta.json
    train_hash: str  # sha256 over the train documents' text (in order)
    val_hash: str
    train_chars: int
    val_chars: int
    train_docs: int
    val_docs: int
    n_invalid_utf8: int = 0
    files: list[str] = field(default_factory=list)
    _datasets: tuple[Any, Any] | None = field(default=None, repr=False)  # (train, val) datasets.Dataset
    _read: Callable[[], Corpus] | None = field(default=None, repr=False)  # reads them again (a recorded corpus)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.train_hash}:{self.val_hash}".encode()).hexdigest()

    @property
    def train(self):
        return self._documents()[0]

    @property
    def val(self):
        return self._documents()[1]

    def _documents(self) -> tuple[Any, Any]:
        if self._datasets is None:
            fresh = self._read()
            if (fresh.train_hash, fresh.val_hash) != (self.train_hash, self.val_hash):
                raise DataError(f"{self.description} changed while being read: its documents no longer hash as "
                                "recorded; run again")
            self._datasets = fresh._datasets
        return self._datasets


def _val_mask(keys: Sequence[str] | int, val_fraction: float) -> np.ndarray:
    """Deterministic per-document val assignment from a hash of a stable key (path or index).

    Independent of the seed on purpose: changing the shuffling seed must not move documents
    between train and val.
    """
    if isinstance(keys, int):
        # splitmix64 of the index, vectorised (hub datasets can have millions of rows)
        z = np.arange(keys, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    else:
        u = np.array(
            [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") / 2.0**64 for k in keys]
        )
    n = len(u)
    mask = u < val_fraction
    if n >= 2:
        if not mask.any():  # at least one val document
            mask[int(np.argmin(u))] = True
        if mask.all():  # and at least one train document
            mask[int(np.argmax(u))] = False
    return mask


def hash_texts(ds) -> tuple[str, int]:
    """sha256 over a dataset's "text" column (documents separated by NUL) and its char count."""
    h = hashlib.sha256()
    n_chars = 0
    for batch in ds.with_format("arrow").iter(batch_size=10_000):
        texts = batch.column("text").to_pylist()
        for t in texts:
            t = t or ""
            n_chars += len(t)
            h.update(t.encode("utf-8", errors="surrogatepass"))
            h.update(b"\0")
    return h.hexdigest(), n_chars


def _split_train_val(ds, keys: list[str] | None, val_fraction: float):
    """Deterministic document-level split; a single document is split at 1 - val_fraction."""
    n = len(ds)
    if n == 1:
        text = ds[0]["text"]
        cut = int(len(text) * (1.0 - val_fraction))
        nl = text.rfind("\n", 0, cut)  # prefer a line boundary near the cut
        if nl > cut - 2000 and nl > 0:
            cut = nl + 1
        return docs_dataset([("0", text[:cut])]), docs_dataset([("1", text[cut:])])
    mask = _val_mask(keys if keys is not None else n, val_fraction)
    idx = np.arange(n)
    return ds.select(idx[~mask]), ds.select(idx[mask])


@dataclass(frozen=True)
class CorpusSpec:
    """Which text a run reads: the `data.*` settings of configs/data/*.yaml that `load_corpus` needs."""

    source: str = "stdlib"  # "stdlib", "text" or "hub" (see module doc)
    train_files: Any = None  # source=text: a file, directory, glob, or a list of them
    val_files: Any = None
    hub_name: str | None = None  # source=hub
    hub_config: str | None = None
    hub_split: str = "train"
    hub_val_split: str | None = None
    text_field: str = "text"  # the column holding the text in .jsonl/.json/.parquet and Hub data
    val_fraction: float = 0.01  # document-level split when there is no validation data
    max_chars: int | None = None  # cap on training characters (None: STDLIB_MAX_CHARS for stdlib, else all)
    cache_dir: str = ".cache/deepseek_mini"


# The fields each source reads (source, val_fraction, max_chars and cache_dir: all of them).
SOURCE_FIELDS = {"stdlib": (), "text": ("train_files", "val_files", "text_field"),
                 "hub": ("hub_name", "hub_config", "hub_split", "hub_val_split", "text_field")}


def unread_fields(data: dict) -> list[str]:
    """The corpus fields of a data config set (other than their defaults) for a source that does not read them:
    `data.val_files=x` on the stdlib source would be ignored, and the run (or eval.py) would report a loss on
    other text than the one named."""
    read = SOURCE_FIELDS.get(data.get("source", "stdlib"), ())
    defaults = CorpusSpec()
    fields = dict.fromkeys(k for f in SOURCE_FIELDS.values() for k in f)
    return [k for k in fields if k not in read and k in data and data[k] not in (None, getattr(defaults, k))]


def load_corpus(spec: CorpusSpec | str = "stdlib", **spec_fields) -> Corpus:
    """Load train/val documents for a CorpusSpec, or for its fields given as arguments
    (`load_corpus("text", train_files=...)`). Local files (source=text) seen before with the same identity come
    from their record, their documents read only when used (see the module doc)."""
    if not isinstance(spec, CorpusSpec):
        spec = CorpusSpec(spec, **spec_fields)
    elif spec_fields:
        raise TypeError("load_corpus takes a CorpusSpec or its fields, not both")
    record = _record_path(spec)
    if record is not None:
        try:
            corpus = Corpus(**json.loads(record.read_text()), _read=functools.partial(_read_corpus, spec))  # picklable
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: read the files
            corpus = None
        if corpus is not None:
            if corpus.n_invalid_utf8:  # said at every start, as a read of the files says it
                msg = (f"{corpus.n_invalid_utf8} invalid UTF-8 sequences replaced in {corpus.description} (counted when "
                       "its files were first read)")
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
            return corpus
    corpus = _read_corpus(spec)
    if record is not None:
        _write_record(record, corpus)
    return corpus


def _record_path(spec: CorpusSpec) -> Path | None:
    """Where the record of these local files would be; None for the other sources (the stdlib's ~800 files, a Hub
    dataset with its own cache) and for files that cannot be listed (reading them says why)."""
    if spec.source != "text" or not spec.train_files:
        return None
    try:
        groups = [expand_files(spec.train_files, "train_files")]
        if spec.val_files:
            groups.append(expand_files(spec.val_files, "val_files"))
        stats = [[[f, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns] for f in g for st in [os.stat(f)]]
                 for g in groups]
    except (DataError, OSError):
        return None
    code = b"".join(Path(__file__).with_name(n).read_bytes() for n in ("corpus.py", "sources.py"))
    key = {"spec": {k: v for k, v in asdict(spec).items() if k != "cache_dir"}, "files": stats,
           "code": hashlib.sha256(code).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(resolve_path(spec.cache_dir)) / "corpus" / f"{digest}.json"


def _write_record(path: Path, corpus: Corpus) -> None:
    known = {f.name: getattr(corpus, f.name) for f in fields(corpus) if not f.name.startswith("_")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)  # whole or absent, also with two runs writing it at once
    except OSError:  # a read-only cache: the files are read again next time
        pass


def _read_corpus(spec: CorpusSpec) -> Corpus:
    """Read, split and hash the documents of a CorpusSpec."""
    source, text_field, max_chars, val_fraction = spec.source, spec.text_field, spec.max_chars, spec.val_fraction
    train_files, val_files = spec.train_files, spec.val_files
    hub_name, hub_config, hub_split, hub_val_split = spec.hub_name, spec.hub_config, spec.hub_split, spec.hub_val_split
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    hf_cache = os.path.join(resolve_path(spec.cache_dir), "hf_datasets")
    n_bad = 0
    files: list[str] = []
    val_ds = None
    keys = None
    if source == "stdlib":
        cap = STDLIB_MAX_CHARS if max_chars is None else max_chars
        docs, n_bad, files = read_stdlib(cap)
        train_ds, keys = docs_dataset(docs), [k for k, _ in docs]
        desc = f"stdlib:{sysconfig.get_paths()['stdlib']} (python {sysconfig.get_python_version()}, max_chars={cap})"
    elif source == "text":
        if not train_files:
            raise DataError("source=text needs data.train_files (a file, directory, glob, or list)")
        files = expand_files(train_files, "train_files")
        parts, n_bad = read_files(files, text_field, hf_cache)
        train_ds, keys = parts_to_dataset(parts, max_chars)
        desc = f"text:{files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
        if val_files:
            vfiles = expand_files(val_files, "val_files")
            vparts, vbad = read_files(vfiles, text_field, hf_cache)
            n_bad += vbad
            val_ds, _ = parts_to_dataset(vparts, None)
            files += vfiles
            desc += f" val:{vfiles[0]}" + (f" (+{len(vfiles) - 1} more)" if len(vfiles) > 1 else "")
    elif source == "hub":
        if not hub_name:
            raise DataError("source=hub needs data.hub_name")
        train_ds = cap_dataset(load_hub(hub_name, hub_config, hub_split, text_field, hf_cache), max_chars)
        desc = f"hub:{hub_name}" + (f"/{hub_config}" if hub_config else "") + f"[{hub_split}]"
        if hub_val_split:
            val_ds = load_hub(hub_name, hub_config, hub_val_split, text_field, hf_cache)
            desc += f" val:[{hub_val_split}]"
    else:
        raise DataError(f"unknown data source {source!r}; use 'stdlib', 'text' or 'hub'")
    if max_chars is not None and source != "stdlib":
        desc += f" max_chars={max_chars}"

    where = files[0] if len(files) == 1 else desc
    if len(train_ds) == 0:
        raise DataError(f"empty corpus: no documents in {where}")
    if val_ds is None:
        train_ds, val_ds = _split_train_val(train_ds, keys, val_fraction)
        desc += f" val_fraction={val_fraction}"
    train_hash, train_chars = hash_texts(train_ds)
    val_hash, val_chars = hash_texts(val_ds)
    if train_chars == 0:
        raise DataError(f"empty corpus: no text in {where}")
    if val_chars == 0:
        raise DataError(f"empty validation data: no text in the validation part of {desc}")
    return Corpus(
        description=desc,
        train_hash=train_hash,
        val_hash=val_hash,
        train_chars=train_chars,
        val_chars=val_chars,
        train_docs=len(train_ds),
        val_docs=len(val_ds),
        n_invalid_utf8=n_bad,
        files=files,
        _datasets=(train_ds, val_ds),
    )


def iter_texts(ds, max_chars: int | None = None, batch_size: int = 1000) -> Iterator[str]:
    """Stream a dataset's texts, stopping after `max_chars` characters (for tokenizer training)."""
    total = 0
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        for t in batch.column("text").to_pylist():
            if not t:
                continue
            if max_chars is not None:
                t = t[: max_chars - total]
            total += len(t)
            yield t
            if max_chars is not None and total >= max_chars:
                return


__all__ = ["Corpus", "CorpusSpec", "hash_texts", "iter_texts", "load_corpus"]
