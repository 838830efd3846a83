"""The installed KiCI version (kept apart so the CLI can print it without importing the web stack)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version


def kici_version() -> str:
    try:
        return _dist_version("kici")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
