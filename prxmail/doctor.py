"""``prxmail doctor``: check every step from configuration to a working mailbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from prxmail.config import load_config
from prxmail.errors import ConfigError

__all__ = ["run_doctor"]

EXIT_OK = 0
EXIT_BLOCKED = 1


def run_doctor(config_path: Path, *, as_json: bool, out: TextIO) -> int:
    """Run the checks and print one line per step.

    Args:
        config_path: The configuration file to check.
        as_json: Print one JSON document instead of lines.
        out: Where to print.

    Returns:
        0 when nothing blocks the channel, 1 otherwise.
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        if as_json:
            step = {"step": "config", "status": "fail", "problems": list(exc.problems)}
            print(json.dumps({"ok": False, "steps": [step]}, indent=2), file=out)
        else:
            print(f"FAIL config: {config_path}", file=out)
            for problem in exc.problems:
                print(f"     {problem}", file=out)
        return EXIT_BLOCKED
    if as_json:
        result = {
            "ok": True,
            "steps": [{"step": "config", "status": "pass", "warnings": list(config.warnings)}],
            "not_checked": ["imap", "smtp", "state"],
        }
        print(json.dumps(result, indent=2), file=out)
    else:
        print(f"PASS config: {config_path}", file=out)
        for warning in config.warnings:
            print(f"WARN config: {warning}", file=out)
        for line in config.describe():
            print(f"     {line}", file=out)
        print("SKIP network checks: not part of this release yet", file=out)
    return EXIT_OK
