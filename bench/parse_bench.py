"""Parse cost: ``prxmail.message.parse_message`` vs ``mailparser.parse_from_bytes``.

``python -m bench.parse_bench [--rounds 15] [--json FILE]``

What is measured (issue 7, the parse share of benchmark 2)
----------------------------------------------------------
The two messages of the backlog bench (``bench.channel_bench``): a 4 KB text/plain
message and a 200 KB message with a PDF attachment. Each contender parses the same
bytes in this process, no server involved: ``parse_message`` with the channel's
default attachment limit (25 MiB, so the attachment is decoded), and
``mailparser.parse_from_bytes``, which is what the peers of the backlog bench run
for every message. The contenders take turns, ``--rounds`` times, each turn a batch
of parses; the figure is the best batch's time per message, so a burst of load
from other processes on the machine inflates neither side's figure. The load
average is printed before and after: figures taken under load are not comparable
with quiet ones.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import time
from collections.abc import Callable

import mailparser  # type: ignore[import-untyped]

from bench.channel_bench import _attachment_message, _text_message
from prxmail.message import parse_message

# The channel's default max_message_bytes: attachments up to this are decoded.
ATTACHMENT_LIMIT = 25 * 1024 * 1024


def _prxmail(raw: bytes) -> object:
    return parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=ATTACHMENT_LIMIT)


CONTENDERS: dict[str, Callable[[bytes], object]] = {
    "prxmail parse_message": _prxmail,
    "mailparser.parse_from_bytes": mailparser.parse_from_bytes,
}


def _best_times(raw: bytes, batch: int, rounds: int) -> dict[str, float]:
    best = dict.fromkeys(CONTENDERS, float("inf"))
    for _ in range(rounds):
        for name, parse in CONTENDERS.items():
            start = time.perf_counter()
            for _ in range(batch):
                parse(raw)
            best[name] = min(best[name], (time.perf_counter() - start) / batch)
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parse_bench")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    messages = [
        ("4 KB text/plain", _text_message(1, 4096, "p"), 300),
        ("200 KB with PDF", _attachment_message(1, 200_000, "p", random.Random(1)), 20),
    ]
    report: dict[str, object] = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average {report['loadavg_before']}, {report['cpus']} CPUs")
    for label, raw, batch in messages:
        best = _best_times(raw, batch, args.rounds)
        ours, peer = best["prxmail parse_message"], best["mailparser.parse_from_bytes"]
        print(
            f"{label} ({len(raw)} bytes): parse_message {ours * 1e3:.3f} ms, "
            f"mailparser.parse_from_bytes {peer * 1e3:.3f} ms, ratio {peer / ours:.2f}x"
        )
        report[label] = {name: seconds * 1e3 for name, seconds in best.items()}
    report["loadavg_after"] = os.getloadavg()
    print(f"load average {report['loadavg_after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
