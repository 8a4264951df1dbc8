"""Files written whole or not at all: keys, certificates and the small state files beside them.

`os.write` may write less than it was asked (a file size limit, a disk filling up); a caller that does not read
its count renamed a key cut short into place as if whole, and every later start failed on it, or used it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["write_atomic", "write_synced"]


def write_synced(path: Path, data: bytes, mode: int) -> None:
    """Create path (it must not exist) with mode set before any data, write all of data, and fsync it; a write
    that cannot go on raises."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or widened it: be explicit
        view = memoryview(data)
        while view:  # a short write is followed by one that raises (EFBIG, ENOSPC)
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace path with data through a synced temp file beside it (`.<name>.tmp`), so a reader sees the old file
    or the new one, whole; on any failure the temp file is removed and path is as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash mid-write
    try:
        write_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
