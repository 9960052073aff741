"""Draft models with another tokenizer: lossless speculative decoding across vocabularies
(Timor et al., ICML 2025, arXiv 2502.05202).

Terms
- token bytes: the text a token stands for, as bytes, with each tokenizer's convention undone:
  byte-level BPE (GPT-2's byte-to-unicode table, 'Ġ' is a space) or SentencePiece style ('▁' is a
  space, '<0xNN>' a byte-fallback token). An added (special) token stands for its own content and
  matches only another added token with the same content.
- shared vocabulary: the (target id, draft id) pairs whose token bytes are equal. TLI (token-level
  intersection) drafts over the shared tokens only, so every draft token is one target token; the
  draft's distribution restricted to them and renormalised is the q that sampling verification uses.
- draft text: the draft model's own tokens for the committed text (its cache rows). ``DraftText.sync``
  keeps them close to what the draft's tokenizer would make of the text: each catch-up re-encodes
  the tail from a safe boundary (a token that starts a word or a line) with the new text appended;
  the rows from the first token that changed on are fed again (the catch-up forward feeds them
  anyway, a few rows more). Text that does not re-encode to the same bytes (a split UTF-8
  character, a tokenizer that adds a prefix space) falls back to a per-token map, which always
  exists: each target token's bytes, split greedily into the longest draft tokens.
- string-level drafting: the draft's own continuation decoded to bytes and encoded with the target's
  tokenizer; those target tokens are proposals checked with the deterministic rule, which is exact
  for greedy and sampled decoding alike.

The bridge is built from the two tokenizers when an engine loads a pair (about 0.9 s for Qwen2.5 x
SmolLM2, of a load that takes several seconds; hashing both vocabularies to look up a stored copy
would take half of that) and kept for the engine's life.
"""
from __future__ import annotations

import json
import re

import torch

from draftwise.errors import ConfigError

MIN_SHARED = 0.25        # a pair must share this fraction of the smaller vocabulary's tokens (TLI drafts only those)
TAIL_TOKENS = 8          # the draft text re-encoded at each catch-up reaches back at most this many tokens
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted (the table byte-level BPE tokenizers use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = dict(zip(keep, keep))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _style(tokenizer) -> str:
    """'byte' (byte-level BPE) or 'sp' (SentencePiece conventions); other tokenizers are refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer; a cross-vocabulary draft needs one")
    parts = json.dumps([json.loads(c.__getstate__()) if c is not None else None
                        for c in (backend.decoder, backend.pre_tokenizer)])
    if '"ByteLevel"' in parts:
        return "byte"
    if '"Metaspace"' in parts or '"ByteFallback"' in parts or "\u2581" in parts:
        return "sp"
    raise ConfigError("a cross-vocabulary draft needs byte-level BPE or SentencePiece-style tokenizers; "
                      f"{type(tokenizer).__name__} is neither")


class TokenTable:
    """One tokenizer's tokens as bytes: ``raw[i]`` the bytes token i stands for (b'' for ids without a
    token), ``special[i]`` whether it is an added token; encoding of bytes back into ids."""

    def __init__(self, tokenizer, rows: int):
        self.tokenizer, self.rows = tokenizer, rows
        self.style = _style(tokenizer)
        self.backend = tokenizer.backend_tokenizer
        added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
        self.raw: list[bytes] = [b""] * rows
        self.special = [False] * rows
        dec = _byte_decoder() if self.style == "byte" else None
        for s, i in tokenizer.get_vocab().items():
            if not 0 <= i < rows:
                continue
            if i in added:
                self.raw[i], self.special[i] = added[i].encode(), True
            elif dec is not None:
                self.raw[i] = bytes(dec[c] for c in s) if all(c in dec for c in s) else s.encode()
            else:
                m = _BYTE_TOKEN.match(s)
                self.raw[i] = bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode()
        # ordinary tokens by their bytes (the lowest id when two tokens spell the same bytes)
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.raw):
            if b and not self.special[i]:
                self.by_bytes.setdefault(b, i)
        self.longest = max((len(b) for b in self.by_bytes), default=1)
        self.unk = tokenizer.unk_token_id

    def text(self, ids) -> bytes:
        return b"".join(self.raw[i] for i in ids)

    def encode(self, data: bytes) -> list[int] | None:
        """The tokenizer's own ids for these bytes, or None when they do not re-encode to exactly the
        same bytes (a split UTF-8 character, a normaliser, a prefix space the tokenizer adds)."""
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        ids = self.backend.encode(s, add_special_tokens=False).ids
        return ids if self.text(ids) == data else None

    def greedy(self, data: bytes) -> list[int]:
        """The bytes split into the longest ordinary tokens, left to right (always succeeds for a
        tokenizer that covers every byte; an uncovered byte becomes the unknown token or is skipped)."""
        out, i = [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                tok = self.by_bytes.get(data[i:i + n])
                if tok is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                if self.unk is not None:
                    out.append(int(self.unk))
                i += 1
        return out


class VocabBridge:
    """The map between a target's vocabulary and a draft's.

    ``t2d`` [V_target] long: the draft id of each shared target token, -1 elsewhere; ``d2t`` [V_draft]
    the converse; ``shared`` [S] the shared target ids, ascending."""

    def __init__(self, target_tok, draft_tok, target_rows: int, draft_rows: int):
        self.t, self.d = TokenTable(target_tok, target_rows), TokenTable(draft_tok, draft_rows)
        draft_key = {}
        for i, b in enumerate(self.d.raw):
            if b:
                draft_key.setdefault((self.d.special[i], b), i)
        self.t2d = torch.full((target_rows,), -1, dtype=torch.long)
        self.d2t = torch.full((draft_rows,), -1, dtype=torch.long)
        for i, b in enumerate(self.t.raw):
            j = draft_key.get((self.t.special[i], b)) if b else None
            if j is not None and self.d2t[j] < 0:
                self.t2d[i], self.d2t[j] = j, i
        self.shared = torch.nonzero(self.t2d >= 0).flatten()
        self._to_draft: dict[int, tuple[int, ...]] = {}
        self._t2d_dev: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return int(self.shared.numel())

    def check(self, target: str, draft: str) -> None:
        """A one-line error when the pair shares too little for TLI to propose anything useful."""
        smaller = min(len(self.t.by_bytes), len(self.d.by_bytes))
        if self.size < MIN_SHARED * smaller:
            raise ConfigError(f"draft model {draft!r} shares only {self.size} tokens with target {target!r} "
                              f"({self.size / max(smaller, 1):.0%} of the smaller vocabulary, need "
                              f"{MIN_SHARED:.0%}): too few to draft with")

    def t2d_on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._t2d_dev:
            self._t2d_dev[key] = self.t2d.to(device)
        return self._t2d_dev[key]

    def to_draft(self, ids) -> list[int]:
        """Target ids -> draft ids token by token (a shared token maps to itself; any other is split
        greedily into draft tokens). Cached per target id."""
        out: list[int] = []
        for i in ids:
            m = self._to_draft.get(i)
            if m is None:
                j = int(self.t2d[i]) if 0 <= i < self.t.rows else -1
                m = (j,) if j >= 0 else tuple(self.d.greedy(self.t.raw[i] if 0 <= i < self.t.rows else b""))
                self._to_draft[i] = m
            out.extend(m)
        return out

    def to_target(self, draft_ids) -> list[int]:
        """A draft continuation -> target ids for the same text (string-level drafting): the text up to
        its last whole UTF-8 character, encoded by the target's tokenizer; a special draft token ends
        it (kept when the target shares it)."""
        ids, tail = [], []
        for j in draft_ids:
            if self.d.special[j]:
                tail = [int(self.d2t[j])] if self.d2t[j] >= 0 else []
                break
            ids.append(j)
        data = _whole_chars(self.d.text(ids))
        if not data:
            return tail
        enc = self.t.encode(data)
        return (enc if enc is not None else self.t.greedy(data)) + tail

    def describe(self) -> dict:
        return {"shared_tokens": self.size, "target_vocab": len(self.t.by_bytes), "draft_vocab": len(self.d.by_bytes)}


def _whole_chars(data: bytes) -> bytes:
    """data without a trailing incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return data                      # ASCII: complete
        if b >= 0xC0:                        # a lead byte: complete when its sequence fits
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


