"""The doctor's report as text: one line per step, details and hints indented.

Theory of operation: rendering only formats what the steps recorded (already
redacted and bounded by :data:`~._report.MAX_SERVER_TEXT`); the last line says
whether anything blocks the channel, which is also what the exit status says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prxmail.doctor._report import DoctorReport, Status

_MARKS: Final = {
    Status.PASS: "PASS",
    Status.WARN: "WARN",
    Status.FAIL: "FAIL",
    Status.SKIP: "SKIP",
}
_NAME_WIDTH: Final = 18
_INDENT: Final = " " * (5 + _NAME_WIDTH)


def render_accounts(reports: Sequence[DoctorReport]) -> str:
    """Several accounts' reports: one block each, headed by the account, then a summary.

    Args:
        reports: What :func:`run_account_checks` returned.

    Returns:
        The text, ending with a newline.
    """
    blocks = []
    for report in reports:
        title = f"account {report.account}" if report.account is not None else "configuration"
        blocks.append(f"== {title} ==\n" + render_text(report))
    blocked = [r.account or "configuration" for r in reports if not r.ok]
    if blocked:
        summary = f"BLOCKED: {len(blocked)} of {len(reports)} account(s): {', '.join(blocked)}"
    else:
        summary = f"OK: nothing blocks any of the {len(reports)} account(s)"
    return "\n".join(blocks) + "\n" + summary + "\n"


def render_text(report: DoctorReport) -> str:
    """The report as lines for a terminal: one per step, then details and fixes.

    Args:
        report: What :func:`run_checks` returned.

    Returns:
        The text, ending with a newline.
    """
    lines: list[str] = []
    for step in report.steps:
        lines.append(f"{_MARKS[step.status]} {step.name.ljust(_NAME_WIDTH - 1)} {step.summary}")
        lines.extend(f"{_INDENT}{line}" for line in step.detail)
        if step.hint and step.status in (Status.WARN, Status.FAIL):
            lines.append(f"{_INDENT}fix: {step.hint}")
    failed = [s.name for s in report.steps if s.status is Status.FAIL]
    warned = sum(1 for s in report.steps if s.status is Status.WARN)
    if failed:
        lines.append(f"BLOCKED: {len(failed)} step(s) failed: {', '.join(failed)}")
    else:
        note = f" ({warned} warning(s))" if warned else ""
        lines.append(f"OK: nothing blocks the channel{note}")
    return "\n".join(lines) + "\n"
