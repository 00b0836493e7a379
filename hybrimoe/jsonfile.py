"""Reading a JSON object file given by the user (config.json, a cost profile), with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hybrimoe.errors import ConfigError


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in `path`; ConfigError naming `what` and the file if it is unreadable, not
    JSON (with the line), or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cannot read {what} {path}: line {exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data
