"""The version of this installation, as `meshnode version` and the control server's GET /key report it."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed distribution's version (pyproject.toml), or 'unknown' when run from a bare tree."""
    try:
        return metadata.version("magicdns-mesh")
    except metadata.PackageNotFoundError:
        return "unknown"
