"""``python -m bench SUITE|all [ARGS...]``: run benchmarks and print ratios.

``python -m bench plot REPORT.json OUT.png`` draws the many-accounts section of a
``bench channel --json`` report (a tool, not a suite: ``all`` does not run it).
"""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "imap": "bench.imap_bench",
    "smtp": "bench.smtp_bench",
    "channel": "bench.channel_bench",
    "memory": "bench.memory_bench",
    "outbox": "bench.outbox_bench",
    "parse": "bench.parse_bench",
    "compose": "bench.compose_bench",
    "store": "bench.store_bench",
    "load": "bench.load_bench",
}
TOOLS = {"plot": "bench.plot"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("suites:", ", ".join(SUITES), "or all; tools:", ", ".join(TOOLS))
        return 0
    name, rest = argv[0], argv[1:]
    if name in TOOLS:
        status: int = importlib.import_module(TOOLS[name]).main(rest)
        return status
    names = list(SUITES) if name == "all" else [name]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)} or all")
        return 2
    status = 0
    for suite in names:
        module = importlib.import_module(SUITES[suite])
        status = max(status, module.main(rest))
    return status


raise SystemExit(main(sys.argv[1:]))
