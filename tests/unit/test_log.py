"""The log: no secrets in any line, one event per line, no foreign writer on stderr.

The end-to-end cases run ``prxmail serve`` (and a small script that sets up logging) as
subprocesses, because what matters is what lands on the process's real stderr: inside
pytest the root logger has pytest's own handlers, which would hide Python's unformatted
last-resort handler, and the CLI's start-up path is part of what is tested.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import prxmail.cli._serve
from prxmail._log import (
    MAX_FIELD_CHARS,
    get_logger,
    log_event,
    redacting,
    setup_logging,
)
from prxmail._redact import config_secrets
from prxmail.config import parse_config
from prxmail.service import serve_mail_channel

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
IMAP_PASSWORD = "S3cr3t-imap-pw"
SMTP_PASSWORD = "0ther-smtp-S3cr3t"
HANDLER = f"{sys.executable} -c pass"
HUMAN_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide loggers: put them back after each test."""
    root = logging.getLogger()
    ours = get_logger()
    saved = (list(root.handlers), list(ours.handlers), ours.level, ours.propagate)
    yield
    setup_logging("human", stream=io.StringIO())  # clears the secrets a test set up
    root.handlers[:] = saved[0]
    ours.handlers[:] = saved[1]
    ours.setLevel(saved[2])
    ours.propagate = saved[3]


# -- a scripted IMAP server that echoes the LOGIN arguments in its BYE ------------------


class _EchoLoginIMAP(socketserver.StreamRequestHandler):
    """Greets, answers CAPABILITY, and answers LOGIN with ``* BYE you sent: <args>``.

    The echo also carries the SMTP password, as a server sharing one backend with the
    submission service might: the log must be clean of every secret in the
    configuration, not only of the one this connection sent.
    """

    def handle(self) -> None:
        self.wfile.write(b"* OK [CAPABILITY IMAP4rev1] scripted\r\n")
        while line := self.rfile.readline():
            tag, _, rest = line.decode().rstrip("\r\n").partition(" ")
            if rest.upper().startswith("CAPABILITY"):
                self.wfile.write(f"* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n".encode())
            elif rest.upper().startswith("LOGIN"):
                echo = f"* BYE you sent: {rest[6:]} and {SMTP_PASSWORD}\r\n"
                self.wfile.write(echo.encode())
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            else:
                self.wfile.write(f"{tag} BAD unknown\r\n".encode())


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoLoginIMAP)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _config_text(port: int, tmp_path: Path, source: str, log_format: str) -> str:
    lines = [
        "[channels_config.email]",
        'imap_host = "127.0.0.1"',
        f"imap_port = {port}",
        'imap_security = "plain"',
        'smtp_host = "127.0.0.1"',
        "smtp_port = 9",
        'smtp_security = "plain"',
        'username = "bot@example.test"',
        'from_address = "bot@example.test"',
        'allowed_senders = ["alice@example.test"]',
        f'state_dir = "{tmp_path / "state"}"',
        f'log_format = "{log_format}"',
    ]
    if source == "config":
        lines += [f'password = "{IMAP_PASSWORD}"', f'smtp_password = "{SMTP_PASSWORD}"']
    elif source == "env":
        lines += ['password_env = "PRX_TEST_IMAP_PW"', 'smtp_password_env = "PRX_TEST_SMTP_PW"']
    else:
        (tmp_path / "imap.pw").write_text(IMAP_PASSWORD + "\n")
        (tmp_path / "smtp.pw").write_text(SMTP_PASSWORD + "\n")
        lines += [
            f'password_file = "{tmp_path / "imap.pw"}"',
            f'smtp_password_file = "{tmp_path / "smtp.pw"}"',
        ]
    return "\n".join(lines) + "\n"


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace") or proc.poll() is not None:
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in the log:\n{path.read_text()}")


def _assert_one_event_per_line(log: str, log_format: str) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for line in log.splitlines():  # splitlines: every Unicode line break counts
        if log_format == "json":
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            assert {"time", "level", "event"} <= obj.keys(), line
            events.append(obj)
        else:
            assert HUMAN_LINE.match(line), line
    return events


