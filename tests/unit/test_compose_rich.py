"""compose_message / compose_reply with an HTML alternative and attachments."""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.compose import (
    MAX_OUTGOING_ATTACHMENTS,
    OutgoingAttachment,
    compose_message,
    compose_reply,
)
from prxmail.errors import LocalProtocolError
from prxmail.message import Address, Message, parse_message, sanitize_filename

NOW = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
BOT = "bot@ours.example"
ALICE = Address("alice@example.com", "Alice")
PDF = OutgoingAttachment("report.pdf", "application/pdf", bytes(range(256)) * 40)


def parent(**fields: object) -> Message:
    fields.setdefault("message_id", "<p1@example.com>")
    fields.setdefault("subject", "Quarterly numbers")
    return Message(uid=1, uidvalidity=1, from_=ALICE, from_all=(ALICE,), **fields)  # type: ignore[arg-type]


def fresh(**kwargs: object) -> bytes:
    kwargs.setdefault("from_address", BOT)
    kwargs.setdefault("to", ALICE)
    kwargs.setdefault("subject", "Numbers")
    kwargs.setdefault("body", "See attached.")
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("message_id", "<fixed@ours.example>")
    return compose_message(**kwargs).raw  # type: ignore[arg-type]


def tree(raw: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert not parsed.defects
    for part in parsed.walk():
        assert not part.defects, part.defects
    return parsed


def test_text_only_stays_a_single_part_byte_for_byte() -> None:
    assert fresh() == fresh(html=None, attachments=())
    assert b"multipart" not in fresh()


def test_html_is_an_alternative_after_the_text() -> None:
    raw = fresh(body="Hello *you*", html="<p>Hello <b>you</b></p>")
    parsed = tree(raw)
    assert parsed.get_content_type() == "multipart/alternative"
    assert "Content-Transfer-Encoding" not in parsed
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    # The stdlib keeps CRLF in decoded text; the text ends in exactly one break.
    assert parts[0].get_content().replace("\r\n", "\n") == "Hello *you*\n"
    assert parts[1].get_content().replace("\r\n", "\n") == "<p>Hello <b>you</b></p>\n"
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=0)
    assert back.text.strip() == "Hello *you*"
    assert back.html is not None
    assert "<b>you</b>" in back.html
    assert back.attachments == ()


def test_attachments_make_a_mixed_message_with_the_text_first() -> None:
    csv = OutgoingAttachment("data.csv", "text/csv", b"a,b\r\n1,2\n")
    raw = fresh(attachments=[PDF, csv])
    parsed = tree(raw)
    assert parsed.get_content_type() == "multipart/mixed"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/pdf", "text/csv"]
    assert parts[1].get_filename() == "report.pdf"
    assert parts[1].get_content_disposition() == "attachment"
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=1 << 20)
    assert [(a.filename, a.content_type, a.content) for a in back.attachments] == [
        ("report.pdf", "application/pdf", PDF.content),
        ("data.csv", "text/csv", csv.content),  # bytes exact, line ends untouched
    ]


def test_html_and_attachments_nest_the_alternative_in_the_mixed() -> None:
    raw = fresh(html="<p>hi</p>", attachments=[PDF])
    parsed = tree(raw)
    assert [p.get_content_type() for p in parsed.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "Überprüfung der Größenänderung für München und Zürich \u2013 Bericht 2025.pdf",
        "日本語のファイル名です.txt",
        '100% "quoted" =?utf-8?q?x?= name.txt',
        "a" * 300 + ".txt",
    ],
)
def test_file_names_are_encoded_for_every_reader(name: str) -> None:
    raw = fresh(attachments=[OutgoingAttachment(name, "text/plain", b"x")])
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
        assert line.isascii()
    (part,) = [p for p in tree(raw).walk() if p.get_content_disposition() == "attachment"]
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=10)
    (attachment,) = back.attachments
    assert part.get_filename() == attachment.filename
    if len(name) < 200:
        assert attachment.filename == sanitize_filename(name)