class DraftText:
    """The draft's tokens for the committed text (its cache rows, in order), re-synced at each catch-up."""

    def __init__(self, bridge: VocabBridge):
        self.bridge = bridge
        self.ids: list[int] = []
        self.fed_total = self.refed_total = 0   # rows fed by sync, and of those the ones fed again (re-sync cost)

    def reset(self) -> None:
        self.ids = []

    def _boundary(self) -> int:
        """Where re-encoding starts: the last token within TAIL_TOKENS that begins a word or a line (with the
        whitespace-only tokens before it)."""
        raw, special = self.bridge.d.raw, self.bridge.d.special
        lo = max(0, len(self.ids) - TAIL_TOKENS)
        for i in range(len(self.ids) - 1, lo - 1, -1):
            b = raw[self.ids[i]]
            if special[self.ids[i]] or b[:1] in (b" ", b"\n", b"\t"):
                while i > lo and not raw[self.ids[i - 1]].strip() and not special[self.ids[i - 1]]:
                    i -= 1                   # not inside a run of whitespace: how it splits depends on what follows
                return i
        return lo

    def sync(self, new: list[int]) -> tuple[int, list[int]]:
        """The target committed ``new`` (target ids) after the text ``ids`` stands for. Returns (how many of
        ``ids`` stay as they are, the draft ids to feed after them); never feeds nothing."""
        b = self.bridge
        start = self._boundary()
        old = self.ids[start:]
        enc = b.d.encode(b.d.text(old) + b.t.text(new))
        if enc is None:
            enc = old + b.to_draft(new)
        c = 0
        while c < min(len(old), len(enc)) and old[c] == enc[c]:
            c += 1
        keep, feed = start + c, enc[c:]
        if not feed:                         # the new tokens spell no bytes: feed the last row again
            if keep == 0:
                feed = [b.d.unk if b.d.unk is not None else 0]
            else:
                keep, feed = keep - 1, self.ids[keep - 1:keep]
        self.refed_total += len(self.ids) - keep
        self.fed_total += len(feed)
        self.ids = self.ids[:keep] + feed
        return keep, feed