@pytest.mark.parametrize("log_format", ["human", "json"])
@pytest.mark.parametrize("source", ["config", "env", "file"])
def test_serve_log_has_no_password_when_the_server_echoes_it(
    tmp_path: Path, source: str, log_format: str
) -> None:
    with echo_server() as port:
        config = tmp_path / "prxmail.toml"
        config.write_text(_config_text(port, tmp_path, source, log_format))
        log_path = tmp_path / "serve.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env |= {"PRX_TEST_IMAP_PW": IMAP_PASSWORD, "PRX_TEST_SMTP_PW": SMTP_PASSWORD}
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prxmail", "serve", "-c", str(config), "--exec", HANDLER],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=env,
                cwd=tmp_path,
            )
            try:
                _wait_for(log_path, "IMAP connection lost", proc)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    log = log_path.read_text()
    assert "IMAP connection lost" in log
    assert "you sent: bot@example.test ***" in log  # the echo did reach the log...
    assert IMAP_PASSWORD not in log  # ...without either password
    assert SMTP_PASSWORD not in log
    _assert_one_event_per_line(log, log_format)


async def test_service_runner_redacts_even_when_logging_was_set_up_without_secrets(
    tmp_path: Path,
) -> None:
    """Library use: the application installed the formatter without any secrets; the
    service registers the configuration's own for as long as it runs."""
    out = io.StringIO()
    setup_logging("json", stream=out)
    with echo_server() as port:
        config = parse_config(_config_text(port, tmp_path, "config", "json"))
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: serve_mail_channel(config, exec_command=[sys.executable, "-c", ""])
                )
                while "IMAP connection lost" not in out.getvalue():  # noqa: ASYNC110
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    log = out.getvalue()
    assert "you sent: bot@example.test ***" in log
    assert IMAP_PASSWORD not in log
    assert SMTP_PASSWORD not in log
    # Once the service has stopped, its secrets are no longer registered.
    log_event(logging.INFO, "after", text=IMAP_PASSWORD)
    assert IMAP_PASSWORD in out.getvalue().splitlines()[-1]


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_exception_text_and_every_field_are_redacted(log_format: str) -> None:
    config = parse_config(_config_text(1, Path("/nonexistent"), "config", log_format))
    out = io.StringIO()
    setup_logging(log_format, stream=out, secrets=config_secrets(config))
    try:
        raise ConnectionError(f"peer said: LOGIN bot {IMAP_PASSWORD}")
    except ConnectionError:
        get_logger().exception("lost")
    log_event(logging.WARNING, f"event {SMTP_PASSWORD}", reason=f"x {IMAP_PASSWORD.upper()}")
    logging.getLogger("some.library").warning("echo %s", IMAP_PASSWORD)
    log = out.getvalue()
    assert IMAP_PASSWORD not in log
    assert IMAP_PASSWORD.upper() not in log
    assert SMTP_PASSWORD not in log
    assert log.count("***") >= 4
    _assert_one_event_per_line(log, log_format)


def test_a_cut_value_never_leaves_the_start_of_a_secret() -> None:
    out = io.StringIO()
    setup_logging("json", stream=out)
    with redacting([IMAP_PASSWORD]):
        # The secret straddles the cut: cutting first would keep "S3cr3t-i".
        log_event(logging.INFO, "cut", text="x" * (MAX_FIELD_CHARS - 10) + IMAP_PASSWORD)
    (line,) = out.getvalue().splitlines()
    assert "S3cr3t" not in line
    assert json.loads(line)["text"].endswith("***")


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_control_characters_in_fields_cannot_start_a_new_line(log_format: str) -> None:
    out = io.StringIO()
    setup_logging(log_format, stream=out)
    hostile = 'a\u2028b\x85c\x0bd\x1b[31me\r\n{"level":"error","event":"FORGED"}'
    log_event(logging.INFO, hostile, subject=hostile, name="x\u2029y")
    logging.getLogger("third.party").error(hostile)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    events = _assert_one_event_per_line(out.getvalue(), log_format)
    assert "\x1b" not in out.getvalue()
    assert "\\x1b[31m" in out.getvalue()  # shown, escaped: nothing is silently lost
    if log_format == "json":
        assert "FORGED" in str(events[0]["subject"])  # data inside the event, not an event
        assert events[1]["logger"] == "third.party"


