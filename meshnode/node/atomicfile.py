"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target.

A reader (or a daemon restarted after kill -9) sees either the old content or the new one, never a
torn file. Used for the node's state directory and for the resolv.conf it manages.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o600,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` atomically and durably; the file gets permission bits `mode` (and
    `owner` (uid, gid) when given) before it appears under its name."""
    target = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    # The temporary file must live in the target's directory: rename is only atomic within one
    # filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may be lost on power failure even though the data is safe.
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems (e.g. certain FUSE mounts) refuse fsync on directories
    finally:
        os.close(dfd)
