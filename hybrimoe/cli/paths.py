"""Output paths checked before the work starts: an unwritable path is a one-line error, not a traceback
after minutes of work."""

from __future__ import annotations

import os
from pathlib import Path

from hybrimoe.errors import ConfigError


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """ConfigError unless `path` can be written as a file (its directory exists and is writable)."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: is a directory; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out}: the directory {parent} does not exist")
    if (out.exists() and not os.access(out, os.W_OK)) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: not writable (permission denied)")
    return out


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """ConfigError unless `path` is (or can be created as) a writable directory; creates it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: cannot create the directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: not writable (permission denied)")
    return out
