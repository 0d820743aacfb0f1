"""What importing a piece of prxmail loads: the sans-I/O cores stay free of I/O, and a
run that does not use a feature does not load it (issue 16: the memory baseline): the
channel and the ``prxmail serve`` import path load no HTTP client (only an OAuth 2 token
request needs httpx) and no health endpoint (h11, prometheus-client only with
``health_listen``)."""

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


def _modules_after(statement: str, **environ: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement`` (with
    ``environ`` added to its environment)."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environ}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, text=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


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


# Loaded only by the feature that needs it.
HTTP = ("httpx", "prxmail.oauth2._http")
TOKENS = ("prxmail.oauth2._token",)
HEALTH = ("h11", "prometheus_client", "prxmail._health", "prxmail._metrics")

PASSWORD_ACCOUNT = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "app-password"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
"""
OAUTH2_ACCOUNT = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
auth = "oauth2"
oauth2_token_url = "https://127.0.0.1:9/token"
oauth2_client_id = "client-1"
oauth2_refresh_token_env = "BOT_REFRESH"
"""


@pytest.mark.parametrize(
    "statement",
    [
        "import prxmail.channel",
        "import prxmail.service",
        "import prxmail.cli._serve",
        "from prxmail import open_mail_channel, serve_mail_channel",
    ],
)
def test_the_channel_and_the_serve_path_load_no_http_client_or_health_endpoint(
    statement: str,
) -> None:
    loaded = _modules_after(statement)
    assert "prxmail.channel" in loaded
    for unused in HTTP + TOKENS + HEALTH:
        assert unused not in loaded, f"{statement!r} loaded {unused}"


def test_a_password_login_builds_no_token_source() -> None:
    loaded = _modules_after(
        "import ssl\n"
        "from prxmail._login import AccountLogin\n"
        "from prxmail.config import parse_config\n"
        f"config = parse_config({PASSWORD_ACCOUNT!r})\n"
        "assert AccountLogin(config, ssl.create_default_context()).token_source is None"
    )
    for unused in HTTP + TOKENS:
        assert unused not in loaded


def test_an_oauth2_account_loads_httpx_only_for_the_token_request() -> None:
    build = (
        "import ssl\n"
        "from prxmail._login import AccountLogin\n"
        "from prxmail.config import parse_config\n"
        f"config = parse_config({OAUTH2_ACCOUNT!r})\n"
        "login = AccountLogin(config, ssl.create_default_context())\n"
        "assert type(login.token_source).__name__ == 'EndpointTokenSource'\n"
    )
    built = _modules_after(build, BOT_REFRESH="rt-1234")
    assert "prxmail.oauth2._token" in built
    for unused in HTTP:
        assert unused not in built
    # The request itself (refused: nothing listens on the discard port) loads it.
    fetched = _modules_after(
        build + "import trio\n"
        "from prxmail.oauth2 import OAuth2Error\n"
        "async def fetch():\n"
        "    try:\n"
        "        await login.token_source.token()\n"
        "    except OAuth2Error:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('a token from a closed port')\n"
        "trio.run(fetch)",
        BOT_REFRESH="rt-1234",
    )
    assert set(HTTP) <= fetched


def test_the_service_keeps_metrics_only_for_the_health_endpoint() -> None:
    parse = (
        "from prxmail.config import parse_config\n"
        "from prxmail.service import _service_metrics\n"
        f"table = {PASSWORD_ACCOUNT!r}\n"
    )
    without = _modules_after(parse + "assert _service_metrics(parse_config(table)) is None")
    for unused in HEALTH:
        assert unused not in without
    with_endpoint = _modules_after(
        parse + "on = parse_config(table + 'health_listen = \"127.0.0.1:9100\"\\n')\n"
        "assert type(_service_metrics(on)).__name__ == 'ServiceMetrics'"
    )
    assert {"prometheus_client", "prxmail._metrics"} <= with_endpoint
