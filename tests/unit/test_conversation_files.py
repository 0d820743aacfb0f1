"""Incoming attachments as files in a private directory, for --exec handlers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from prxmail.conversation import remove_attachment_dir, write_attachments
from prxmail.message import Attachment


def att(name: str, content: bytes | None = b"data", content_type: str = "text/plain") -> Attachment:
    return Attachment(name, content_type, len(content or b""), content)


def test_files_hold_the_content_in_a_private_directory(tmp_path: Path) -> None:
    files = write_attachments([att("a.txt", b"one"), att("b.pdf", b"\x00two")], parent=tmp_path)
    assert files.directory.parent == tmp_path
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert [p.name for p in files.paths if p] == ["a.txt", "b.pdf"]
    assert [p.read_bytes() for p in files.paths if p] == [b"one", b"\x00two"]
    for path in files.paths:
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = write_attachments([att("a.txt")], parent=tmp_path)
    assert other.directory != files.directory  # a fresh directory per run


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/etc/shadow", "shadow"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("", "attachment-1.txt"),
        ("..", "attachment-1.txt"),
        ("a\r\nb\x00.txt", "a b.txt"),
    ],
)
def test_names_are_sanitised_and_stay_inside(tmp_path: Path, name: str, expected: str) -> None:
    files = write_attachments([att(name)], parent=tmp_path)
    (path,) = files.paths
    assert path is not None
    assert path.name == expected
    assert path.parent == files.directory
    assert sorted(os.listdir(tmp_path)) == [files.directory.name]


def test_duplicate_names_are_made_unique_case_insensitively(tmp_path: Path) -> None:
    names = ["report.pdf", "report.pdf", "REPORT.pdf", "report-2.pdf", "x/report.pdf"]
    files = write_attachments([att(n) for n in names], parent=tmp_path)
    got = [p.name for p in files.paths if p]
    assert len({n.lower() for n in got}) == len(names)
    assert got[:3] == ["report.pdf", "report-2.pdf", "REPORT-3.pdf"]
    assert len(os.listdir(files.directory)) == len(names)


def test_many_duplicates_stay_bounded(tmp_path: Path) -> None:
    files = write_attachments([att("a.txt") for _ in range(200)], parent=tmp_path)
    assert len(set(files.paths)) == 200


def test_content_over_the_limit_gets_no_file(tmp_path: Path) -> None:
    files = write_attachments([att("big.iso", None), att("small.txt")], parent=tmp_path)
    assert files.paths[0] is None
    assert files.paths[1] is not None
    assert os.listdir(files.directory) == ["small.txt"]


def test_removal_whatever_the_handler_did(tmp_path: Path) -> None:
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    files = write_attachments([att("a.txt")], parent=tmp_path)
    sub = files.directory / "sub"
    sub.mkdir()
    (sub / "f").write_text("x")
    sub.chmod(0o500)
    (files.directory / "link").symlink_to(outside)
    (files.directory / "dirlink").symlink_to(tmp_path)
    remove_attachment_dir(files.directory)
    assert not files.directory.exists()
    assert outside.read_text() == "keep"
    remove_attachment_dir(files.directory)  # already gone: fine


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    bad = Attachment("a.txt", "text/plain", 1, b"x")
    object.__setattr__(bad, "content", "not bytes")
    with pytest.raises(TypeError):
        write_attachments([att("ok.txt"), bad], parent=tmp_path)
    assert os.listdir(tmp_path) == []
