"""The README's main job: prxmail end to end against private local mail servers.

Starts Dovecot + Postfix on 127.0.0.1 (tests/mailservers.py), writes a configuration for
the bot account, runs ``prxmail doctor`` on it, shows what ``prxmail serve`` would do, and
stops the servers. Run with ``nox -s demo`` or ``python -m tests.demo``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.mailservers import mail_servers


def _run(argv: list[str]) -> int:
    print(f"\n$ {' '.join(argv)}", flush=True)
    return subprocess.run(argv, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__)
    parser.parse_args(argv)
    prxmail = [sys.executable, "-m", "prxmail"]
    with tempfile.TemporaryDirectory(prefix="prxmail-demo-") as tmp, mail_servers() as servers:
        config = Path(tmp) / "prxmail.toml"
        config.write_text(servers.prxmail_toml() + f'state_dir = "{tmp}/state"\n')
        print(f"started {servers!r}")
        print(f"configuration {config}:\n{config.read_text()}")
        status = _run([*prxmail, "doctor", "-c", str(config)])
        _run([*prxmail, "serve", "-c", str(config), "--exec", "cat"])
    print(f"\ndemo finished: doctor exit status {status}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
