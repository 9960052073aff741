"""A retrieval datastore (REST, arXiv 2311.08252): a token stream with a suffix array, searched
for the longest suffix of the context, whose continuations become draft candidates.

Terms
- stream: every document's tokens, each followed by a separator (a value outside the
  vocabulary, so no match ever crosses a document boundary), stored **reversed**.
- suffix array: the start of every suffix of the reversed stream, in lexicographic order. The
  context's suffixes of every length are prefixes of one pattern, the reversed context, so one
  binary search finds the longest one that occurs (the longest common prefix with the pattern
  is reached at a neighbour of its insertion point) and two more find all of its occurrences.
- continuation: the tokens that follow an occurrence in the forward text (read backwards in the
  reversed stream), cut at the document's end.
- overlay: text added while the engine runs (online growth, SuffixDecoding arXiv 2411.04975),
  searched by brute force next to the file; lost when the process ends.

File layout (one file, written to a temporary name and renamed when complete): b"DWDS", a
little-endian u32 header length, a JSON header (format version, tokenizer fingerprint, vocabulary
size, separator, token and document counts, dtypes, a BLAKE2b checksum of the arrays, sources),
padding to 64 bytes, the reversed stream [N] int32, the suffix array [N] int32 or int64. Loading
memory-maps both arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from draftwise import kernels
from draftwise.corpora import sharegpt_texts, stdlib_files
from draftwise.errors import CheckpointError, ConfigError

MAGIC = b"DWDS"
VERSION = 1
ALIGN = 64
MAX_MATCH = 16                   # longest context suffix searched (REST: 16 down to 2)
MIN_MATCH = 2
SEPARATOR = 2**31 - 1            # between documents: no token id, so no match crosses a boundary


# ---------------------------------------------------------------- search primitives
def _compare(stream: np.ndarray, start: int, pattern: np.ndarray) -> tuple[int, int]:
    """(sign, lcp): how the suffix at ``start`` compares with ``pattern`` on len(pattern) tokens
    (-1 smaller, 0 equal, 1 larger; a suffix that ends first is smaller) and their common prefix."""
    seg = stream[start: start + pattern.size]
    n = seg.size
    diff = np.flatnonzero(seg != pattern[:n])
    if diff.size:
        j = int(diff[0])
        return (-1 if seg[j] < pattern[j] else 1), j
    return (0 if n == pattern.size else -1), n


def _bound(stream: np.ndarray, sa: np.ndarray, pattern: np.ndarray, upper: bool, lo: int = 0, hi: int | None = None) -> int:
    """First suffix-array index in [lo, hi) whose suffix is >= pattern (upper: > pattern) on
    len(pattern) tokens."""
    hi = sa.size if hi is None else hi
    while lo < hi:
        mid = (lo + hi) // 2
        sign, _ = _compare(stream, int(sa[mid]), pattern)
        if sign < 0 or (upper and sign == 0):
            lo = mid + 1
        else:
            hi = mid
    return lo


def longest_match(stream: np.ndarray, sa: np.ndarray, pattern: np.ndarray, min_len: int,
                  native: bool = True) -> tuple[int, int, int]:
    """(length, lo, hi): the longest prefix of pattern (>= min_len tokens) that occurs in the
    stream and the suffix-array range [lo, hi) of its occurrences; (0, 0, 0) when none does.
    native: the kernel library's search (~50x faster than this function's numpy form, which is
    its reference) where the library is available."""
    if sa.size == 0 or pattern.size < min_len:
        return 0, 0, 0
    lib = kernels.library() if native else None
    if (lib is not None and stream.dtype == np.int32 and sa.dtype in (np.int32, np.int64)
            and stream.flags.c_contiguous and sa.flags.c_contiguous):
        pat = np.ascontiguousarray(pattern, dtype=np.int32)
        out = np.zeros(3, np.int64)
        lib.dw_sa_longest_match(stream.ctypes.data, stream.size, sa.ctypes.data, int(sa.dtype == np.int64),
                                pat.ctypes.data, pat.size, min_len, out.ctypes.data)
        return int(out[0]), int(out[1]), int(out[2])
    i = _bound(stream, sa, pattern, upper=False)
    best = 0
    for j in (i - 1, i):
        if 0 <= j < sa.size:
            best = max(best, _compare(stream, int(sa[j]), pattern)[1])
    if best < min_len:
        return 0, 0, 0
    p = pattern[:best]
    lo = _bound(stream, sa, p, upper=False, hi=min(i + 1, sa.size))
    hi = _bound(stream, sa, p, upper=True, lo=max(lo, i - 1))
    return best, lo, hi


def brute_force_matches(stream: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start positions of pattern in stream (numpy, no index): for small streams and tests."""
    m = pattern.size
    if m == 0 or stream.size < m:
        return np.empty(0, dtype=np.int64)
    cand = np.flatnonzero(stream[: stream.size - m + 1] == pattern[0])
    for j in range(1, m):
        if cand.size == 0:
            break
        cand = cand[stream[cand + j] == pattern[j]]
    return cand


