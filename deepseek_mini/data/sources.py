"""Reading each text source into documents: local files (found by path, directory or glob; .txt, .jsonl, .json,
.parquet, gzipped or not), the running interpreter's stdlib, a Hugging Face Hub dataset.

Documents come back as (key, text) lists or `datasets.Dataset`s with one "text" column; corpus.py turns them into
the train/val Corpus and its content hashes.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence

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


def _suffix(path: str) -> str | None:
    low = path.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return suf
    return None


def resolve_path(path: str | os.PathLike) -> str:
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
        p = resolve_path(s)
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


def cap_dataset(ds, max_chars: int | None):
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


def docs_dataset(docs: list[tuple[str, str]]):
    import datasets

    return datasets.Dataset.from_dict(
        {"text": [t for _, t in docs]}, features=datasets.Features({"text": datasets.Value("string")})
    )


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


def read_stdlib(max_chars: int) -> tuple[list[tuple[str, str]], int, list[str]]:
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


def read_files(files: list[str], text_field: str, hf_cache: str) -> tuple[list, int]:
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


def parts_to_dataset(parts: list, max_chars: int | None):
    """Concatenate parts (doc lists / datasets) in order, capping at max_chars.

    Returns (dataset, keys or None). Keys are only kept when every part is a list of documents from
    .txt files; otherwise the row index is the stable key.
    """
    import datasets

    if all(isinstance(p, list) for p in parts):
        docs = list(_cap_docs((d for p in parts for d in p), max_chars))
        return docs_dataset(docs), [k for k, _ in docs]
    dsets = [docs_dataset(p) if isinstance(p, list) else p for p in parts]
    ds = datasets.concatenate_datasets(dsets) if len(dsets) > 1 else dsets[0]
    return cap_dataset(ds, max_chars), None


def load_hub(hub_name: str, hub_config: str | None, split: str, text_field: str, hf_cache: str):
    import datasets

    local = os.path.exists(resolve_path(hub_name))
    try:
        if local and os.path.isfile(resolve_path(hub_name)):
            path = resolve_path(hub_name)
            builder = "parquet" if _suffix(path) in PARQUET_SUFFIXES else "json"
            ds = datasets.load_dataset(builder, data_files={split: path}, split=split, cache_dir=hf_cache)
        elif local:
            ds = datasets.load_dataset(resolve_path(hub_name), hub_config, split=split, cache_dir=hf_cache)
        else:
            ds = datasets.load_dataset(hub_name, hub_config, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if local:
            raise DataError(f"could not load local dataset {resolve_path(hub_name)} (split {split!r}): {first}") from e
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
