"""LightningDataModule over packed token memmaps, with a resumable deterministic training order."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepseek_mini.model.loss import IGNORE_INDEX

from .corpus import Corpus, CorpusSpec, load_corpus
from .packing import TokenCache, build_token_cache
from .sources import DataError
from .tokenizer import eos_id, file_sha256, get_tokenizer

log = logging.getLogger(__name__)

# "Endless" sampler length: training is bounded by max_steps, not by epochs.
ENDLESS = 10**12


class TokenWindows(Dataset):
    """Windows of seq_len + 1 tokens at stride seq_len over a packed stream -> (x, y) int64 pairs.

    Holds only the file path, so it pickles cheaply into DataLoader workers; the memmap is opened
    lazily in whichever process reads it.
    """

    def __init__(self, path: str, dtype: np.dtype, n_tokens: int, seq_len: int):
        self.path, self.dtype, self.n_tokens, self.seq_len = path, np.dtype(dtype), int(n_tokens), int(seq_len)
        self._mm = None

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        s = i * self.seq_len
        chunk = torch.from_numpy(self._mm[s : s + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class RankShard(Dataset):
    """This rank's validation windows: `indices` into `windows`; one past the end stands for a padding window
    (the first window's inputs, every label IGNORE_INDEX), which adds no target token to the loss."""

    def __init__(self, windows: Dataset, indices):
        self.windows, self.indices = windows, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        if i < len(self.windows):
            return self.windows[i]
        x, y = self.windows[0]
        return x, torch.full_like(y, IGNORE_INDEX)


class ResumableSampler(Sampler[int]):
    """Endless deterministic shuffled order that can start at any global sample offset.

    Global sample k is item `perm(seed + k // n)[k % n]`, so the stream depends only on (n, seed):
    restarting with `start = samples already consumed` continues exactly where a run stopped.
    Rank r of `world_size` takes k = start + r, start + r + world_size, ... (rank-strided).
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                 length: int = ENDLESS):
        if n <= 0:
            raise ValueError("ResumableSampler needs n > 0")
        self.n, self.seed, self.start, self.length = n, seed, start, length
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        k = self.start + self.rank
        epoch, perm = -1, None
        while True:
            e, i = divmod(k, self.n)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[i])
            k += self.world_size

    def __len__(self) -> int:
        return self.length


def _resolve_spec(spec):
    """Resolve relative file specs against the cwd now (Hydra does not chdir, the user expects it)."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(os.fspath(spec)))
    return [os.path.abspath(os.path.expanduser(os.fspath(s))) for s in spec]


class TextDataModule(L.LightningDataModule):
    """Text -> byte-level BPE -> packed token memmaps -> (x, y) batches.

    Sources: `source="stdlib"` (default, the running interpreter's stdlib *.py, capped at
    `max_chars`, default 6M chars), `"text"` (`train_files`/`val_files`: paths, dirs, globs or lists
    of .txt/.txt.gz/.jsonl[.gz]/.json/.parquet), `"hub"` (`hub_name`, `hub_config`, `hub_split`,
    `hub_val_split`). Without val data a deterministic document-level split (`val_fraction`) is used.

    Training batches come from an endless, deterministic, resumable sampler: the Trainer must be
    created with ``use_distributed_sampler=False`` (the sampler shards by rank itself), bounded by
    ``max_steps``, and validation scheduled with an integer ``val_check_interval`` (an "epoch"
    never ends). On resume the stream continues at the sample count stored in the checkpoint
    (``state_dict()["samples_seen"]``), so a resume with another ``batch_size`` neither repeats nor skips
    samples; checkpoints without it fall back to ``global_step`` x the global batch.

    After ``prepare_data()``/``setup()`` (or the ``prepare()`` shortcut): ``.tokenizer``,
    ``.vocab_size`` (the tokenizer's real size), ``.eos_token_id``, ``.tokenizer_path``,
    ``.train_tokens``, ``.val_tokens`` (memmaps) and ``describe()``.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        tokenizer_path: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
        num_proc: int = 1,
        seed: int = 1234,
        **corpus,
    ):
        """`corpus`: the fields of `CorpusSpec` (source, train_files, val_files, hub_name, hub_config, hub_split,
        hub_val_split, text_field, val_fraction, max_chars, cache_dir) as keywords, with its defaults."""
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        spec = CorpusSpec(**corpus)
        hub_name = spec.hub_name
        # a local path given as hub_name is resolved too; a Hub id ("org/name") is left alone
        if hub_name and os.path.exists(os.path.expanduser(hub_name)):
            hub_name = os.path.abspath(os.path.expanduser(hub_name))
        self.corpus_spec = replace(
            spec, train_files=_resolve_spec(spec.train_files), val_files=_resolve_spec(spec.val_files),
            hub_name=hub_name, cache_dir=_resolve_spec(spec.cache_dir),
        )
        vars(self).update(asdict(self.corpus_spec))  # dm.source, dm.train_files, ..., dm.cache_dir as attributes too
        self.requested_vocab_size = vocab_size
        self.requested_tokenizer_path = _resolve_spec(tokenizer_path)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers, self.pin_memory, self.num_proc = num_workers, pin_memory, max(1, int(num_proc))
        if persistent_workers is None:  # keep workers alive between val/train switches when there are any
            persistent_workers = num_workers > 0
        self.persistent_workers = bool(persistent_workers and num_workers > 0)
        self.seed = seed

        self.corpus: Corpus | None = None
        self.tokenizer = None
        self.tokenizer_path: str | None = None
        self.vocab_size: int | None = None
        self.eos_token_id: int | None = None
        self.token_cache: TokenCache | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self.train_start_sample = 0
        self._start_step = 0  # trainer.global_step when the current train loader started
        self._samples_per_step = 0  # samples all ranks consume per optimizer step
        self._resume_samples: int | None = None  # samples_seen from the checkpoint being resumed
        self._ckpt_state: dict | None = None

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        """Load corpus, get tokenizer, get token cache (each step reuses its cache when valid)."""
        if self.token_cache is not None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        corpus = load_corpus(self.corpus_spec)
        log.info(
            "corpus %s: %d train docs (%d chars), %d val docs (%d chars)",
            corpus.description, corpus.train_docs, corpus.train_chars, corpus.val_docs, corpus.val_chars,
        )
        tok, tok_path = get_tokenizer(corpus, self.cache_dir, self.requested_vocab_size, self.requested_tokenizer_path)
        cache = build_token_cache(corpus, tok, tok_path, self.cache_dir, num_proc=self.num_proc)
        self._check_sizes(cache, corpus)
        self.corpus, self.tokenizer, self.tokenizer_path, self.token_cache = corpus, tok, tok_path, cache
        self.vocab_size = tok.get_vocab_size()
        self.eos_token_id = eos_id(tok, tok_path)
        self.train_tokens = cache.open("train")
        self.val_tokens = cache.open("val")
        self._check_ckpt_state()

    def _check_sizes(self, cache: TokenCache, corpus: Corpus) -> None:
        n_train, n_val = cache.n_tokens("train"), cache.n_tokens("val")
        need = self.batch_size * self.seq_len + 1
        if n_train < need:
            raise DataError(
                f"training data {corpus.description} is too small: {n_train} tokens, need at least {need} "
                f"for one batch (batch_size={self.batch_size} x seq_len={self.seq_len} + 1); "
                f"add data or lower data.seq_len / data.batch_size"
            )
        if n_val < self.seq_len + 1:
            raise DataError(
                f"validation data of {corpus.description} is too small: {n_val} tokens, need at least "
                f"{self.seq_len + 1} (seq_len + 1); raise data.val_fraction or give data.val_files"
            )

    def prepare_data(self) -> None:
        """Build (or find) the tokenizer and token caches. Lightning runs this on one rank per node."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Open the memmaps (on every rank); builds the caches first if prepare_data did not run here."""
        self._build()
        if self.train_dataset is None:
            c = self.token_cache
            self.train_dataset = TokenWindows(c.path("train"), c.dtype, c.n_tokens("train"), self.seq_len)
            self.val_dataset = TokenWindows(c.path("val"), c.dtype, c.n_tokens("val"), self.seq_len)

    def prepare(self) -> TextDataModule:
        """prepare_data() + setup() for non-Lightning code (eval, scripts); returns self."""
        self.prepare_data()
        self.setup("fit")
        return self

    # ------------------------------------------------------------------ loaders
    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers,
        }

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        start, rank, world = 0, 0, 1
        trainer = self.trainer
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
            connector = getattr(trainer, "_accelerator_connector", None)
            if world > 1 and getattr(connector, "use_distributed_sampler", False):
                raise RuntimeError(
                    "TextDataModule shards by rank itself: create the Trainer with use_distributed_sampler=False"
                )
            # samples consumed so far by all ranks: from the checkpoint (restored, with global_step, before
            # Lightning calls train_dataloader()), so a resumed run continues the stream whatever its batch size
            self._samples_per_step = self.batch_size * trainer.accumulate_grad_batches * world
            self._start_step = trainer.global_step
            start = trainer.global_step * self._samples_per_step
            if self._resume_samples is not None and trainer.global_step > 0:
                start = self._resume_samples
        self.train_start_sample = start
        if start:
            log.info("resuming training data stream at sample %d (global step %d)", start, trainer.global_step)
        sampler = ResumableSampler(len(self.train_dataset), seed=self.seed, start=start, rank=rank, world_size=world)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        ds = self.val_dataset
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # in order, rank-strided, an equal count per rank (uneven shards could stall collectives): the last round
            # is filled up with windows whose labels are all ignored, so every window counts exactly once and the
            # ranks together validate on the same windows as one process (and eval.py) does
            w = trainer.world_size
            ds = RankShard(ds, range(trainer.global_rank, -(-len(ds) // w) * w, w))
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, drop_last=False, **self._loader_kwargs())

    # ------------------------------------------------------------------ reporting / checkpoints
    def settings_hash(self) -> str:
        # every CorpusSpec field but cache_dir, and what decides the tokens and their order
        spec = {k: v for k, v in asdict(self.corpus_spec).items() if k != "cache_dir"}
        spec.update(requested_vocab_size=self.requested_vocab_size, seq_len=self.seq_len, seed=self.seed)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """Summary for logging (available after prepare_data/setup)."""
        self._build()
        c, tc = self.corpus, self.token_cache
        return {
            "source": c.description,
            "train_docs": c.train_docs,
            "val_docs": c.val_docs,
            "train_chars": c.train_chars,
            "val_chars": c.val_chars,
            "train_tokens": tc.n_tokens("train"),
            "val_tokens": tc.n_tokens("val"),
            "chars_per_token": round(c.train_chars / max(1, tc.n_tokens("train")), 3),
            "invalid_utf8_replaced": c.n_invalid_utf8,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "tokenizer_path": self.tokenizer_path,
            "token_cache": tc.dir,
            "seq_len": self.seq_len,
            "train_windows": len(self.train_dataset) if self.train_dataset is not None else None,
            "val_windows": len(self.val_dataset) if self.val_dataset is not None else None,
        }

    def samples_seen(self) -> int:
        """Training samples consumed by all ranks since the run began (cumulative over resumes)."""
        trainer = self.trainer
        if trainer is None or not self._samples_per_step:  # no training loader built (e.g. nothing left to train)
            return self._resume_samples if self._resume_samples is not None else self.train_start_sample
        return self.train_start_sample + (trainer.global_step - self._start_step) * self._samples_per_step

    def state_dict(self) -> dict:
        state = {"settings_hash": self.settings_hash(), "samples_seen": self.samples_seen(),
                 "batch_size": self.batch_size}
        if self.tokenizer_path and os.path.isfile(self.tokenizer_path):
            state["tokenizer_sha"] = file_sha256(self.tokenizer_path)
            state["tokenizer_path"] = self.tokenizer_path
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # checked once the tokenizer is known (restore may happen before prepare_data on this rank)
        self._ckpt_state = dict(state_dict)
        self._resume_samples = state_dict.get("samples_seen")
        if "batch_size" in state_dict and state_dict["batch_size"] != self.batch_size:
            log.info("data.batch_size %s -> %d: the data stream continues at sample %s", state_dict["batch_size"],
                     self.batch_size, self._resume_samples)
        if self.tokenizer_path:
            self._check_ckpt_state()

    def _check_ckpt_state(self) -> None:
        st = self._ckpt_state
        if not st:
            return
        if st.get("settings_hash") not in (None, self.settings_hash()):
            warnings.warn(
                "data settings differ from the checkpoint's; the resumed data order will differ", stacklevel=2
            )
        sha = st.get("tokenizer_sha")
        if sha and self.tokenizer_path and sha != file_sha256(self.tokenizer_path):
            warnings.warn(
                f"tokenizer {self.tokenizer_path} differs from the checkpoint's ({st.get('tokenizer_path')}); "
                "token ids will not match the trained model",
                stacklevel=2,
            )
        self._ckpt_state = None


__all__ = ["ENDLESS", "ResumableSampler", "TextDataModule", "TokenWindows"]
