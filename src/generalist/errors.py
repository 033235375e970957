"""Error types whose messages are shown to users as a single line.

The CLI catches ``GeneralistError`` and prints ``error: <message>`` without a traceback, so every
message must say what was wrong *and* what to do about it.
"""

from __future__ import annotations


class GeneralistError(Exception):
    """Base class of every error the CLI reports as one line."""


class ConfigError(GeneralistError, ValueError):
    """A configuration value is missing, unknown or out of range (raised before any compute)."""


class DataError(GeneralistError, ValueError):
    """A dataset is missing, malformed or unsafe to read."""


class UnsafeFileError(GeneralistError):
    """A file asked to run code or reference something outside the allow-list while being read."""


class CheckpointError(GeneralistError):
    """A checkpoint or weights file is missing, truncated, corrupt or incompatible."""


class TrainingError(GeneralistError):
    """Training cannot continue (for example a non-finite loss)."""
