"""Durable, atomic writes of small secret files (refresh tokens).

A refresh token that rotates must never be lost: the old one is already invalid at
the provider once the new one was issued. So the new one is written to a temporary
file in the same directory, flushed to disk (``fsync``), renamed over the old file
(atomic on POSIX) and the directory entry is flushed too. A crash at any point leaves
either the old file or the new one, never half a token.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["SECRET_FILE_MODE", "read_secret_file", "write_secret_file"]

# Owner read/write only: a refresh token is as good as the account's password.
SECRET_FILE_MODE = 0o600

# A refresh token is a few hundred bytes (Microsoft's are about 1.5 KB, JSON state
# files a little more); anything beyond this is not one of our files.
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: Path) -> str:
    """Read a secret file: its text with surrounding whitespace removed.

    Args:
        path: The file.

    Returns:
        The stripped content (may be empty).

    Raises:
        OSError: it cannot be read.
        ValueError: it is larger than :data:`MAX_SECRET_FILE_BYTES` or not UTF-8.
    """
    with path.open("rb") as f:
        data = f.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    return data.decode("utf-8").strip()


def write_secret_file(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` atomically and durably.

    Args:
        path: The file to write; its directory must exist.
        text: The new content (a newline is appended).
        mode: Permission bits for the file. ``None`` keeps the mode of the existing
            file, or :data:`SECRET_FILE_MODE` for a new one.

    Raises:
        OSError: the directory is not writable, the disk is full, ...
    """
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = SECRET_FILE_MODE
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; set the final mode before any byte is written so the
        # secret is never readable more widely than intended, even for a moment.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(text.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
