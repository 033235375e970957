"""Error types whose messages are shown to users as a single line.

The CLI catches ``GeneralistError`` and prints ``error: <message>`` without a traceback, so every
message must say what was wrong *and* what to do about it.
"""

from __future__ import annotations

import errno


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


MAX_ECHO = 80
"""Characters of a user's value an error message repeats; the rest is cut (see :func:`cut`)."""


def cut(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must stay one short line whatever
    the user typed (a 5,000-digit number, a YAML alias bomb)."""
    try:
        text = repr(value) if len(str(value)) <= 10 * limit else repr(str(value)[: 2 * limit])
    except (ValueError, RecursionError):  # str() of a huge int, a deeply nested list
        return f"<a {type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text):,} characters)"


def os_error_message(exc: OSError) -> str:
    """One line for a file the operating system refused: which file, why, and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    why = exc.strerror or type(exc).__name__
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make that folder writable or choose another --out"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space and retry (a stopped run continues with --resume RUN_DIR)"
    elif code == errno.ENAMETOOLONG:
        fix = "use a shorter --name or --out"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where a folder is needed; choose another --out"
    elif code == errno.ELOOP:
        fix = "generalist never writes through symbolic links; remove the link"
    else:
        fix = "check the path and retry"
    return f"cannot use {str(where)[:300]} ({why}); {fix}"
