"""draftwise: lossless speculative decoding on one shared core."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(*args, **kwargs):
    """Load a model for generation: ``draftwise.load("qwen2.5-coder-0.5b-instruct")``.

    See :class:`draftwise.api.Engine` for the arguments.
    """
    from draftwise.api import Engine

    return Engine.load(*args, **kwargs)
