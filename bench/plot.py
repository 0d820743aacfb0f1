"""Plot the many-accounts section of a ``bench channel --json`` report as a PNG.

``python -m bench plot REPORT.json OUT.png``

Two panels against N (accounts watched by one process): the process's RSS once all N
are idle (with the RSS each account adds, in a box), and the push latency at p50 and
p95. matplotlib is needed (the nox ``bench`` session installs it); it draws off screen.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any


def plot_accounts(report: dict[str, Any], out: pathlib.Path) -> None:
    """Draw the ``accounts`` rows of ``report`` into ``out``.

    Args:
        report: A ``python -m bench channel --json`` report with an ``accounts`` list.
        out: Where to write the PNG.

    Raises:
        ValueError: the report has no many-accounts rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report.get("accounts") or [], key=lambda r: r["n"])
    if not rows:
        raise ValueError("the report has no 'accounts' section (run without --skip-accounts)")
    ns = [r["n"] for r in rows]
    machine = report.get("machine_start", {})
    fig, (mem, lat) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)

    mem.plot(ns, [r["rss_after_mb"] for r in rows], "o-", color="tab:blue", label="all idle")
    mem.plot(
        ns,
        [r["rss_before_mb"] for r in rows],
        "--",
        color="tab:gray",
        label="before the first channel opens",
    )
    mem.set_ylabel("process RSS (MB)")
    mem.set_ylim(bottom=0, top=max(r["rss_after_mb"] for r in rows) * 1.2)
    mem.legend(loc="lower right", fontsize=8)
    per = "\n".join(f"N = {r['n']}: {r['per_account_kib']:,.0f} KiB" for r in rows)
    mem.text(
        0.03,
        0.97,
        f"RSS added per account\n{per}",
        transform=mem.transAxes,
        va="top",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"},
    )
    mem.set_title("Memory: N channels in one process")

    lat.plot(ns, [r["p50"] for r in rows], "o-", label="p50")
    lat.plot(ns, [r["p95"] for r in rows], "^-", label="p95")
    lat.set_ylabel("APPEND -> parsed message (ms)")
    top = max(r["p95"] for r in rows)
    lat.set_ylim(bottom=0, top=top * 1.25)
    lat.legend(loc="lower right")
    lat.set_title("Push latency while all N watch")
    lat.text(
        0.02,
        0.04,
        "about 500 ms of it is Dovecot holding\nEXISTS back from an idling session",
        transform=lat.transAxes,
        fontsize=8,
        color="dimgray",
    )

    for ax in (mem, lat):
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns], fontsize=8)
        ax.set_xlim(0, max(ns) * 1.05)
        ax.set_xlabel("accounts watched by one process (N)")
        ax.grid(True, which="major", alpha=0.3)
    load = machine.get("load") or ["?"]
    fig.suptitle(
        f"prxmail, many accounts in one process ({machine.get('nproc', '?')} CPUs,"
        f" {machine.get('cpu', '?')}; 1-min load {load[0]:.1f} at start)"
        if isinstance(load[0], float)
        else "prxmail, many accounts in one process",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Read a channel bench report and write the many-accounts plot.

    Args:
        argv: ``REPORT.json OUT.png``.

    Returns:
        0 on success, 2 when the report has no many-accounts rows.
    """
    parser = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__)
    parser.add_argument("report", type=pathlib.Path, help="bench channel --json output")
    parser.add_argument("out", type=pathlib.Path, help="PNG to write")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    try:
        plot_accounts(report, args.out)
    except ValueError as exc:
        print(exc)
        return 2
    print(f"wrote {args.out}")
    return 0