_PARSE_CRAFTED = r"""
import sys
from prxmail._log import setup_logging
setup_logging(sys.argv[1])
from prxmail.message import parse_message
forged = '{"level":"error","event":"FORGED","time":"2026-01-01T00:00:00.000+00:00"}'
raw = (
    "From: alice@example.com\r\nTo: bot@example.com\r\nSubject: hi\r\n"
    "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    "--b\r\nContent-Type: application/octet-stream\r\n"
    f"Content-Disposition: attachment; filename==?utf-8?b?A?=\r\n {forged}\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n"
).encode()
message = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=10**6)
assert len(message.attachments) == 1
"""


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_a_crafted_attachment_name_cannot_forge_a_log_line(log_format: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PARSE_CRAFTED, log_format],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
        check=True,
    )
    # mail-parser did log the raw header text (so this tests something)...
    assert "Failed decoding header part" in done.stderr
    # ...but as one formatted event, not as a line of its own.
    events = _assert_one_event_per_line(done.stderr, log_format)
    assert len(done.stderr.splitlines()) == 1
    if log_format == "json":
        (event,) = events
        assert str(event["logger"]).startswith("mailparser")
        assert event["level"] == "error"


_THIRD_PARTY_LEVELS = r"""
import logging, sys
from prxmail._log import setup_logging
setup_logging("json")
logging.getLogger("mailparser").warning("one line per attachment")
logging.getLogger("mailparser").error("mailparser error")
logging.getLogger("other").info("chatter")
logging.getLogger("other").warning("other warning")
print(logging.getLogger("mailparser").level, file=sys.stdout)
"""


def test_logging_setup_owns_third_party_levels() -> None:
    """The mail-parser level is set by logging setup, without importing prxmail.message."""
    done = subprocess.run(
        [sys.executable, "-c", _THIRD_PARTY_LEVELS],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == str(logging.ERROR)
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["logger"], e["event"]) for e in events] == [
        ("mailparser", "mailparser error"),
        ("other", "other warning"),
    ]


def test_a_crash_in_serve_is_one_redacted_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (a bug) is logged like every other event instead of a
    raw traceback carrying the error text -- and the password -- to stderr."""
    config = tmp_path / "prxmail.toml"
    config.write_text(_config_text(1, tmp_path, "config", "json"))

    def crash(config: object, argv: object) -> None:
        raise RuntimeError(f"bug while talking: LOGIN bot {IMAP_PASSWORD}")

    monkeypatch.setattr(prxmail.cli._serve, "_run", crash)
    err = io.StringIO()
    code = prxmail.cli._serve.run_serve(
        config, exec_command=HANDLER, log_format="json", out=io.StringIO(), err=err
    )
    assert code == prxmail.cli._serve.EXIT_FAILURE
    events = _assert_one_event_per_line(err.getvalue(), "json")
    crashed = events[-1]
    assert crashed["event"] == "prxmail crashed"
    assert crashed["error"] == "RuntimeError: bug while talking: LOGIN bot ***"
    assert "test_log.py" in str(crashed["where"])
    assert IMAP_PASSWORD not in err.getvalue()


_WARNS = r"""
import sys, warnings
from prxmail._log import setup_logging
setup_logging(sys.argv[1])
warnings.warn("first line\n{\"level\":\"error\",\"event\":\"FORGED\"}", UserWarning)
"""


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_python_warnings_are_formatted_events(log_format: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", _WARNS, log_format],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
        check=True,
    )
    assert "first line" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    _assert_one_event_per_line(done.stderr, log_format)
