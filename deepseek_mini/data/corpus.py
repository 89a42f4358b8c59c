"""Finding and reading text sources into `datasets.Dataset` objects with one "text" column.

Every source (the interpreter's stdlib, local files, a Hub dataset) ends up as two
`datasets.Dataset`s, train and val, each with a single "text" column of documents, plus a content
hash. The hash is what keys all later caches (tokenizer, packed tokens), so a changed file or a
different `max_chars` can never silently reuse stale tokens.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Default cap for the stdlib source: ~6 MB of Python keeps the default CPU run fast.
STDLIB_MAX_CHARS = 6_000_000
# Large plain-text files are cut into documents of about this many characters, so that the
# train/val split by document and the batched tokenization do not deal with one 50 MB string.
DOC_CHARS = 200_000

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class DataError(ValueError):
    """A problem with the user's data (missing file, empty corpus, ...): one-line, actionable."""


@dataclass
class Corpus:
    """Train/val documents (datasets with a "text" column) and what they were made from."""

    train: Any  # datasets.Dataset (imported lazily)
    val: Any  # datasets.Dataset
    description: str  # human-readable source spec, also stored in the token cache's meta.json
    train_hash: str  # sha256 over the train documents' text (in order)
    val_hash: str
    train_chars: int
    val_chars: int
    n_invalid_utf8: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.train_hash}:{self.val_hash}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# helpers


def _suffix(path: str) -> str | None:
    low = path.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return suf
    return None


def _resolve(path: str | os.PathLike) -> str:
    # Hydra does not chdir, so relative paths mean "relative to where the user started the run".
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def expand_files(spec: str | os.PathLike | Sequence[str | os.PathLike], what: str = "files") -> list[str]:
    """Expand a path / directory / glob (or a list of them) into a sorted list of supported files.

    Raises DataError naming the offending entry for a missing path, a glob without matches, a
    directory without supported files, or an unsupported file type.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError(f"no {what} given")
    out: list[str] = []
    for s in specs:
        p = _resolve(s)
        if glob.has_magic(os.fspath(s)):
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"glob {os.fspath(s)!r} matched no files ({what})")
            bad = [m for m in matches if _suffix(m) is None]
            matches = [m for m in matches if _suffix(m) is not None]
            if not matches:
                raise DataError(
                    f"glob {os.fspath(s)!r} matched no supported files {SUPPORTED_SUFFIXES} (e.g. {bad[0]})"
                )
            out.extend(matches)
        elif os.path.isdir(p):
            matches = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(p)
                for f in files
                if _suffix(f) is not None
            )
            if not matches:
                raise DataError(f"directory {p} contains no supported files {SUPPORTED_SUFFIXES} ({what})")
            out.extend(matches)
        elif os.path.isfile(p):
            if _suffix(p) is None:
                raise DataError(f"unsupported file type: {p} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
            out.append(p)
        else:
            raise DataError(f"file not found: {p} ({what})")
    # keep order of specs but drop duplicates
    return list(dict.fromkeys(out))


def read_text_file(path: str) -> tuple[str, int]:
    """Read a .txt / .txt.gz / .py file as UTF-8, replacing invalid bytes.

    Returns (text, number of invalid UTF-8 sequences replaced). Broken bytes in one file of a large
    corpus should not kill a training run, but they should not go unnoticed either.
    """
    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:  # unreadable, truncated gzip, ...
        raise DataError(f"could not read {path}: {e}") from e
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # Each invalid sequence becomes one U+FFFD; subtract the ones that were genuinely there.
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        return text, n_bad


def split_large_text(text: str, doc_chars: int = DOC_CHARS) -> list[str]:
    """Cut a plain-text file into documents.

    `<|endoftext|>` lines separate documents (that is how the Gutenberg dump is joined). Pieces
    longer than `doc_chars` are further cut at the first blank line (else newline, else anywhere)
    after `doc_chars` characters, so documents stay of a reasonable size without losing text.
    """
    if EOS_TOKEN in text:
        lines = text.splitlines(keepends=True)
        pieces, cur = [], []
        for line in lines:
            if line.strip() == EOS_TOKEN:
                pieces.append("".join(cur))
                cur = []
            else:
                cur.append(line)
        pieces.append("".join(cur))
    else:
        pieces = [text]
    docs: list[str] = []
    for piece in pieces:
        start = 0
        while len(piece) - start > doc_chars:
            cut = piece.find("\n\n", start + doc_chars)
            if cut >= 0:
                cut += 2  # keep the blank line with the previous document
            else:
                cut = piece.find("\n", start + doc_chars)
                cut = start + doc_chars if cut < 0 else cut + 1
            docs.append(piece[start:cut])
            start = cut
        docs.append(piece[start:])
    return [d for d in docs if d.strip()]


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


def _cap_docs(docs: Iterable[tuple[str, str]], max_chars: int | None) -> Iterator[tuple[str, str]]:
    """Take documents in order until `max_chars` characters (the last one truncated)."""
    total = 0
    for key, text in docs:
        if max_chars is not None:
            if total >= max_chars:
                return
            text = text[: max_chars - total]
        total += len(text)
        yield key, text


def _cap_dataset(ds, max_chars: int | None):
    if max_chars is None or len(ds) == 0:
        return ds
    import pyarrow.compute as pc

    lengths = np.concatenate(
        [pc.utf8_length(b.column("text").fill_null("")).to_numpy(zero_copy_only=False)
         for b in ds.with_format("arrow").iter(batch_size=100_000)]
    )
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, max_chars, side="left")) + 1  # rows needed to reach max_chars
    return ds.select(range(min(n, len(ds))))


def _docs_dataset(docs: list[tuple[str, str]]):
    import datasets

    return datasets.Dataset.from_dict(
        {"text": [t for _, t in docs]}, features=datasets.Features({"text": datasets.Value("string")})
    )


# ----------------------------------------------------------------------------------------------
# sources


def stdlib_files(root: str | None = None) -> list[str]:
    """All *.py files of the running interpreter's standard library, sorted, without test suites."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_STDLIB_DIRS and not (rel == "lib2to3" and d == "tests")
        )
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def _read_stdlib(max_chars: int) -> tuple[list[tuple[str, str]], int, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    if not files:
        raise DataError(f"no *.py files found in the stdlib directory {root}")

    def gen():
        for p in files:
            text, _ = read_text_file(p)  # stdlib is UTF-8; don't warn about the odd test fixture
            if text.strip():
                yield os.path.relpath(p, root), text

    docs = list(_cap_docs(gen(), max_chars))
    return docs, 0, files


def _load_json_or_parquet(path: str, text_field: str, hf_cache: str):
    import datasets

    builder = "parquet" if _suffix(path) in PARQUET_SUFFIXES else "json"
    if os.path.getsize(path) == 0:
        raise DataError(f"empty file: {path}")
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=hf_cache)
    except Exception as e:  # datasets raises many types; we want one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not read {path} as {builder}: {msg}") from e
    if text_field not in ds.column_names:
        kind = "column" if builder == "parquet" else "field"
        raise DataError(
            f"{path} has no {kind} {text_field!r} (has: {', '.join(ds.column_names) or 'nothing'}); "
            f"set data.text_field"
        )
    if len(ds) == 0:
        raise DataError(f"empty file: {path}")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    dtype = getattr(ds.features["text"], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"{path}: {text_field!r} is not a string {'column' if builder == 'parquet' else 'field'}")
    # same feature type everywhere so files of different kinds can be concatenated
    return ds if dtype == "string" else ds.cast(datasets.Features({"text": datasets.Value("string")}))


