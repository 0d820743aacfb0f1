"""Fuzzing the sans-I/O cores with mutated real transcripts.

The unit tests already feed *random* bytes to the IMAP parser and split *valid*
transcripts at every offset. What they do not do, and this does: take a whole real
session (Dovecot's IMAP answers to LOGIN, SELECT, UID SEARCH, UID FETCH with a literal,
IDLE, LOGOUT; Postfix's SMTP answers from greeting to QUIT), mutate it (flipped,
deleted, inserted and duplicated bytes, literal sizes and reply codes rewritten,
truncation), cut it into random chunks and drive the full protocol object with it the
way the connection layer does. The only exceptions allowed are the documented ones:
RemoteProtocolError from the input side (and LocalProtocolError from a ``send_*`` the
mutated server made illegal, e.g. after a forged BYE). Memory stays bounded by the
configured limits whatever the input claims (tracemalloc peak).
"""

from __future__ import annotations

import itertools
import re
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prxmail.errors import LocalProtocolError, RemoteProtocolError
from prxmail.imap import (
    NEED_DATA,
    ConnectionClosed,
    ContinuationRequest,
    IMAPProtocol,
    Raw,
    SequenceSet,
    TaggedResponse,
)
from prxmail.smtp import Command, SMTPProtocol

pytestmark = [pytest.mark.integration]

BODY = (
    b"From: alice@prxmail.test\r\nTo: bot@prxmail.test\r\nSubject: {hi}\r\n"
    b"Message-ID: <m1@prxmail.test>\r\n\r\nHello {3}\r\nbot.\r\n"
)
IMAP_TRANSCRIPT = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
    b"AUTH=PLAIN] Dovecot ready.\r\n"
    b"A0001 OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFS "
    b"UIDPLUS MOVE CONDSTORE ESEARCH LITERAL+ SPECIAL-USE BINARY] Logged in\r\n"
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] "
    b"Flags permitted.\r\n"
    b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UNSEEN 2] First unseen.\r\n"
    b"* OK [UIDVALIDITY 1763900000] UIDs valid\r\n* OK [UIDNEXT 4] Predicted next UID\r\n"
    b"A0002 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"
    b"* SEARCH 2 3\r\nA0003 OK Search completed (0.001 + 0.000 secs).\r\n"
    b"* 2 FETCH (UID 2 RFC822.SIZE " + str(len(BODY)).encode() + b" FLAGS ())\r\n"
    b"* 3 FETCH (UID 3 RFC822.SIZE 130 FLAGS (\\Seen \\Answered))\r\n"
    b"A0004 OK Fetch completed (0.001 + 0.000 secs).\r\n"
    b"* 2 FETCH (UID 2 BODY[] {" + str(len(BODY)).encode() + b"}\r\n" + BODY + b" "
    b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 42 2 '
    b"NIL NIL NIL NIL) FLAGS (\\Seen))\r\n"
    b"A0005 OK Fetch completed (0.002 + 0.000 secs).\r\n"
    b"+ idling\r\n* 4 EXISTS\r\n* 1 RECENT\r\n"
    b"A0006 OK Idle completed (0.001 + 1.234 + 1.233 secs).\r\n"
    b"* BYE Logging out\r\nA0007 OK Logout completed (0.001 + 0.000 secs).\r\n"
)
# What the client sends, in order: each after the previous tagged response.
IMAP_SCRIPT: list[tuple[str, list[object]]] = [
    ("LOGIN", ["bot@prxmail.test", "secret"]),
    ("SELECT", ["INBOX"]),
    ("UID SEARCH", [Raw("UID 2:*")]),
    ("UID FETCH", [SequenceSet.of([2, 3]), Raw("(UID RFC822.SIZE FLAGS)")]),
    ("UID FETCH", [SequenceSet.of([2]), Raw("(UID BODY.PEEK[] BODYSTRUCTURE FLAGS)")]),
    ("IDLE", []),
    ("LOGOUT", []),
]

SMTP_TRANSCRIPT = (
    b"220 mail.prxmail.test ESMTP Postfix (Debian/GNU)\r\n"
    b"250-mail.prxmail.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-VRFY\r\n"
    b"250-ETRN\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
    b"250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
    b"235 2.7.0 Authentication successful\r\n"
    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    b"250 2.0.0 Ok: queued as 4Fq2xR0mZbz9sZ\r\n"
    b"221 2.0.0 Bye\r\n"
)

# Framer limits for the fuzz runs: small, so a mutated size claim meets them fast, and
# the memory bound below is stated in their terms.
MAX_LINE = 2_000
MAX_LITERAL = 16_000
MAX_RESPONSE = 32_000
# Peak traced allocation allowed while driving one transcript: the buffered input (a
# few times the transcript, since chunks are copies) plus a response's worth of limits,
# with room for the parsed events. A leak or an allocation sized from a claimed length
# would exceed it by orders of magnitude.
MEMORY_BOUND = 1_000_000


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "dup", "number", "truncate"]))
        pos = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(min_value=1, max_value=40))]
        elif op == "insert":
            data[pos:pos] = draw(
                st.one_of(
                    st.binary(max_size=30),
                    st.sampled_from(
                        [
                            b"\r\n",
                            b"{",
                            b"}",
                            b"(",
                            b")",
                            b'"',
                            b"\\",
                            b"\r",
                            b"\n",
                            b"\0",
                            b"{99999999999}\r\n",
                            b"~{5}\r\n",
                            b"-",
                            b" ",
                            b"* ",
                            b"+ ",
                        ]
                    ),
                )
            )
        elif op == "dup":
            end = pos + draw(st.integers(min_value=1, max_value=200))
            data[pos:pos] = data[pos:end]
        elif op == "number":
            numbers = list(re.finditer(rb"\d+", bytes(data)))
            if numbers:
                match = numbers[draw(st.integers(min_value=0, max_value=len(numbers) - 1))]
                value = draw(st.sampled_from([0, 1, 99, 999, 2**31, 2**32, 2**64, 10**30]))
                data[match.start() : match.end()] = str(value).encode()
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=10))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def imap_input(draw: st.DrawFn) -> list[bytes]:
    return chunked(draw, draw(mutated(IMAP_TRANSCRIPT)))


