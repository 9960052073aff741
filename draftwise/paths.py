"""Where draftwise keeps what it builds or downloads: one cache root (``DRAFTWISE_CACHE``, default
``~/.cache/draftwise``) with one folder per kind (models, gguf, quant, kernels, costs, vocab)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DRAFTWISE_CACHE"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "draftwise"


def cache_dir(kind: str) -> Path:
    """The cache folder of one kind of artifact (not created)."""
    return cache_root() / kind