def continuations_at(stream: np.ndarray, starts: np.ndarray, length: int, max_len: int, separator: int) -> list[list[int]]:
    """Forward continuations of the matches of ``length`` tokens at reversed positions ``starts``:
    the tokens before each start in the reversed stream, read backwards, cut at a separator."""
    if starts.size == 0 or max_len < 1:
        return []
    idx = starts[:, None] - 1 - np.arange(max_len)[None, :]              # [m, max_len]
    ok = idx >= 0
    toks = np.where(ok, stream[np.clip(idx, 0, None)], separator)
    stop = np.cumsum(toks == separator, axis=1) > 0
    lens = (~stop).sum(1)
    return [toks[r, : lens[r]].tolist() for r in range(toks.shape[0]) if lens[r] > 0]


def _evenly(lo: int, hi: int, k: int) -> np.ndarray:
    """Up to k indices spread evenly over [lo, hi) (a fair sample of the occurrences' counts)."""
    n = hi - lo
    if n <= k:
        return np.arange(lo, hi)
    return lo + (np.arange(k) * n) // k


# ---------------------------------------------------------------- the datastore
class Datastore:
    """A loaded datastore (memory-mapped) plus an in-memory overlay that online growth extends."""

    def __init__(self, stream: np.ndarray, sa: np.ndarray, header: dict, path: Path | None = None):
        self.stream, self.sa, self.header, self.path = stream, sa, header, path
        self.separator = int(header["separator"])
        self._overlay: list[np.ndarray] = []
        self._overlay_rev = np.empty(0, dtype=np.int32)   # reversed, separator-terminated documents
        self.overlay_tokens = 0

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None, verify: bool = True) -> "Datastore":
        """Open a datastore file; fingerprint: the tokenizer's (vocab.fingerprint) that must match."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"datastore {path} not found (build one with: draftwise datastore build)")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8 or head[:4] != MAGIC:
                raise CheckpointError(f"{path} is not a draftwise datastore")
            hlen = int.from_bytes(head[4:], "little")
            try:
                header = json.loads(f.read(hlen))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"datastore {path} has a corrupt header") from None
        if not isinstance(header, dict) or header.get("version") != VERSION:
            raise CheckpointError(f"datastore {path} has format version {header.get('version') if isinstance(header, dict) else '?'}, "
                                  f"this draftwise reads version {VERSION}: rebuild it")
        n, sa_dtype, sep = header.get("tokens"), header.get("sa_dtype"), header.get("separator")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or sa_dtype not in ("int32", "int64") \
                or isinstance(sep, bool) or not isinstance(sep, int):
            raise CheckpointError(f"datastore {path} has a corrupt header (tokens {n!r}, sa_dtype {sa_dtype!r}, "
                                  f"separator {sep!r}): rebuild it")
        off = _align(8 + hlen)
        sa_dtype = np.dtype(sa_dtype)
        need = off + 4 * n + sa_dtype.itemsize * n
        if size != need:
            raise CheckpointError(f"datastore {path} is truncated or corrupt ({size} bytes, expected {need})")
        if fingerprint is not None and header.get("tokenizer") != fingerprint:
            raise ConfigError(f"datastore {path} was built with another tokenizer ({header.get('model', '?')}, "
                              f"fingerprint {header.get('tokenizer')}); rebuild it for this model")
        stream = np.memmap(path, dtype=np.int32, mode="r", offset=off, shape=(n,)) if n else np.empty(0, np.int32)
        sa = (np.memmap(path, dtype=sa_dtype, mode="r", offset=off + 4 * n, shape=(n,)) if n
              else np.empty(0, sa_dtype))
        if verify and _checksum(stream, sa) != header.get("checksum"):
            raise CheckpointError(f"datastore {path} is corrupt (checksum mismatch): rebuild it")
        return cls(stream, sa, header, path)

    @classmethod
    def empty(cls, vocab_size: int, fingerprint: str | None = None) -> "Datastore":
        """No file: an overlay-only store that online growth fills."""
        header = {"version": VERSION, "tokenizer": fingerprint, "vocab_size": vocab_size, "separator": SEPARATOR,
                  "tokens": 0, "documents": 0, "sa_dtype": "int32", "sources": []}
        return cls(np.empty(0, np.int32), np.empty(0, np.int32), header)

    @property
    def size(self) -> int:
        return int(self.header["tokens"])

    # -------------------------------------------------------------- online growth
    def add(self, tokens: Iterable[int]) -> None:
        """Add a document (e.g. a generated answer) to the in-memory overlay."""
        a = np.asarray(list(tokens), dtype=np.int32)
        if a.size < MIN_MATCH + 1:
            return
        self._overlay.append(a)
        self.overlay_tokens += a.size
        self._overlay_rev = np.concatenate([np.asarray([self.separator], np.int32), a[::-1], self._overlay_rev])

    # -------------------------------------------------------------- retrieval
    def retrieve(self, context: np.ndarray, max_conts: int = 64, max_len: int = 16,
                 max_match: int = MAX_MATCH, min_match: int = MIN_MATCH) -> tuple[int, list[list[int]]]:
        """(match length, continuations): continuations of the longest suffix of ``context`` (between
        min_match and max_match tokens) found in the file or the overlay; the longer match wins,
        and on a tie both sources contribute."""
        pattern = np.ascontiguousarray(np.asarray(context[-max_match:], dtype=np.int32)[::-1])
        n_file, lo, hi = longest_match(self.stream, self.sa, pattern, min_match)
        n_over, over_starts = self._overlay_match(pattern, min_match)
        n = max(n_file, n_over)
        if n == 0:
            return 0, []
        conts: list[list[int]] = []
        if n_over == n:
            conts += continuations_at(self._overlay_rev, over_starts[:max_conts], n, max_len, self.separator)
        if n_file == n and len(conts) < max_conts:
            starts = np.asarray(self.sa[_evenly(lo, hi, max_conts - len(conts))], dtype=np.int64)
            conts += continuations_at(self.stream, starts, n, max_len, self.separator)
        return n, conts

    def _overlay_match(self, pattern: np.ndarray, min_match: int) -> tuple[int, np.ndarray]:
        rev = self._overlay_rev
        if rev.size == 0:
            return 0, np.empty(0, np.int64)
        for n in range(pattern.size, min_match - 1, -1):
            hits = brute_force_matches(rev, pattern[:n])
            if hits.size:
                return n, hits
        return 0, np.empty(0, np.int64)

    def describe(self) -> dict:
        h = {k: v for k, v in self.header.items() if k != "sources"}
        h["sources"] = len(self.header.get("sources", []))
        h["overlay_tokens"] = self.overlay_tokens
        return h


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _checksum(stream: np.ndarray, sa: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for arr in (stream, sa):
        mv = memoryview(np.ascontiguousarray(arr)).cast("B")
        for i in range(0, mv.nbytes, 1 << 24):
            h.update(mv[i: i + (1 << 24)])
    return h.hexdigest()


# ---------------------------------------------------------------- building
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json", ".jsonl"}


def _conversation_text(obj) -> str | None:
    """Text of one JSON record: ShareGPT {"conversations": [{"value"}]}, {"messages": [{"content"}]}
    or {"text"}."""
    if not isinstance(obj, dict):
        return None
    for key, field in (("conversations", "value"), ("messages", "content")):
        turns = obj.get(key)
        if isinstance(turns, list):
            parts = [t.get(field) for t in turns if isinstance(t, dict) and isinstance(t.get(field), str)]
            return "\n\n".join(parts) if parts else None
    return obj["text"] if isinstance(obj.get("text"), str) else None


def iter_documents(inputs: list[str]) -> Iterator[tuple[str, str]]:
    """(source, text) for every input: a file (plain text or source; .jsonl: one record per line),
    a directory (its text files, recursively), ``stdlib:`` (the standard library's sources) or
    ``sharegpt:`` (ShareGPT conversations past the evaluation split)."""
    for spec in inputs:
        if spec == "stdlib:":
            for f in stdlib_files():
                yield str(f), f.read_text(errors="ignore")
        elif spec == "sharegpt:":
            for i, text in enumerate(sharegpt_texts()):
                yield f"sharegpt:{i}", text
        else:
            p = Path(spec)
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    if f.is_file() and f.suffix in TEXT_SUFFIXES:
                        yield from _file_documents(f)
            elif p.is_file():
                yield from _file_documents(p)
            else:
                raise ConfigError(f"datastore input {spec} not found (a file, a directory, stdlib: or sharegpt:)")


def _file_documents(f: Path) -> Iterator[tuple[str, str]]:
    try:
        text = f.read_text(errors="ignore")
    except OSError as e:
        raise ConfigError(f"cannot read datastore input {f}: {e.strerror}") from None
    if f.suffix == ".jsonl":
        for k, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                doc = _conversation_text(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{f} line {k + 1} is not JSON") from None
            if doc:
                yield f"{f}:{k + 1}", doc
    else:
        yield str(f), text


def tokenize_documents(tokenizer, docs: Iterable[tuple[str, str]], separator: int, max_tokens: int | None = None,
                       progress: bool = True) -> tuple[np.ndarray, int, list[str]]:
    """(forward stream with a separator after every document, document count, sources)."""
    from tqdm import tqdm

    chunks: list[np.ndarray] = []
    sources: list[str] = []
    total = 0
    bar = tqdm(desc="tokenize", unit=" tok", unit_scale=True, disable=not progress)
    batch: list[tuple[str, str]] = []

    def flush() -> bool:
        nonlocal total
        enc = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (src, _), ids in zip(batch, enc):
            if not ids:
                continue
            chunks.append(np.asarray(ids + [separator], dtype=np.int32))
            sources.append(src)
            total += len(ids) + 1
            bar.update(len(ids) + 1)
        batch.clear()
        return max_tokens is not None and total >= max_tokens

    done = False
    for src, text in docs:
        if text.strip():
            batch.append((src, text))
        if len(batch) >= 64 and flush():
            done = True
            break
    if not done and batch:
        flush()
    bar.close()
    stream = np.concatenate(chunks) if chunks else np.empty(0, np.int32)
    if max_tokens is not None and stream.size > max_tokens:
        stream = stream[:max_tokens]
        stream[-1] = separator
    return stream, len(sources), sources


def suffix_array(stream: np.ndarray) -> np.ndarray:
    """Suffix array of an int32 token stream (pydivsufsort; int32 positions below 2^31)."""
    from pydivsufsort import divsufsort

    if stream.size == 0:
        return np.empty(0, np.int32)
    sa = divsufsort(np.ascontiguousarray(stream))
    return sa.astype(np.int32 if stream.size < 2**31 else np.int64, copy=False)


def build(tokenizer, inputs: list[str], out: str | Path, model: str = "", max_tokens: int | None = None,
          progress: bool = True) -> dict:
    """Tokenize the inputs, build the suffix array, write the datastore atomically. Returns its header."""
    from draftwise.vocab import fingerprint

    if not inputs:
        raise ConfigError("datastore build needs at least one --input")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"datastore output {out} is a directory: give a file name")
    probe = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:                                  # fail now, not after tokenizing: can the file be written there?
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"could not write datastore {out}: {e.strerror or e}") from None
    fwd, docs, sources = tokenize_documents(tokenizer, iter_documents(inputs), SEPARATOR, max_tokens, progress)
    if fwd.size == 0:
        raise ConfigError(f"datastore inputs {', '.join(inputs)} contain no text")
    return write(fwd, out, fingerprint(tokenizer), len(tokenizer), model=model, documents=docs, sources=sources,
                 progress=progress)


def write(fwd: np.ndarray, out: str | Path, fingerprint: str, vocab_size: int, model: str = "",
          documents: int | None = None, sources: list[str] | None = None, progress: bool = False) -> dict:
    """Write a datastore for a forward token stream whose documents each end with SEPARATOR."""
    fwd = np.asarray(fwd, dtype=np.int32)
    if fwd.size and fwd[-1] != SEPARATOR:
        fwd = np.concatenate([fwd, np.asarray([SEPARATOR], np.int32)])
    stream = np.ascontiguousarray(fwd[::-1])
    if progress:
        print(f"suffix array over {stream.size:,} tokens ...", flush=True)
    sa = suffix_array(stream)
    sources = sources or []
    header = {"version": VERSION, "tokenizer": fingerprint, "model": model, "vocab_size": int(vocab_size),
              "separator": SEPARATOR, "tokens": int(stream.size),
              "documents": int(documents if documents is not None else (fwd == SEPARATOR).sum()),
              "stream_dtype": "int32", "sa_dtype": str(sa.dtype), "checksum": _checksum(stream, sa),
              "sources": sources[:1000] + ([f"... {len(sources) - 1000} more"] if len(sources) > 1000 else [])}
    blob = json.dumps(header).encode()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    _remove_stale_temporaries(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(blob).to_bytes(4, "little") + blob)
            f.write(b"\0" * (_align(8 + len(blob)) - 8 - len(blob)))
            f.write(stream.tobytes())
            f.write(sa.tobytes())
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"could not write datastore {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return header


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of earlier builds of ``out`` that were killed (their process is gone)."""
    try:
        leftovers = list(out.parent.glob(f".{out.name}.tmp*"))
    except OSError:
        return
    for t in leftovers:
        pid = t.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                t.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
