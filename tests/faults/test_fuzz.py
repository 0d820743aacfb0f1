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

Hostile streams on top of the mutations: numbers far past their grammar (5,000 digits,
2**64), lists nested past the parser's cap, stray response-code lines, and streams of
100 MB and more (endless untagged data, endless literals, a line or a number that never
ends) fed the way the connection layer does. After the first RemoteProtocolError the
IMAP core must refuse every later call (its ERROR state), never carry on.

These use no server, so they carry no ``integration`` mark: ``-m "not integration"``
runs them.
"""

from __future__ import annotations

import itertools
import os
import re
import tracemalloc
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prxmail.errors import LocalProtocolError, RemoteProtocolError
from prxmail.imap import (
    DEFAULT_MAX_LINE_LENGTH,
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    ContinuationRequest,
    IMAPProtocol,
    Raw,
    SequenceSet,
    TaggedResponse,
)
from prxmail.smtp import Command, SMTPProtocol

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
# the memory bound below is stated in their terms. The line limit is above 4,300 bytes
# so that a number past Python's int() digit limit reaches the parser instead of being
# stopped by the framer first.
MAX_LINE = 8_000
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
                            b"9" * 5000,  # past Python's int() digit limit
                            b"18446744073709551616",  # 2**64
                            b"(" * 300,  # past MAX_NESTING_DEPTH
                            b"[COPYUID 1 2 3]\r\n",  # Exchange's stray code line
                            b"~/x ",
                            b"\xd9\xa2",  # an Arabic-Indic digit in UTF-8
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
                value = draw(
                    st.sampled_from(
                        [b"0", b"1", b"99", b"999", b"2147483648", b"4294967296", b"9" * 5000]
                        # Not ASCII digits, though str.isdigit() says they are.
                        + ["\u00b2".encode(), "\u0661\u0662".encode()]
                        + [str(n).encode() for n in (2**63, 2**64, 10**30)]
                    )
                )
                data[match.start() : match.end()] = value
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


def drive_imap(chunks: Iterable[bytes], proto: IMAPProtocol | None = None) -> int:
    """Run the client side over ``chunks``; returns how many events came out.

    A RemoteProtocolError is re-raised after checking that the core has gone to its
    ERROR state for good.
    """
    if proto is None:
        proto = IMAPProtocol(
            max_line_length=MAX_LINE, max_literal_size=MAX_LITERAL, max_response_size=MAX_RESPONSE
        )
    try:
        return _run_imap_script(proto, chunks)
    except RemoteProtocolError as exc:
        assert_unusable(proto, exc)
        raise


def assert_unusable(proto: IMAPProtocol, error: RemoteProtocolError) -> None:
    """The ERROR state: every later call refuses, naming the first error."""
    assert proto.state is ConnectionState.ERROR
    assert proto.error is error
    for call in (
        proto.next_event,
        lambda: proto.receive_data(b"* 1 EXISTS\r\n"),
        lambda: proto.send_command("NOOP"),
        proto.send_done,
    ):
        with pytest.raises(LocalProtocolError, match="unusable since"):
            call()
    assert proto.data_to_send() == b""


def _run_imap_script(proto: IMAPProtocol, chunks: Iterable[bytes]) -> int:
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

    for chunk in itertools.chain(chunks, [b""]):
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


def drive_smtp(chunks: Iterable[bytes]) -> int:
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


# -- hostile streams of 100 MB and more ------------------------------------------------

# Each stream below is at least this long (or is refused before its end): far more than
# any limit, so buffering it, or any fixed fraction of it, would show in the peak.
STREAM_BYTES = 100 * 1024 * 1024
# Fed in pieces of the IMAP connection's read size, as the trio layer does.
STREAM_CHUNK = 256 * 1024
# The literal limit for the streaming runs: each 1 MiB literal is held once, whole (the
# framer receives it straight into one bytearray), and dropped with its event.
STREAM_LITERAL = 2 * 1024 * 1024
# Allowed peak while a stream runs with the limits above: one literal being received,
# one just parsed, one receive chunk and the parser's small objects, with headroom. The
# stream is 100 MB; accumulating it would exceed this by a factor of ten or more.
STREAM_MEMORY_BOUND = 8 * 1024 * 1024


class Fed:
    """Yields the pieces of a stream and counts the bytes handed out."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = pieces
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            self.total += len(piece)
            yield piece


def repeated(head: bytes, unit: bytes, tail: bytes = b"") -> Iterator[bytes]:
    """``head``, then ``unit`` until STREAM_BYTES have gone by, then ``tail``."""
    yield head
    sent = len(head)
    while sent < STREAM_BYTES:
        yield unit
        sent += len(unit)
    if tail:
        yield tail


