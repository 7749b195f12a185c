"""Reading a JSON file that the whole run depends on (annotations, manifests, work files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastloc.shard.errors import ConversionError


def read_json_object(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object holding ``keys``; anything else is a ConversionError naming the file."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConversionError(f"{path}: {what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object in the {what}, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConversionError(f"{path}: {what} lacks key(s) {', '.join(repr(k) for k in missing)}")
    return data
