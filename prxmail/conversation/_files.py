"""Incoming attachments as files, for ``--exec`` handlers.

Theory of operation. For one handler run, :func:`write_attachments` creates a
fresh private directory (``tempfile.mkdtemp``: mode 0700, a name nobody can
predict) and writes each attachment whose content was kept into it, under a name
from :func:`prxmail.message.sanitize_filename` (the last path component only, no
control characters, device names defused) made unique case-insensitively
("a.txt", "a-2.txt", ...). Files are created with ``O_EXCL | O_NOFOLLOW`` and mode
0600, so nothing already there -- a planted symlink above all -- is ever written
through. :func:`remove_attachment_dir` removes the directory and everything in it
whatever the handler did there; call it in a ``finally`` after the run.
Both do blocking file I/O: call them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

from prxmail.message import Attachment, sanitize_filename

__all__ = ["AttachmentFiles", "remove_attachment_dir", "write_attachments"]

_DIR_PREFIX: Final = "prxmail-attachments-"

# Attempts at a unique name before the attachment's position is used instead;
# real messages repeat a name a handful of times at most, and the bound keeps a
# hostile one (a thousand parts all named "a.txt") linear.
_MAX_NAME_ATTEMPTS: Final = 20


@attrs.frozen
class AttachmentFiles:
    """Where :func:`write_attachments` put a message's attachments.

    Attributes:
        directory: The private directory (mode 0700) holding them.
        paths: One entry per attachment, in order: the file's path, or None when
            the content was not kept (over ``max_attachment_bytes``).
    """

    directory: Path
    paths: tuple[Path | None, ...]


def _split(name: str) -> tuple[str, str]:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + extension


def _unique(name: str, index: int, taken: set[str]) -> str:
    if name.lower() not in taken:
        return name
    stem, extension = _split(name)
    for attempt in range(2, _MAX_NAME_ATTEMPTS + 2):
        candidate = sanitize_filename(f"{stem}-{attempt}{extension}", index=index)
        if candidate.lower() not in taken:
            return candidate
    return sanitize_filename(f"attachment-{index}-{len(taken)}{extension}", index=index)


def _check_inside(path: Path, directory: Path, name: str) -> None:
    if path.parent != directory or name in (".", ".."):
        raise OSError(f"unsafe attachment file name {name!r}")


def write_attachments(
    attachments: Sequence[Attachment], *, parent: str | os.PathLike[str] | None = None
) -> AttachmentFiles:
    """Write attachments' content into a new private directory.

    Args:
        attachments: The message's attachments (``content`` None ones get no file).
        parent: Where to create the directory; the system temporary directory
            when None.

    Returns:
        The directory and the per-attachment paths.

    Raises:
        OSError: The directory or a file cannot be written; the directory is
            removed again first.
    """
    directory = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=parent))
    try:
        os.chmod(directory, 0o700)
        taken: set[str] = set()
        paths: list[Path | None] = []
        for index, attachment in enumerate(attachments, start=1):
            if attachment.content is None:
                paths.append(None)
                continue
            name = _unique(
                sanitize_filename(
                    attachment.filename, index=index, content_type=attachment.content_type
                ),
                index,
                taken,
            )
            taken.add(name.lower())
            path = directory / name
            # sanitize_filename leaves one path component; checked again because
            # a file outside the directory must be impossible, not unlikely.
            _check_inside(path, directory, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(attachment.content)
            paths.append(path)
    except BaseException:
        remove_attachment_dir(directory)
        raise
    return AttachmentFiles(directory=directory, paths=tuple(paths))


def remove_attachment_dir(directory: str | os.PathLike[str]) -> None:
    """Remove a directory made by :func:`write_attachments`, with all it holds.

    Missing already is fine; sub-directories the handler made, and files it made
    read-only, go too. Symbolic links inside are removed, never followed.

    Args:
        directory: The directory.
    """
    path = Path(directory)
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    # A handler may have made a sub-directory read-only: its entries could then
    # not be unlinked. Directories only are made writable (os.walk does not
    # follow symbolic links), so nothing outside is ever touched.
    for current, _dirs, _files in os.walk(path):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(current, 0o700)
    shutil.rmtree(path, ignore_errors=False)
