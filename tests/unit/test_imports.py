"""What importing a piece of prxmail loads: the sans-I/O cores stay free of I/O."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import prxmail
import prxmail.errors
import prxmail.imap

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, text=True
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("statement", ["import prxmail.imap._protocol", "import prxmail"])
def test_importing_the_imap_core_loads_no_io_parser_or_store(statement: str) -> None:
    loaded = _modules_after(statement)
    for heavy in ("trio", "mailparser", "prxmail.state", "prxmail.channel", "prxmail.message"):
        assert heavy not in loaded, f"{statement!r} loaded {heavy}"


def test_the_command_line_loads_its_runners_only_when_one_runs() -> None:
    # ``prxmail --version`` / ``--help`` must not pay for trio, the doctor or the store.
    loaded = _modules_after("import prxmail.cli")
    for heavy in ("trio", "prxmail.doctor", "prxmail.cli._serve", "prxmail.state"):
        assert heavy not in loaded, f"importing prxmail.cli loaded {heavy}"


def test_public_names_still_import_from_the_package() -> None:
    loaded = _modules_after("from prxmail import Message, open_mail_channel")
    assert {"prxmail.channel", "prxmail.message"} <= loaded
    for name in prxmail.__all__:
        assert getattr(prxmail, name) is not None
    for name in prxmail.imap.__all__:
        assert getattr(prxmail.imap, name) is not None
    # The error tree's two parents are public too: callers catch "any refusal" or "any
    # protocol breach" without naming each subclass.
    assert prxmail.ProtocolError is prxmail.errors.ProtocolError
    assert prxmail.CommandRefusedError is prxmail.errors.CommandRefusedError
    assert {"ProtocolError", "CommandRefusedError"} <= set(prxmail.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = prxmail.no_such_name  # type: ignore[attr-defined]
