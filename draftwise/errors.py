"""Exceptions with messages meant for users: one line saying what is wrong and what to do."""
import struct

# what readers of a truncated or corrupt file raise (gguf, transformers, numpy, safetensors' Python side):
# caught where a file is opened and turned into one line naming the file
CORRUPT_FILE_ERRORS = (ValueError, OSError, KeyError, RuntimeError, IndexError, EOFError, struct.error,
                       UnicodeDecodeError)


class DraftwiseError(Exception):
    """Base class: every error draftwise raises on purpose."""


class InstallError(DraftwiseError):
    """A model could not be installed (unknown name, missing part, bad checksum, disk full...)."""


class CheckpointError(DraftwiseError):
    """A checkpoint directory or file is missing, incomplete or corrupt."""


class ConfigError(DraftwiseError, ValueError):
    """An invalid configuration value (sampling parameters, method names, budgets...)."""


class PromptError(DraftwiseError, ValueError):
    """An empty prompt, or one that does not fit the model's context."""


class CacheError(DraftwiseError):
    """A forward or commit that does not fit the KV cache (a draft or sequence too long for it)."""


class DrafterError(DraftwiseError, RuntimeError):
    """A drafter broke the loop's contract (changed the committed cache, a tree with a wrong root)."""