def _read_files(files: list[str], text_field: str, hf_cache: str) -> tuple[list, int]:
    """Read local files into a list of parts: either (key, text) lists or datasets.

    Returns (parts, invalid-UTF-8 count). Keys are paths relative to the files' common root so the
    train/val split does not depend on where the corpus lives.
    """
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    parts: list = []
    n_bad_total = 0
    for path in files:
        rel = os.path.relpath(path, root)
        if _suffix(path) in TEXT_SUFFIXES:
            text, n_bad = read_text_file(path)
            if n_bad:
                n_bad_total += n_bad
                msg = f"{n_bad} invalid UTF-8 sequences replaced in {path}"
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
            docs = split_large_text(text)
            if not docs:
                raise DataError(f"empty file: {path}")
            parts.append([(f"{rel}#{i}", d) for i, d in enumerate(docs)])
        else:
            parts.append(_load_json_or_parquet(path, text_field, hf_cache))
    return parts, n_bad_total


def _parts_to_dataset(parts: list, max_chars: int | None):
    """Concatenate parts (doc lists / datasets) in order, capping at max_chars.

    Returns (dataset, keys or None). Keys are only kept when every part is a list of documents from
    .txt files; otherwise the row index is the stable key.
    """
    import datasets

    if all(isinstance(p, list) for p in parts):
        docs = list(_cap_docs((d for p in parts for d in p), max_chars))
        return _docs_dataset(docs), [k for k, _ in docs]
    dsets = [_docs_dataset(p) if isinstance(p, list) else p for p in parts]
    ds = datasets.concatenate_datasets(dsets) if len(dsets) > 1 else dsets[0]
    return _cap_dataset(ds, max_chars), None