def peak_of(run: object, *args: object) -> tuple[int, BaseException | None]:
    """Run ``run(*args)`` under tracemalloc; return the peak and what it raised."""
    error: BaseException | None = None
    tracemalloc.start()
    try:
        try:
            run(*args)  # type: ignore[operator]
        except RemoteProtocolError as exc:
            error = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Shown with -s: the figures docs/reliability.md records.
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"fuzz peak {test}: {peak / 2**20:.1f} MiB traced")
    return peak, error


def streaming_imap() -> IMAPProtocol:
    return IMAPProtocol(max_literal_size=STREAM_LITERAL, max_response_size=2 * STREAM_LITERAL)


def test_endless_untagged_literals_are_not_accumulated() -> None:
    # 100 MB of unsolicited 1 MiB FETCH literals before any tagged answer.
    body = b"z" * (1024 * 1024)
    fetch_head = b"* 1 FETCH (UID 1 BODY[] {" + str(len(body)).encode() + b"}\r\n"
    unit_tail = b")\r\n"
    count = STREAM_BYTES // len(body) + 1
    greeting = b"* OK [CAPABILITY IMAP4rev1] hi\r\n"
    pieces = Fed([greeting, *([fetch_head, body, unit_tail] * count)])
    events: list[int] = []
    peak, error = peak_of(lambda: events.append(drive_imap(pieces, streaming_imap())))
    assert error is None
    assert pieces.total >= STREAM_BYTES
    assert events == [1 + count + 1]  # greeting, every FETCH, end of stream
    assert peak < STREAM_MEMORY_BOUND, peak


def test_endless_status_lines_during_select_stay_bounded() -> None:
    line = b"* OK " + b"o" * 4000 + b"\r\n"
    chunk = line * (STREAM_CHUNK // len(line))
    pieces = Fed(repeated(b"* OK [CAPABILITY IMAP4rev1] hi\r\n", chunk))
    peak, error = peak_of(drive_imap, pieces, streaming_imap())
    assert error is None
    assert pieces.total >= STREAM_BYTES
    assert peak < STREAM_MEMORY_BOUND, peak


@pytest.mark.parametrize(
    ("head", "unit"),
    [
        # A line that never ends, and a number that never ends.
        (b"* OK hi\r\n* 1 FETCH (BODY[] ", b"x" * STREAM_CHUNK),
        (b"* OK hi\r\n* OK [UIDNEXT ", b"9" * STREAM_CHUNK),
        # Lists nested far past MAX_NESTING_DEPTH, on one line under the line limit.
        (b"* OK hi\r\n* 1 FETCH (BODYSTRUCTURE ", b"(" * 1000 + b")" * 1000 + b"\r\n"),
    ],
)
def test_endless_lines_numbers_and_nesting_are_refused_at_the_limit(
    head: bytes, unit: bytes
) -> None:
    # Default limits here: the line limit (16 MiB) is what must stop the stream.
    pieces = Fed(repeated(head, unit))
    peak, error = peak_of(drive_imap, pieces, IMAPProtocol())
    assert isinstance(error, RemoteProtocolError)
    assert len(error.excerpt) <= 80
    assert pieces.total <= 2 * DEFAULT_MAX_LINE_LENGTH  # refused long before 100 MB
    # The buffered line is the bound (it is joined with each new chunk once).
    assert peak < 2 * DEFAULT_MAX_LINE_LENGTH + 4 * STREAM_CHUNK, peak


def test_huge_numbers_within_a_line_are_a_protocol_error_not_a_crash() -> None:
    for response in (
        b"* 1 FETCH (UID " + b"7" * (4 * 1024 * 1024) + b")\r\n",
        b"* " + b"1" * (4 * 1024 * 1024) + b" EXISTS\r\n",
        b"* SEARCH 1 2 " + b"3" * 5000 + b"\r\n",
    ):
        peak, error = peak_of(drive_imap, [b"* OK hi\r\n", response], IMAPProtocol())
        assert isinstance(error, RemoteProtocolError)
        assert "at most" in str(error)
        assert peak < MEMORY_BOUND + 3 * len(response), peak


def test_endless_smtp_replies_are_refused_at_the_limit() -> None:
    for head, unit in (
        (b"220-mx.prxmail.test\r\n", b"220-" + b"z" * 4000 + b"\r\n"),  # one reply, forever
        (b"220 mx.prxmail.test\r\n250", b"5" * STREAM_CHUNK),  # a reply code that never ends
        (b"220 mx.prxmail.test\r\n250-", b"x" * STREAM_CHUNK),  # a line that never ends
    ):
        pieces = Fed(repeated(head, unit))
        peak, error = peak_of(drive_smtp, pieces)
        assert isinstance(error, RemoteProtocolError)
        assert pieces.total < 2 * STREAM_CHUNK + len(head) + 70_000
        assert peak < MEMORY_BOUND + 2 * STREAM_CHUNK, peak