@pytest.mark.parametrize(
    "name",
    ["evil.txt\r\nBcc: victim@example.org", "../../etc/passwd", 'x"; name="y', "\x00\x07"],
)
def test_hostile_file_names_cannot_add_headers_or_parameters(name: str) -> None:
    raw = fresh(attachments=[OutgoingAttachment(name, "text/plain", b"x")])
    parsed = tree(raw)
    assert "bcc" not in {key.lower() for key in parsed}
    (part,) = [p for p in parsed.walk() if p.get_content_disposition() == "attachment"]
    assert set(part.keys()) == {"Content-Type", "Content-Disposition", "Content-Transfer-Encoding"}
    filename = part.get_filename()
    assert filename is not None
    assert "/" not in filename
    assert "\r" not in filename
    assert "\n" not in filename
    assert list(part.get_params() or [])[1:] == [("name", filename)]


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain\r\nBcc: x@y",
        "text",
        "text/plain; charset=utf-8",
        "multipart/mixed",
        "message/rfc822",
        "a/" + "b" * 200,
        "",
    ],
)
def test_bad_content_types_are_refused(content_type: str) -> None:
    with pytest.raises(ValueError, match="content_type"):
        OutgoingAttachment("x.bin", content_type, b"")


def test_content_types_are_normalised() -> None:
    assert OutgoingAttachment("x", " Image/PNG ", b"").content_type == "image/png"


def test_attachment_count_is_bounded_and_types_checked() -> None:
    small = OutgoingAttachment("x.txt", "text/plain", b"x")
    fresh(attachments=[small] * MAX_OUTGOING_ATTACHMENTS)
    with pytest.raises(LocalProtocolError, match="attachments"):
        fresh(attachments=[small] * (MAX_OUTGOING_ATTACHMENTS + 1))
    with pytest.raises(TypeError):
        fresh(attachments=[("x.txt", "text/plain", b"x")])
    with pytest.raises(TypeError):
        fresh(html=b"<p>")


def test_rich_reply_keeps_threading() -> None:
    out = compose_reply(
        parent(references=("<root@example.com>",)),
        "Here.",
        from_address=BOT,
        to=ALICE,
        default_subject="PRX",
        now=NOW,
        html="<p>Here.</p>",
        attachments=[PDF],
    )
    back = parse_message(out.raw, uid=2, uidvalidity=1, max_attachment_bytes=1 << 20)
    assert back.in_reply_to == "<p1@example.com>"
    assert back.references == ("<root@example.com>", "<p1@example.com>")
    assert back.subject == "Re: Quarterly numbers"
    assert back.auto_submitted == "auto-replied"
    assert back.attachments[0].content == PDF.content


def test_reply_subject_is_honoured_only_without_a_parent_subject() -> None:
    def subject_of(parent_subject: str, subject: str | None) -> str:
        out = compose_reply(
            parent(subject=parent_subject),
            "x",
            from_address=BOT,
            to=ALICE,
            default_subject="PRX Message",
            now=NOW,
            subject=subject,
        )
        return out.subject

    assert subject_of("", "Your invoice") == "Your invoice"
    assert subject_of("", None) == "PRX Message"
    assert subject_of("", "  ") == "PRX Message"
    assert subject_of("Question", "Your invoice") == "Re: Question"
    assert subject_of("", "Line\r\nBcc: x@y") == "Line Bcc: x@y"


@settings(max_examples=60, deadline=None)
@given(
    body=st.text(max_size=300),
    html=st.text(max_size=300),
    content=st.binary(max_size=600),
    name=st.text(min_size=1, max_size=80),
)
def test_any_input_round_trips(body: str, html: str, content: bytes, name: str) -> None:
    raw = fresh(
        body=body, html=html, attachments=[OutgoingAttachment(name, "application/x-y", content)]
    )
    assert raw.isascii()
    assert b"\r\n\r\n" in raw
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=1 << 20)
    (attachment,) = back.attachments
    assert attachment.content == content
    assert attachment.content_type == "application/x-y"


def test_part_header_lines_are_folded() -> None:
    long_ascii = "quarterly-report-for-the-board-of-directors-" * 4 + ".pdf"
    raw = fresh(html="<p>x</p>", attachments=[OutgoingAttachment(long_ascii, "text/plain", b"x")])
    head_lines = [line for line in raw.split(b"\r\n") if b":" in line[:40] or line[:1] == b" "]
    assert all(len(line) <= 78 for line in head_lines if not line.startswith(b"Message-ID"))
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=10)
    assert back.attachments[0].filename == long_ascii