@st.composite
def smtp_input(draw: st.DrawFn) -> list[bytes]:
    return chunked(draw, draw(mutated(SMTP_TRANSCRIPT)))


def drive_imap(chunks: list[bytes]) -> int:
    """Run the client side over ``chunks``; returns how many events came out."""
    proto = IMAPProtocol(
        max_line_length=MAX_LINE, max_literal_size=MAX_LITERAL, max_response_size=MAX_RESPONSE
    )
    script = iter(IMAP_SCRIPT)
    tag: str | None = None
    events = 0

    def send_next() -> bool:
        nonlocal tag
        step = next(script, None)
        if step is None:
            return False
        try:
            tag = proto.send_command(step[0], step[1])  # type: ignore[arg-type]
        except LocalProtocolError:
            return False  # the mutated server put the session where this is illegal
        proto.data_to_send()
        return True

    for chunk in [*chunks, b""]:
        proto.receive_data(chunk)
        while (event := proto.next_event()) is not NEED_DATA:
            events += 1
            if isinstance(event, ConnectionClosed):
                return events
            if events == 1 or (isinstance(event, TaggedResponse) and event.tag == tag):
                if not send_next():
                    return events
            elif isinstance(event, ContinuationRequest) and proto.command_in_progress == "IDLE":
                try:
                    proto.send_done()
                except LocalProtocolError:
                    return events
                proto.data_to_send()
    return events


def drive_smtp(chunks: list[bytes]) -> int:
    """Answer each reply the way the sender does; returns how many replies came out."""
    proto = SMTPProtocol()
    replies = 0
    follow = {
        Command.GREETING: lambda: proto.send_ehlo("client.prxmail.test"),
        Command.EHLO: lambda: proto.send_auth("PLAIN", b"\0bot\0secret"),
        Command.AUTH: lambda: proto.send_mail("bot@prxmail.test"),
        Command.MAIL: lambda: proto.send_rcpt("alice@prxmail.test"),
        Command.RCPT: proto.send_data,
        Command.DATA: lambda: proto.send_body(b"Subject: x\r\n\r\nhello\r\n.line\r\n"),
        Command.BODY: proto.send_quit,
    }
    for chunk in chunks:
        proto.receive_data(chunk)
        while (reply := proto.next_reply()) is not None:
            replies += 1
            action = follow.get(reply.command)
            if action is None or not 200 <= reply.code < 400:
                return replies
            try:
                action()
            except LocalProtocolError:
                return replies
    return replies


def test_unmutated_transcripts_run_to_the_end() -> None:
    # The drivers are right: with real input they get every event/reply, no error.
    assert drive_imap([IMAP_TRANSCRIPT]) >= 20
    assert drive_smtp([SMTP_TRANSCRIPT]) == 8  # greeting ... QUIT


def bounded(run: object, chunks: list[bytes]) -> None:
    tracemalloc.start()
    try:
        try:
            run(chunks)  # type: ignore[operator]
        except RemoteProtocolError as exc:
            excerpt = len(exc.excerpt)
            assert excerpt <= 80
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, peak


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(imap_input())
def test_mutated_imap_sessions_raise_only_documented_errors(chunks: list[bytes]) -> None:
    bounded(drive_imap, chunks)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(smtp_input())
def test_mutated_smtp_sessions_raise_only_documented_errors(chunks: list[bytes]) -> None:
    bounded(drive_smtp, chunks)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_random_smtp_replies_raise_only_documented_errors(chunks: list[bytes]) -> None:
    bounded(drive_smtp, [b"220 ok\r\n", *chunks])


def test_endless_line_and_huge_literal_claims_stay_bounded() -> None:
    # A line that never ends and a literal claiming 2**40 bytes: refused at the
    # limit, never buffered beyond it.
    endless = [b"* OK ready\r\n", *([b"* 1 FETCH (" + b"x" * 4000] * 50)]
    huge = [b"* OK ready\r\nA0001 OK in\r\n* 1 FETCH (BODY[] {1099511627776}\r\n" + b"y" * 4000]
    for chunks in (endless, huge):
        with pytest.raises(RemoteProtocolError):
            bounded_strict(drive_imap, chunks)
    with pytest.raises(RemoteProtocolError):
        bounded_strict(drive_smtp, [b"220-ok\r\n", *([b"220-" + b"z" * 4000] * 50)])


def bounded_strict(run: object, chunks: list[bytes]) -> None:
    tracemalloc.start()
    try:
        run(chunks)  # type: ignore[operator]
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, peak