def _load_hub(hub_name: str, hub_config: str | None, split: str, text_field: str, hf_cache: str):
    import datasets

    local = os.path.exists(_resolve(hub_name))
    try:
        if local and os.path.isfile(_resolve(hub_name)):
            path = _resolve(hub_name)
            builder = "parquet" if _suffix(path) in PARQUET_SUFFIXES else "json"
            ds = datasets.load_dataset(builder, data_files={split: path}, split=split, cache_dir=hf_cache)
        elif local:
            ds = datasets.load_dataset(_resolve(hub_name), hub_config, split=split, cache_dir=hf_cache)
        else:
            ds = datasets.load_dataset(hub_name, hub_config, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if local:
            raise DataError(f"could not load local dataset {_resolve(hub_name)} (split {split!r}): {first}") from e
        raise DataError(
            f"could not load {hub_name!r} (config {hub_config!r}, split {split!r}) from the Hugging Face Hub "
            f"(offline?): {type(e).__name__}: {first}. Download it elsewhere and pass "
            f"data=text data.train_files=..."
        ) from e
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {hub_name!r} split {split!r} has no column {text_field!r} "
            f"(has: {', '.join(ds.column_names)}); set data.text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


def _split_train_val(ds, keys: list[str] | None, val_fraction: float):
    """Deterministic document-level split; a single document is split at 1 - val_fraction."""
    n = len(ds)
    if n == 1:
        text = ds[0]["text"]
        cut = int(len(text) * (1.0 - val_fraction))
        nl = text.rfind("\n", 0, cut)  # prefer a line boundary near the cut
        if nl > cut - 2000 and nl > 0:
            cut = nl + 1
        return _docs_dataset([("0", text[:cut])]), _docs_dataset([("1", text[cut:])])
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


def load_corpus(spec: CorpusSpec | str = "stdlib", **fields) -> Corpus:
    """Load train/val documents for a CorpusSpec, or for its fields given as arguments
    (`load_corpus("text", train_files=...)`)."""
    if not isinstance(spec, CorpusSpec):
        spec = CorpusSpec(spec, **fields)
    elif fields:
        raise TypeError("load_corpus takes a CorpusSpec or its fields, not both")
    source, text_field, max_chars, val_fraction = spec.source, spec.text_field, spec.max_chars, spec.val_fraction
    train_files, val_files = spec.train_files, spec.val_files
    hub_name, hub_config, hub_split, hub_val_split = spec.hub_name, spec.hub_config, spec.hub_split, spec.hub_val_split
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    hf_cache = os.path.join(_resolve(spec.cache_dir), "hf_datasets")
    n_bad = 0
    files: list[str] = []
    val_ds = None
    keys = None
    if source == "stdlib":
        cap = STDLIB_MAX_CHARS if max_chars is None else max_chars
        docs, n_bad, files = _read_stdlib(cap)
        train_ds, keys = _docs_dataset(docs), [k for k, _ in docs]
        desc = f"stdlib:{sysconfig.get_paths()['stdlib']} (python {sysconfig.get_python_version()}, max_chars={cap})"
    elif source == "text":
        if not train_files:
            raise DataError("source=text needs data.train_files (a file, directory, glob, or list)")
        files = expand_files(train_files, "train_files")
        parts, n_bad = _read_files(files, text_field, hf_cache)
        train_ds, keys = _parts_to_dataset(parts, max_chars)
        desc = f"text:{files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
        if val_files:
            vfiles = expand_files(val_files, "val_files")
            vparts, vbad = _read_files(vfiles, text_field, hf_cache)
            n_bad += vbad
            val_ds, _ = _parts_to_dataset(vparts, None)
            files += vfiles
            desc += f" val:{vfiles[0]}" + (f" (+{len(vfiles) - 1} more)" if len(vfiles) > 1 else "")
    elif source == "hub":
        if not hub_name:
            raise DataError("source=hub needs data.hub_name")
        train_ds = _cap_dataset(_load_hub(hub_name, hub_config, hub_split, text_field, hf_cache), max_chars)
        desc = f"hub:{hub_name}" + (f"/{hub_config}" if hub_config else "") + f"[{hub_split}]"
        if hub_val_split:
            val_ds = _load_hub(hub_name, hub_config, hub_val_split, text_field, hf_cache)
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
        train=train_ds,
        val=val_ds,
        description=desc,
        train_hash=train_hash,
        val_hash=val_hash,
        train_chars=train_chars,
        val_chars=val_chars,
        n_invalid_utf8=n_bad,
        files=files,
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


__all__ = [
    "EOS_TOKEN",
    "Corpus",
    "CorpusSpec",
    "DataError",
    "expand_files",
    "iter_texts",
    "load_corpus",
    "read_text_file",
    "split_large_text",
    "stdlib_files",
]
