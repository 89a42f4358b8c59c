"""Tokenize documents (datasets.map), pack them into one token stream per split, cache as memmaps.

Layout: `cache_dir/tokens/<key>/{train,val}.bin` (raw little-endian uint16/uint32 token ids,
`<|endoftext|>` after every document) + `meta.json`. The key hashes the corpus content, the
tokenizer file and the packing settings, so any change produces a fresh cache and an unchanged
setup never tokenizes twice. Files are written under temporary names and moved into place with
`os.replace`, and meta.json goes last: a crash leaves either a complete cache or none, and a cache
that fails validation (missing/garbled meta, wrong size, other tokenizer) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .corpus import Corpus
from .tokenizer import eos_id, file_sha256

log = logging.getLogger(__name__)

PACK_FORMAT = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever the ids fit."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenCache:
    """A validated on-disk token cache."""

    dir: str
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def path(self, split: str) -> str:
        return os.path.join(self.dir, f"{split}.bin")

    def n_tokens(self, split: str) -> int:
        return int(self.meta[split]["n_tokens"])

    def open(self, split: str) -> np.ndarray:
        """Read-only memmap of a split's token stream (nothing is loaded into RAM)."""
        return np.memmap(self.path(split), dtype=self.dtype, mode="r", shape=(self.n_tokens(split),))


class _Encoder:
    """Picklable batch encoder for datasets.map (the tokenizer is rebuilt lazily in each worker)."""

    def __init__(self, tokenizer_json: str, eos: int):
        self.tokenizer_json = tokenizer_json
        self.eos = eos
        self._tok = None

    def __getstate__(self):
        return {"tokenizer_json": self.tokenizer_json, "eos": self.eos, "_tok": None}

    def __call__(self, batch):
        if self._tok is None:
            self._tok = Tokenizer.from_str(self.tokenizer_json)
        encs = self._tok.encode_batch([t or "" for t in batch["text"]], add_special_tokens=False)
        return {"ids": [e.ids + [self.eos] for e in encs]}


def token_cache_key(corpus: Corpus, tokenizer_sha: str, dtype: np.dtype) -> str:
    spec = json.dumps(
        {
            "content": corpus.content_hash,
            "tokenizer": tokenizer_sha,
            "dtype": dtype.name,
            "format": PACK_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def load_valid_cache(cache_dir: str, tokenizer_sha: str) -> TokenCache | None:
    """The cache at `cache_dir` if it is complete and consistent, else None (with the reason logged)."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isdir(cache_dir):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"format {meta.get('format')} != {PACK_FORMAT}")
        if meta.get("tokenizer_sha") != tokenizer_sha:
            raise ValueError("built with a different tokenizer")
        cache = TokenCache(cache_dir, meta)
        for split in SPLITS:
            want = cache.n_tokens(split) * cache.dtype.itemsize
            have = os.path.getsize(cache.path(split))
            if have != want or want == 0:
                raise ValueError(f"{split}.bin has {have} bytes, meta.json says {want}")
        return cache
    except Exception as e:  # noqa: BLE001 - any inconsistency means "rebuild"
        log.warning("token cache %s is unusable (%s: %s); rebuilding", cache_dir, type(e).__name__, e)
        return None


def _tokenize_split(ds, encoder: _Encoder, out_path: str, tmp_dir: str, split: str, dtype: np.dtype,
                    num_proc: int) -> int:
    """Tokenize a split with datasets.map and append all ids to `out_path`; returns the token count."""
    import datasets
    import pyarrow.compute as pc

    num_proc = max(1, min(num_proc, len(ds)))
    if num_proc > 1:
        # workers are forked after the parent may have used the Rust thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))})
    mapped = ds.map(
        encoder,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=os.path.join(tmp_dir, f"{split}.arrow"),
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(f"{out_path}:{split}".encode()).hexdigest()[:16],
        desc=f"Tokenizing {split}",
    )
    n = 0
    with open(out_path, "wb") as f:
        for batch in mapped.with_format("arrow").iter(batch_size=4096):
            ids = pc.list_flatten(batch.column("ids")).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            f.write(ids.tobytes())
            n += len(ids)
    del mapped
    return n


def build_token_cache(
    corpus: Corpus,
    tokenizer: Tokenizer,
    tokenizer_path: str,
    cache_root: str,
    num_proc: int = 1,
) -> TokenCache:
    """Return the packed-token cache for (corpus, tokenizer), building it if missing or stale."""
    tok_sha = file_sha256(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    key = token_cache_key(corpus, tok_sha, dtype)
    cache_dir = os.path.join(cache_root, "tokens", key)
    cache = load_valid_cache(cache_dir, tok_sha)
    if cache is not None:
        log.info("reusing cached tokens at %s", cache_dir)
        return cache

    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):  # invalidate first: a half-rewritten cache must never look valid
        os.remove(meta_path)
    tmp_dir = os.path.join(cache_dir, f".tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    encoder = _Encoder(tokenizer.to_str(), eos_id(tokenizer))
    meta = {
        "format": PACK_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_token_id": eos_id(tokenizer),
        "tokenizer_sha": tok_sha,
        "tokenizer_path": tokenizer_path,
        "source": corpus.description,
        "content_hash": corpus.content_hash,
    }
    try:
        for split, ds, chars in (("train", corpus.train, corpus.train_chars), ("val", corpus.val, corpus.val_chars)):
            log.info("tokenizing %s: %d documents, %d chars (num_proc=%d)", split, len(ds), chars, num_proc)
            tmp_bin = os.path.join(tmp_dir, f"{split}.bin")
            n = _tokenize_split(ds, encoder, tmp_bin, tmp_dir, split, dtype, num_proc)
            os.replace(tmp_bin, os.path.join(cache_dir, f"{split}.bin"))
            meta[split] = {"n_tokens": n, "n_docs": len(ds), "n_chars": chars}
        tmp_meta = os.path.join(tmp_dir, "meta.json")
        with open(tmp_meta, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp_meta, meta_path)  # last: this is what makes the cache valid
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "packed %d train / %d val tokens (%s) into %s",
        meta["train"]["n_tokens"], meta["val"]["n_tokens"], dtype.name, cache_dir,
    )
    return TokenCache(cache_dir, meta)


__all__ = ["TokenCache", "build_token_cache", "load_valid_cache", "token_dtype"]
