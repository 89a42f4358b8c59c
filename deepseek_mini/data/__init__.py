"""Data pipeline: reading sources, corpus loading, byte-level BPE, packed token memmaps, LightningDataModule.

Batches are (x, y) LongTensors [B, T] with y = x shifted by one token.
"""

from .corpus import Corpus, CorpusSpec, load_corpus, unread_fields
from .datamodule import ResumableSampler, TextDataModule, TokenWindows
from .packing import TokenCache, build_token_cache, token_dtype
from .sources import EOS_TOKEN, DataError, expand_files, read_text_file, split_large_text
from .tokenizer import get_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "Corpus",
    "CorpusSpec",
    "unread_fields",
    "DataError",
    "ResumableSampler",
    "TextDataModule",
    "TokenCache",
    "TokenWindows",
    "build_token_cache",
    "expand_files",
    "get_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "read_text_file",
    "split_large_text",
    "token_dtype",
    "train_tokenizer",
]
