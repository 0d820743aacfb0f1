"""The IMAP framer: bytes in, complete responses out, every limit enforced."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.errors import LocalProtocolError, RemoteProtocolError
from prxmail.imap import Frame, Framer
from prxmail.imap._framer import DIRECT_LITERAL_THRESHOLD


def frames_of(framer: Framer) -> list[tuple[list[bytes], list[bytes]]]:
    out = []
    while (frame := framer.next_frame()) is not None:
        out.append((list(frame.lines), [bytes(lit) for lit in frame.literals]))
    return out


TRANSCRIPT = (
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"
    b"* 1 FETCH (UID 7 BODY[] {12}\r\nhello\r\nworld)\r\n"
    b"* 2 FETCH (BODY[HEADER] {0}\r\n BODY[TEXT] {3+}\r\nabc)\r\n"
    b"* 3 FETCH (BINARY[1] ~{2}\r\n\x01\x02)\r\n"
    b"A1 OK done\r\n"
)

EXPECTED = [
    ([b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready"], []),
    ([b"* 1 FETCH (UID 7 BODY[] {12}", b")"], [b"hello\r\nworld"]),
    ([b"* 2 FETCH (BODY[HEADER] {0}", b" BODY[TEXT] {3+}", b")"], [b"", b"abc"]),
    ([b"* 3 FETCH (BINARY[1] ~{2}", b")"], [b"\x01\x02"]),
    ([b"A1 OK done"], []),
]


def test_transcript_in_one_piece() -> None:
    framer = Framer()
    framer.receive_data(TRANSCRIPT)
    assert frames_of(framer) == EXPECTED
    assert framer.at_boundary


def test_byte_at_a_time() -> None:
    framer = Framer()
    got = []
    for i in range(len(TRANSCRIPT)):
        framer.receive_data(TRANSCRIPT[i : i + 1])
        got.extend(frames_of(framer))
    assert got == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=12))
def test_any_split_gives_the_same_frames(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [
        TRANSCRIPT[a:b] for a, b in zip([0, *points], [*points, len(TRANSCRIPT)], strict=False)
    ]
    framer = Framer()
    got = []
    for piece in pieces:
        if piece:
            framer.receive_data(piece)
        got.extend(frames_of(framer))
    assert got == EXPECTED


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=97, max_value=40000))
def test_large_literal_any_chunk_size(chunk: int) -> None:
    body = bytes(range(256)) * ((DIRECT_LITERAL_THRESHOLD * 2) // 256)
    data = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\nA1 OK x\r\n"
    framer = Framer()
    got = []
    for i in range(0, len(data), chunk):
        framer.receive_data(data[i : i + chunk])
        got.extend(frames_of(framer))
    assert got == [([b"* 1 FETCH (BODY[] {%d}" % len(body), b")"], [body]), ([b"A1 OK x"], [])]


def test_large_literal_is_one_preallocated_bytearray() -> None:
    size = DIRECT_LITERAL_THRESHOLD + 10
    framer = Framer()
    framer.receive_data(b"* 1 FETCH (BODY[] {%d}\r\n" % size)
    assert framer.next_frame() is None
    framer.receive_data(b"x" * size + b")\r\n")
    frame = framer.next_frame()
    assert isinstance(frame, Frame)
    assert isinstance(frame.literals[0], bytearray)
    assert len(frame.literals[0]) == size


def test_bare_lf_is_tolerated() -> None:
    framer = Framer()
    framer.receive_data(b"* 3 EXISTS\nA1 OK x\n")
    assert frames_of(framer) == [([b"* 3 EXISTS"], []), ([b"A1 OK x"], [])]


def test_huge_literal_claim_is_refused_before_allocating() -> None:
    framer = Framer(max_literal_size=1000)
    framer.receive_data(b"* 1 FETCH (BODY[] {999999999999})\r\n")  # not at end: no literal
    assert frames_of(framer) == [([b"* 1 FETCH (BODY[] {999999999999})"], [])]
    framer.receive_data(b"* 1 FETCH (BODY[] {999999999999}\r\n")
    with pytest.raises(RemoteProtocolError, match="literal of 999999999999 bytes") as info:
        framer.next_frame()
    assert b"999999999999" in info.value.excerpt


def test_line_too_long_without_newline() -> None:
    framer = Framer(max_line_length=100)
    framer.receive_data(b"* OK " + b"x" * 200)
    with pytest.raises(RemoteProtocolError, match="longer than 100"):
        framer.next_frame()


def test_line_too_long_with_newline() -> None:
    framer = Framer(max_line_length=100)
    framer.receive_data(b"* OK " + b"x" * 200 + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="longer than 100"):
        framer.next_frame()


def test_response_too_large_through_chained_literals() -> None:
    framer = Framer(max_literal_size=100, max_response_size=250)
    framer.receive_data(b"* 1 FETCH (A {100}\r\n" + b"a" * 100 + b" B {100}\r\n" + b"b" * 100)
    framer.receive_data(b" C {100}\r\n")
    with pytest.raises(RemoteProtocolError, match="larger than 250"):
        frames_of(framer)


def test_eof_mid_literal() -> None:
    framer = Framer()
    framer.receive_data(b"* 1 FETCH (BODY[] {10}\r\nabc")
    assert framer.next_frame() is None
    framer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a literal"):
        framer.next_frame()


def test_eof_mid_big_literal() -> None:
    framer = Framer()
    framer.receive_data(b"* 1 FETCH (BODY[] {%d}\r\nabc" % (DIRECT_LITERAL_THRESHOLD * 3))
    assert framer.next_frame() is None
    framer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a literal"):
        framer.next_frame()


def test_eof_mid_line() -> None:
    framer = Framer()
    framer.receive_data(b"* 1 EXIS")
    framer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a response"):
        framer.next_frame()


def test_clean_eof() -> None:
    framer = Framer()
    framer.receive_data(b"* BYE\r\n")
    framer.receive_data(b"")
    assert frames_of(framer) == [([b"* BYE"], [])]
    assert framer.eof
    assert framer.next_frame() is None


def test_discard_buffered_drops_everything() -> None:
    framer = Framer()
    framer.receive_data(b"* 1 EXISTS\r\n* 2 FETCH (BODY[] {5}\r\nab")
    assert framer.discard_buffered() > 0
    assert framer.at_boundary
    assert framer.next_frame() is None
    framer.receive_data(b"* 9 EXISTS\r\n")
    assert frames_of(framer) == [([b"* 9 EXISTS"], [])]


def test_data_after_eof_is_a_bug() -> None:
    framer = Framer()
    framer.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        framer.receive_data(b"x")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Framer(max_line_length=0)


def test_response_size_counts_lines_too() -> None:
    framer = Framer(max_line_length=1000, max_response_size=100)
    framer.receive_data(
        b"* 1 FETCH (A {1}\r\nx" + b"B" * 60 + b" C {1}\r\ny" + b"D" * 60 + b")\r\n"
    )
    with pytest.raises(RemoteProtocolError, match="larger than 100"):
        frames_of(framer)
    framer = Framer(max_line_length=1000, max_response_size=200)
    framer.receive_data(
        b"* 1 FETCH (A {1}\r\nx" + b"B" * 60 + b" C {1}\r\ny" + b"D" * 60 + b")\r\n"
    )
    assert len(frames_of(framer)) == 1


def test_partial_small_literal_across_many_reads() -> None:
    body = bytes(range(256)) * 100  # below the direct threshold
    data = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\n"
    framer = Framer()
    got = []
    for i in range(0, len(data), 1000):
        framer.receive_data(data[i : i + 1000])
        got.extend(frames_of(framer))
    assert got == [([b"* 1 FETCH (BODY[] {%d}" % len(body), b")"], [body])]
