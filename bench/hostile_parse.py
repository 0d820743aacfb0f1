"""Worst-case parse time of hostile messages by size: what may be parsed on the loop.

``python -m bench.hostile_parse [--repeat N]`` builds messages of 1 to 64 KiB in
shapes chosen to be slow to parse (deep MIME nesting, thousands of tiny parts,
huge header counts, many RFC 2047 encoded words, long parameter lists) and prints
the best of N parses of each (its own cost), next to the shape test the channel uses
(:func:`prxmail.channel._fetch.parse_inline`) to decide whether it would parse
that message on the event loop. The channel's inline rule must keep every row it
accepts under a few milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

from prxmail.channel._fetch import parse_inline
from prxmail.message import parse_message

HEAD = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\nMessage-ID: <m@x>\r\n"


def _fill(unit: bytes, size: int) -> bytes:
    return unit * max(1, size // len(unit))


def nested(size: int) -> bytes:
    levels = size // 56
    parts = [HEAD + b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"]
    parts += [
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(levels)
    ]
    return b"".join(parts)


def tiny_parts(size: int) -> bytes:
    head = HEAD + b"Content-Type: multipart/mixed; boundary=p\r\n\r\n"
    return head + _fill(b"--p\r\n\r\nx\r\n", size) + b"--p--\r\n"


def tiny_attachments(size: int) -> bytes:
    head = HEAD + b"Content-Type: multipart/mixed; boundary=p\r\n\r\n"
    unit = b"--p\r\nContent-Type: application/octet-stream; name=a\r\n\r\nx\r\n"
    return head + _fill(unit, size) + b"--p--\r\n"


def tiny_text_parts(size: int) -> bytes:
    head = HEAD + b"Content-Type: multipart/mixed; boundary=p\r\n\r\n"
    unit = b"--p\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nx\r\n"
    return head + _fill(unit, size) + b"--p--\r\n"


def many_headers(size: int) -> bytes:
    return HEAD + _fill(b"X: y\r\n", size) + b"\r\nbody\r\n"


def many_received(size: int) -> bytes:
    unit = b"Received: from a (b [192.0.2.1]) by c; Tue, 4 Mar 2025 09:15:00 +0100\r\n"
    return HEAD + _fill(unit, size) + b"\r\nbody\r\n"


def many_recipients(size: int) -> bytes:
    return HEAD + b"Cc: " + _fill(b"a@b.c, ", size) + b"d@e.f\r\n\r\nbody\r\n"


def many_address_headers(size: int) -> bytes:
    return HEAD + _fill(b'Cc: "x" <a@b.c>\r\n', size) + b"\r\nbody\r\n"


def encoded_subject(size: int) -> bytes:
    return HEAD + b"Subject: " + _fill(b"=?utf-8?q?a?= ", size) + b"\r\n\r\nbody\r\n"


def encoded_from(size: int) -> bytes:
    words = _fill(b"=?utf-8?b?w6Q=?= ", size)
    return b"From: " + words + b"<a@example.com>\r\nSubject: s\r\n\r\nbody\r\n"


def encoded_headers(size: int) -> bytes:
    return HEAD + _fill(b"X: =?utf-8?q?a?=\r\n", size) + b"\r\nbody\r\n"


def many_params(size: int) -> bytes:
    params = b"".join(b";\r\n filename*%d=a" % i for i in range(size // 18))
    return (
        HEAD
        + b"Content-Type: multipart/mixed; boundary=p\r\n\r\n--p\r\n"
        + b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment"
        + params
        + b"\r\n\r\nx\r\n--p--\r\n"
    )


def nested_html(size: int) -> bytes:
    head = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    return head + _fill(b"<div><b><i>x", size)


def html_entities(size: int) -> bytes:
    head = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    return head + _fill(b"<p>&amp;&#x41;&lt;<br>", size)


def html_white_space(size: int) -> bytes:
    head = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n<pre>"
    return head + _fill(b" \t\n", size)


def html_char_refs(size: int) -> bytes:
    head = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>"
    return head + _fill(b"&#65", size)


def long_references(size: int) -> bytes:
    return HEAD + b"References: " + _fill(b"<a> ", size) + b"\r\n\r\nbody\r\n"


def quoted_printable(size: int) -> bytes:
    head = HEAD + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    return head + _fill(b"=C3=A4=\r\n", size)


def long_subject(size: int) -> bytes:
    return HEAD + b"Subject: " + _fill(b"word ", size) + b"\r\n\r\nbody\r\n"


def long_display_name(size: int) -> bytes:
    return b"From: " + _fill(b'"q" w\\x (c) ', size) + b"<a@example.com>\r\n\r\nbody\r\n"


def long_folded_header(size: int) -> bytes:
    return HEAD + b"X-Long: " + _fill(b"w w w w w w w w w w\r\n\t", size) + b"w\r\n\r\nbody\r\n"


def at_the_inline_bounds(size: int) -> bytes:
    """Everything the inline rule allows at once, then filler."""
    received = b"Received: from a (b [192.0.2.1]) by c; Tue, 4 Mar 2025 09:15:00 +0100\r\n"
    head = (
        b'From: "=?utf-8?q?a?= =?utf-8?q?b?=" <a@b.c>\r\nTo: a@b.c, d@e.f, g@h.i\r\n'
        + received * 14
        + b"Subject: "
        + b"=?utf-8?q?=C3=A4?= " * 14
        + b"\r\n"
        + b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    )
    nest = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(7)
    )
    return head + nest + _fill(b"x" * 76 + b"\r\n", max(0, size - len(head) - len(nest)))


def plain(size: int) -> bytes:
    return HEAD + b"\r\n" + _fill(b"Just some ordinary words in a line.\r\n", size)


SHAPES: dict[str, Callable[[int], bytes]] = {
    "plain text (reference)": plain,
    "nested multipart": nested,
    "tiny parts": tiny_parts,
    "tiny attachments": tiny_attachments,
    "tiny text parts": tiny_text_parts,
    "many headers": many_headers,
    "many Received": many_received,
    "many recipients": many_recipients,
    "many address headers": many_address_headers,
    "encoded-word subject": encoded_subject,
    "encoded-word From name": encoded_from,
    "encoded-word headers": encoded_headers,
    "many parameters": many_params,
    "long subject": long_subject,
    "long display name": long_display_name,
    "long folded header": long_folded_header,
    "at the inline bounds": at_the_inline_bounds,
    "nested HTML tags": nested_html,
    "HTML entities": html_entities,
    "HTML white space": html_white_space,
    "HTML char references": html_char_refs,
    "long References": long_references,
    "quoted-printable soup": quoted_printable,
}
SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def best_ms(raw: bytes, repeat: int) -> float:
    """The best of ``repeat`` parses: the parse's own cost, without the machine's noise."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=1 << 20)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_parse")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    # mail-parser warns about every part it does not turn into text; not wanted here.
    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    inline_worst = 0.0
    print("parse time in ms (best of --repeat) by size (* = parsed on the event loop)")
    print(f"{'shape':24}" + "".join(f"{s // 1024:>8}K" for s in SIZES))
    for name, build in SHAPES.items():
        cells = []
        for size in SIZES:
            raw = build(size)
            inline = parse_inline([raw])
            cost = best_ms(raw, args.repeat)
            if inline:
                inline_worst = max(inline_worst, cost)
            cells.append(f"{cost:8.2f}{'*' if inline else ' '}")
        print(f"{name:24}" + "".join(cells))
    print(f"slowest parse the channel would run on the event loop: {inline_worst:.2f} ms")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
