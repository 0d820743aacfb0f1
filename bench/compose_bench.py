"""Compose cost: ``prxmail.compose.compose_reply`` per reply, three typical shapes.

``python -m bench.compose_bench [--rounds 5] [--batch 2000] [--json FILE]``

What is measured (issue 7, the composition share of benchmark 4)
----------------------------------------------------------------
The CPU time of one ``compose_reply`` call in this process, no server involved,
for (a) a 300-byte ASCII reply to a short ASCII subject, (b) a 5 KB UTF-8 reply
(German prose, so quoted-printable) and (c) a reply to a 60-character non-ASCII
subject (RFC 2047 encoded words, folded). Each shape runs ``--rounds`` batches of
``--batch`` calls; the figure is the best batch's time per call, so a burst of load
from other processes inflates no figure. The load average is printed before and
after: figures taken under load are not comparable with quiet ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import sys
import time

from prxmail.compose import compose_reply
from prxmail.message import Address, Message

_ALICE = Address("alice@example.com", "Alice Example")
_NOW = dt.datetime(2026, 11, 24, 6, 0, 0, tzinfo=dt.UTC)


def _parent(subject: str) -> Message:
    return Message(
        uid=1,
        uidvalidity=1,
        from_=_ALICE,
        from_all=(_ALICE,),
        message_id="<parent.1@example.com>",
        subject=subject,
        references=("<root.1@example.com>", "<mid.2@example.com>"),
        in_reply_to="<mid.2@example.com>",
    )


def _ascii_body(size: int) -> str:
    line = "Thanks for your message, we will look into it shortly.\n"
    return (line * (size // len(line) + 1))[:size]


def _utf8_body(size: int) -> str:
    line = "Grüße aus Köln: die Größe der Änderung ist überschaubar, schön.\n"
    return (line * (size // len(line) + 1))[:size]


SHAPES = {
    "(a) 300 B ASCII reply": (_parent("Quarterly numbers"), _ascii_body(300)),
    "(b) 5 KB UTF-8 reply": (_parent("Quarterly numbers"), _utf8_body(5000)),
    "(c) 60-char non-ASCII subject": (
        _parent("Überprüfung der Größenänderung für München und Zürich, bitte"),
        _ascii_body(300),
    ),
}


def _best_per_call(parent: Message, body: str, rounds: int, batch: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            compose_reply(
                parent,
                body,
                from_address="bot@ours.example",
                from_name="PRX Bot",
                to=_ALICE,
                default_subject="PRX Message",
                now=_NOW,
            )
        best = min(best, (time.perf_counter() - start) / batch)
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compose_bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    report: dict[str, object] = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average {report['loadavg_before']}, {report['cpus']} CPUs")
    for label, (parent, body) in SHAPES.items():
        seconds = _best_per_call(parent, body, args.rounds, args.batch)
        print(f"{label}: compose_reply {seconds * 1e3:.3f} ms")
        report[label] = seconds * 1e3
    report["loadavg_after"] = os.getloadavg()
    print(f"load average {report['loadavg_after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
