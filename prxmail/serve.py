"""``prxmail serve``: run the channel from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from prxmail.config import load_config
from prxmail.errors import ConfigError

__all__ = ["run_serve"]

EXIT_CONFIG = 2
EXIT_NOT_AVAILABLE = 3


def run_serve(
    config_path: Path,
    *,
    exec_command: str | None,
    log_format: str,
    out: TextIO,
    err: TextIO,
) -> int:
    """Load the configuration and run the channel until SIGINT/SIGTERM.

    Args:
        config_path: The configuration file.
        exec_command: Handler command line (overrides the configuration).
        log_format: ``"human"`` or ``"json"``.
        out, err: Where to print.

    Returns:
        The process exit status.
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"prxmail: {exc}", file=err)
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"prxmail: warning: {warning}", file=err)
    print("prxmail serve: configuration is valid. The channel would:", file=out)
    for line in config.describe():
        print(f"  - {line}", file=out)
    if exec_command:
        print(f"  - run the handler: {exec_command}", file=out)
    print(
        "prxmail serve: the mail service is not part of this release yet; nothing was started.",
        file=err,
    )
    return EXIT_NOT_AVAILABLE
