"""Byte-level BPE: train on the training split, cache by content + settings, or load a given file.

Byte-level means every byte sequence is encodable (no <unk>), so code, prose and broken UTF-8 all
round-trip. `<|endoftext|>` is the first special token (id 0) and separates documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import Corpus, iter_texts
from .sources import EOS_TOKEN, DataError

log = logging.getLogger(__name__)

# Training BPE on more than ~20 MB of text buys little for a small vocab and costs minutes on CPU.
TOKENIZER_TRAIN_CHARS = 20_000_000
# Bump when the training recipe changes, so old cached tokenizers are not reused.
TOKENIZER_FORMAT = 1
# Fallback end-of-document names for user-supplied tokenizers that lack <|endoftext|>.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eos_id(tok: Tokenizer, where: str = "tokenizer") -> int:
    for name in _EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"{where} has no end-of-document token (looked for {', '.join(_EOS_CANDIDATES)})")


def tokenizer_cache_key(corpus: Corpus, vocab_size: int, train_chars: int = TOKENIZER_TRAIN_CHARS) -> str:
    """Key = training text + settings; the description covers the source spec and max_chars."""
    spec = json.dumps(
        {
            "train_hash": corpus.train_hash,
            "vocab_size": vocab_size,
            "source": corpus.description,
            "train_chars": train_chars,
            "format": TOKENIZER_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def new_bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: code and text are not word lists, don't invent leading spaces.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts, vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as id 0 on an iterator of strings."""
    min_vocab = 257  # 256 byte symbols + <|endoftext|>
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need >= {min_vocab})")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        # all 256 bytes from the start: any input is encodable even if unseen in training
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == 0
    return tok


def _atomic_save(tok: Tokenizer, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tokenizer.", suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _try_load(path: str) -> Tokenizer | None:
    """Load a cached tokenizer; None (so it gets rebuilt) if it is missing or garbled."""
    if not os.path.isfile(path):
        return None
    try:
        tok = Tokenizer.from_file(path)
        if tok.token_to_id(EOS_TOKEN) is None:
            raise ValueError(f"no {EOS_TOKEN} token")
        return tok
    except Exception as e:  # noqa: BLE001 - any failure means "rebuild"
        log.warning("cached tokenizer %s is unreadable (%s); retraining", path, e)
        return None


def load_tokenizer(path: str) -> Tokenizer:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise DataError(f"could not load tokenizer {path}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    eos_id(tok, path)
    return tok


def get_tokenizer(
    corpus: Corpus,
    cache_dir: str,
    vocab_size: int,
    tokenizer_path: str | None = None,
    train_chars: int = TOKENIZER_TRAIN_CHARS,
) -> tuple[Tokenizer, str]:
    """Return (tokenizer, path to its tokenizer.json), training and caching it if needed."""
    if tokenizer_path:
        path = os.path.abspath(os.path.expanduser(tokenizer_path))
        tok = load_tokenizer(path)
        log.info("using tokenizer %s (vocab %d)", path, tok.get_vocab_size())
        return tok, path
    key = tokenizer_cache_key(corpus, vocab_size, train_chars)
    path = os.path.join(cache_dir, "tokenizers", key, "tokenizer.json")
    tok = _try_load(path)
    if tok is not None:
        log.info("reusing cached tokenizer at %s", path)
        return tok, path
    n = min(corpus.train_chars, train_chars)
    log.info("training tokenizer on %d chars (vocab_size=%d)", n, vocab_size)
    tok = train_tokenizer(iter_texts(corpus.train, max_chars=train_chars), vocab_size)
    _atomic_save(tok, path)
    log.info("saved tokenizer (vocab %d) to %s", tok.get_vocab_size(), path)
    return tok, path


__all__ = ["TOKENIZER_TRAIN_CHARS", "eos_id", "file_sha256", "get_tokenizer", "load_tokenizer", "train_tokenizer"]
