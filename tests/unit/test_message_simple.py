"""The one-part path of parse_message (prxmail/message/_simple.py) against the full parse.

Every test compares parse_message as it runs (the one-part path where the grammar
admits the bytes) with parse_message with that path switched off (the stdlib parser
and mail-parser's walk for every message): the two must give equal Message values,
for mail inside the grammar and just outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prxmail.message._parse as parse_module
from prxmail.message import Message, parse_message
from prxmail.message._simple import simple_tree

LIMIT = 1024 * 1024


@contextlib.contextmanager
def _full_path_only() -> Iterator[None]:
    saved = parse_module.simple_tree
    parse_module.simple_tree = lambda data: None
    try:
        yield
    finally:
        parse_module.simple_tree = saved


def _both(raw: bytes) -> tuple[Message, Message]:
    fast = parse_message(raw, uid=7, uidvalidity=42, max_attachment_bytes=LIMIT)
    with _full_path_only():
        full = parse_message(raw, uid=7, uidvalidity=42, max_attachment_bytes=LIMIT)
    return fast, full


def _assert_same(raw: bytes) -> Message:
    fast, full = _both(raw)
    assert fast == full
    assert fast.text == full.text  # repr=False fields are compared by == too; be explicit
    return fast


PLAIN = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bot@prxmail.test\r\n"
    b"Subject: a question\r\n"
    b"Message-ID: <q1@example.com>\r\n"
    b"Date: Tue, 24 Nov 2026 04:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello,\r\nwhat is the status?\r\n"
)


def test_ordinary_plain_mail_takes_the_one_part_path_and_equals_the_full_parse() -> None:
    assert simple_tree(PLAIN) is not None
    message = _assert_same(PLAIN)
    assert message.text == "Hello,\nwhat is the status?"
    assert message.from_.addr == "alice@example.com"
    assert message.attachments == ()


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN.replace(b"text/plain", b"text/html"),
        PLAIN.replace(b"charset=utf-8", b'charset=utf-8; name="x.txt"'),
        PLAIN.replace(b"MIME-Version: 1.0\r\n", b"Content-Disposition: inline\r\n"),
        PLAIN.replace(b"MIME-Version: 1.0\r\n", b"Content-ID: <c@x>\r\n"),
        PLAIN.replace(b"MIME-Version: 1.0\r\n", b"Content-Type: text/plain\r\n"),
        PLAIN.replace(b"Subject: a question", "Subject: caf\u00e9".encode()),
        PLAIN.replace(b"Subject: a question", b"Subject: a\rquestion"),
        PLAIN.replace(b"To: bot", b"From someone\r\nTo: bot"),
        b"From alice@example.com Tue Nov 24 04:00:00 2026\r\n" + PLAIN,
        b" folded: first\r\n" + PLAIN,
        PLAIN.replace(b"\r\n\r\n", b"\r\nno colon here\r\n\r\n"),
        PLAIN.split(b"\r\n\r\n")[0],  # no blank line, no body
        b"\r\n" + PLAIN,
    ],
    ids=[
        "html",
        "name-parameter",
        "disposition",
        "content-id",
        "two-content-types",
        "8-bit-header",
        "bare-cr-in-header",
        "envelope-line-inside",
        "envelope-line-first",
        "continuation-first",
        "line-without-colon",
        "no-blank-line",
        "empty-header-section",
    ],
)
def test_mail_outside_the_grammar_takes_the_full_path(raw: bytes) -> None:
    assert simple_tree(raw) is None
    _assert_same(raw)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        "Gr\u00fc\u00dfe aus K\u00f6ln\r\n".encode(),  # 8-bit UTF-8, declared utf-8
        "Gr\u00fc\u00dfe\r\n".encode("latin-1"),  # not UTF-8 although declared so
        b"line one\rline two\r\nend",  # bare CR in the body
        b"nul\x00inside\r\n",
        b"From the start of a line\r\nX-Not-A-Header: body\r\n",
        b"--boundary-looking\r\n\r\n\r\n",
        b"=?utf-8?q?not_decoded_in_a_body?=\r\n",
    ],
)
def test_bodies_read_the_same_on_both_paths(body: bytes) -> None:
    raw = PLAIN.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    assert simple_tree(raw) is not None
    _assert_same(raw)


@pytest.mark.parametrize(
    "charset",
    [b"us-ascii", b'"UTF-8"', b"iso-8859-1", b"no-such-charset", b"utf-8; format=flowed"],
)
def test_declared_charsets_decode_as_mail_parser_decodes_them(charset: bytes) -> None:
    raw = PLAIN.replace(b"charset=utf-8", b"charset=" + charset).replace(
        b"what is", "w\u00e4s is".encode()
    )
    assert simple_tree(raw) is not None
    message = _assert_same(raw)
    assert message.text  # decoded somehow, never dropped


@pytest.mark.parametrize(
    ("encoding", "body", "text"),
    [
        (b"quoted-printable", b"Gr=C3=BC=C3=9Fe,=\r\nsoft break\r\n", "Grüße,soft break"),
        (b"base64", b"R3LDvMOfZQ==\r\n", "Grüße"),
        (b"base64", b"R3LDvMOfZQ\r\n", None),  # bad padding
        (b"8bit ", b"spaced token\r\n", "spaced token"),
        (b"x-uuencode", b"begin 644 a\r\n#86)C\r\n`\r\nend\r\n", None),
        (b"bogus", b"as read\r\n", "as read"),
    ],
)
def test_every_transfer_encoding_decodes_as_mail_parser_decodes_it(
    encoding: bytes, body: bytes, text: str | None
) -> None:
    raw = PLAIN.replace(b"MIME-Version: 1.0", b"Content-Transfer-Encoding: " + encoding)
    raw = raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    assert simple_tree(raw) is not None
    message = _assert_same(raw)
    if text is not None:
        assert message.text == text


def test_header_defects_and_dates_come_from_mail_parser_on_both_paths() -> None:
    raw = (
        b'From: "quoted, name" <alice@example.com>, bob@example.com\r\n'
        b"To: undisclosed-recipients:;\r\n"
        b"Received: from mx.example.com (mx.example.com [192.0.2.1]) by\r\n"
        b"\tmail.prxmail.test with ESMTPS id 42; Tue, 24 Nov 2026 04:00:00 +0000\r\n"
        b"Received: garbage that is no trace field\r\n"
        b"Date: 24 Nov 2026 4:00 +0100 (CET)\r\n"
        b"Resent-Date: yesterday\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and\r\n =?iso-8859-1?q?K=F6ln?=\r\n"
        b"References: <a@x>\r\n <b@x>\r\n"
        b"\r\n"
        b"body\r\n"
    )
    assert simple_tree(raw) is not None
    message = _assert_same(raw)
    assert message.subject.startswith("Grüße")
    assert message.references == ("<a@x>", "<b@x>")


def test_an_unparseable_date_falls_back_to_mail_parser_on_both_paths() -> None:
    raw = PLAIN.replace(b"Tue, 24 Nov 2026 04:00:00 +0000", b"2026-11-24T04:00:00Z")
    assert simple_tree(raw) is not None
    _assert_same(raw)


# -- generated mail around the grammar ---------------------------------------------------

_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Sender",
        "Return-Path",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Received",
        "Auto-Submitted",
        "Precedence",
        "List-Id",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "MIME-Version",
        "X-Mailer",
        "content-type",
        "DATE",
    ]
)
_VALUES = st.sampled_from(
    [
        "alice@example.com",
        "Alice <alice@example.com>",
        '"Alice, A." <alice@example.com>',
        "=?utf-8?b?w6RsaWNl?= <alice@example.com>",
        "alice@example.com, bob@example.com",
        "<>",
        "<id1@example.com>",
        "<id1@example.com> <id2@example.com>",
        "Tue, 24 Nov 2026 04:00:00 +0000",
        "24 Nov 2026 04:00 GMT",
        "not a date",
        "text/plain",
        "text/plain; charset=us-ascii",
        'text/plain; charset="utf-8"; format=flowed',
        "text/plain; name=a.txt",
        "text/html; charset=utf-8",
        'multipart/mixed; boundary="b"',
        "7bit",
        "8BIT",
        "quoted-printable",
        "base64",
        "attachment; filename=a.txt",
        "auto-replied",
        "bulk",
        "1.0",
        "",
        "  leading space",
        "from x by y; Tue, 24 Nov 2026 04:00:00 +0000",
    ]
)
_FOLDS = st.sampled_from(["", "\r\n continued", "\r\n\tmore", "\n folded-lf"])
_BODIES = st.sampled_from(
    [
        b"",
        b"plain text\r\n",
        b"two\r\nlines\r\n",
        "\u00fcml\u00e4ut\r\n".encode(),
        "latin \xe9\r\n".encode("latin-1"),
        b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n--b--\r\n",
        b"line\rbare cr\n",
        b"A" * 3000 + b"\r\n",
        b"SGVsbG8gd29ybGQ=\r\n",
        b"caf=C3=A9 =\r\nsoft\r\n",
        b"=ZZ broken qp\r\n",
    ]
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(_NAMES, _VALUES, _FOLDS), max_size=14))
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    head = "".join(f"{name}: {value}{fold}{newline}" for name, value, fold in fields)
    return head.encode("latin-1") + newline.encode() + draw(_BODIES)


@settings(max_examples=600, deadline=None)
@given(_messages())
def test_generated_mail_parses_the_same_on_both_paths(raw: bytes) -> None:
    _assert_same(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=60))
def test_mutated_plain_mail_parses_the_same_on_both_paths(tail: bytes, insert: bytes) -> None:
    cut = len(tail) % len(PLAIN)
    _assert_same(PLAIN[:cut] + insert + PLAIN[cut:] + tail)


def test_generated_mail_exercises_both_paths() -> None:
    # The generator above must reach both sides of the grammar, or it proves nothing.
    examples = [
        PLAIN,
        PLAIN.replace(b"Content-Type: text/plain; charset=utf-8\r\n", b""),
        PLAIN.replace(b"\r\n", b"\n"),
    ]
    assert all(simple_tree(raw) is not None for raw in examples)
    assert simple_tree(PLAIN.replace(b"text/plain", b"multipart/mixed")) is None
