"""The one connection-failure classification (prxmail._diagnosis) and its two users.

The table checks what each kind of exception -- as the clients actually wrap it --
is named; the channel tests check that serve's log lines carry the same diagnosis the
doctor prints, and say "cannot connect" only when no connection was ever made.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from prxmail._diagnosis import Diagnosis, diagnose
from prxmail._tls import Security
from prxmail.channel import open_mail_channel
from prxmail.config import Config, parse_config
from prxmail.doctor._network import _connect_error
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    RemoteProtocolError,
    TLSError,
)
from prxmail.smtp import SMTPConnection
from prxmail.state import OutboxDraft, StateStore, account_key
from tests.faults._logs import LogRecords, captured_logs
from tests.unit.test_channel_fake_imap import FakeIMAP, fake_config
from tests.unit.test_smtp_connection import FakeServer

pytestmark = pytest.mark.timeout(60)


def config_for(imap_port: int, smtp_port: int, state_dir: Path, **extra: str) -> Config:
    lines = [
        "[channels_config.email]",
        'imap_host = "127.0.0.1"',
        f"imap_port = {imap_port}",
        f'imap_security = "{extra.pop("imap_security", "plain")}"',
        'smtp_host = "127.0.0.1"',
        f"smtp_port = {smtp_port}",
        f'smtp_security = "{extra.pop("smtp_security", "plain")}"',
        'username = "bot@example.com"',
        'password = "pw"',
        'from_address = "bot@example.com"',
        'allowed_senders = ["alice@example.com"]',
        f'state_dir = "{state_dir}"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return parse_config("\n".join(lines) + "\n")


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wrapped(cause: BaseException) -> ConnectionBrokenError:
    """As the clients raise a connect failure: trio.open_tcp_stream's OSError (its
    attempts in an exception group) inside transport_failures' ConnectionBrokenError."""
    attempts = OSError("all attempts to connect to 127.0.0.1:993 failed")
    attempts.__cause__ = ExceptionGroup("attempts", [cause])
    error = ConnectionBrokenError("cannot connect to 127.0.0.1:993")
    error.__cause__ = attempts
    return error


def cert_error(code: int) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    error.verify_message = f"verify code {code}"
    return error


def not_tls_error() -> ssl.SSLError:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    return error


def tls_wrapped(cause: BaseException) -> TLSError:
    error = TLSError(f"TLS handshake failed: {cause}")
    error.__cause__ = trio.BrokenResourceError()
    error.__cause__.__cause__ = cause
    return error


CONFIG = config_for(993, 465, Path("/nonexistent"), imap_security="tls", smtp_security="tls")
STARTTLS_CONFIG = config_for(
    143, 587, Path("/nonexistent"), imap_security="starttls", smtp_security="starttls"
)


@pytest.mark.parametrize(
    ("exc", "config", "proto", "summary", "hint"),
    [
        (
            wrapped(OSError(errno.ECONNREFUSED, "Connection refused")),
            CONFIG,
            "imap",
            "connection to 127.0.0.1:993 refused: nothing listens on that port",
            "check imap_port (usually 993 (TLS) or 143 (STARTTLS))",
        ),
        (
            wrapped(OSError(errno.ENETUNREACH, "Network unreachable")),
            CONFIG,
            "imap",
            "network unreachable for 127.0.0.1:993",
            "no route to that network",
        ),
        (
            wrapped(OSError(errno.ETIMEDOUT, "timed out")),
            CONFIG,
            "smtp",
            "connection to 127.0.0.1:465 timed out",
            "a firewall drops the packets",
        ),
        (
            wrapped(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            CONFIG,
            "smtp",
            "127.0.0.1 does not resolve: no such host",
            "check the spelling of smtp_host",
        ),
        (
            wrapped(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")),
            CONFIG,
            "imap",
            "looking up 127.0.0.1 failed temporarily",
            "the DNS server cannot be reached",
        ),
        (
            tls_wrapped(cert_error(10)),
            CONFIG,
            "imap",
            "the server's certificate has expired",
            "must renew the certificate",
        ),
        (
            tls_wrapped(cert_error(62)),
            CONFIG,
            "smtp",
            "the server's certificate is not valid for the name '127.0.0.1'",
            "set smtp_host to a name the certificate was issued for",
        ),
        (
            tls_wrapped(cert_error(18)),
            CONFIG,
            "imap",
            "the server's certificate is self-signed",
            "set tls_ca_file to that CA's PEM file",
        ),
        (
            tls_wrapped(not_tls_error()),
            CONFIG,
            "imap",
            "the server answered in plain text, not TLS",
            "set imap_security = 'starttls'",
        ),
        (
            RemoteProtocolError("not an IMAP greeting", excerpt=b"\x16\x03\x01\x00"),
            STARTTLS_CONFIG,
            "imap",
            "the server answered with TLS, not a plain-text greeting",
            "set imap_security = 'tls'",
        ),
        (
            AuthenticationError("LOGIN refused", protocol="smtp"),
            CONFIG,
            "smtp",
            "the server refused the login",
            "check smtp_username and the password",
        ),
    ],
)
def test_the_cause_of_a_connect_failure_is_named_from_the_exception(
    exc: BaseException, config: Config, proto: str, summary: str, hint: str
) -> None:
    port = config.imap_port if proto == "imap" else config.smtp_port
    found = diagnose(exc, proto=proto, host="127.0.0.1", port=port, config=config)
    assert found is not None
    assert found.summary.startswith(summary), found
    assert hint in found.hint, found


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionBrokenError("the server closed the connection"),
        trio.TooSlowError(),
        RemoteProtocolError("garbage", excerpt=b"* NONSENSE"),
        # The TLS port mix-up the other way round is only visible with STARTTLS set.
        RemoteProtocolError("not an IMAP greeting", excerpt=b"\x16\x03\x01\x00"),
    ],
)
def test_failures_that_do_not_show_their_cause_get_no_diagnosis(exc: BaseException) -> None:
    assert diagnose(exc, proto="imap", host="127.0.0.1", port=993, config=CONFIG) is None


def test_a_wrapped_connect_error_gets_the_doctors_words() -> None:
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    doctor = _connect_error("127.0.0.1", 993, "imap", refused)
    found = diagnose(wrapped(refused), proto="imap", host="127.0.0.1", port=993, config=CONFIG)
    assert found == Diagnosis(*doctor)


def queue_due_reply(state_dir: Path) -> None:
    """A reply due now, so the sender connects as soon as the channel starts."""
    with StateStore(state_dir) as store:
        store.enqueue(
            account_key("bot@example.com", "127.0.0.1", 9),
            OutboxDraft(
                message_id="<due@example.com>",
                envelope_from="bot@example.com",
                envelope_to=("alice@example.com",),
                raw=b"Subject: hi\r\n\r\nhello\r\n",
            ),
        )


@pytest.fixture
def records() -> Iterator[LogRecords]:
    with captured_logs(logging.DEBUG) as handler:
        yield handler


async def wait_for(records: LogRecords, text: str) -> dict[str, object]:
    with trio.fail_after(10):
        while not records.fields(text):  # noqa: ASYNC110 - the log has no events
            await trio.sleep(0.02)
    return records.fields(text)[0]


async def test_watcher_that_never_connected_says_cannot_connect_with_the_diagnosis(
    tmp_path: Path, records: LogRecords
) -> None:
    port = closed_port()
    config = config_for(port, closed_port(), tmp_path / "state")
    async with open_mail_channel(config) as channel:
        fields = await wait_for(records, "IMAP cannot connect, retrying")
        assert channel.status.value.imap == "reconnecting"  # the status text is kept
    expected = _connect_error("127.0.0.1", port, "imap", OSError(errno.ECONNREFUSED, ""))
    assert fields["diagnosis"] == expected[0]
    assert fields["hint"] == expected[1]
    assert not records.fields("IMAP connection lost")


async def test_watcher_that_lost_a_connection_says_connection_lost_without_diagnosis(
    tmp_path: Path, records: LogRecords
) -> None:
    fake = FakeIMAP(drop_in_idle=True)
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)):
            fields = await wait_for(records, "IMAP connection lost, reconnecting")
        nursery.cancel_scope.cancel()
    assert "diagnosis" not in fields
    assert "hint" not in fields
    assert not records.fields("IMAP cannot connect")


async def test_sender_that_never_connected_says_cannot_connect_with_the_diagnosis(
    tmp_path: Path, records: LogRecords
) -> None:
    fake = FakeIMAP()
    smtp_port = closed_port()
    state = tmp_path / "state"
    config = config_for(9, smtp_port, state)
    queue_due_reply(state)
    async with trio.open_nursery() as nursery:
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)):
            fields = await wait_for(records, "SMTP cannot connect: reply not sent yet, will retry")
        nursery.cancel_scope.cancel()
    expected = _connect_error("127.0.0.1", smtp_port, "smtp", OSError(errno.ECONNREFUSED, ""))
    assert fields["diagnosis"] == expected[0]
    assert fields["hint"] == expected[1]
    assert fields["outbox_id"] is not None


def test_starttls_security_is_what_the_reverse_mix_up_needs() -> None:
    # Guards the table above: the configs differ in exactly the setting that matters.
    assert STARTTLS_CONFIG.imap_security is Security.STARTTLS
    assert CONFIG.imap_security is Security.TLS


async def test_sender_whose_connection_broke_keeps_the_old_wording_without_diagnosis(
    tmp_path: Path, records: LogRecords
) -> None:
    # The server greets and answers EHLO, then shuts down at MAIL: it was connected.
    server = FakeServer(
        override=lambda line: b"421 4.3.2 shutting down\r\n" if line.startswith("MAIL") else None
    )
    state = tmp_path / "state"
    queue_due_reply(state)
    fake = FakeIMAP()
    async with trio.open_nursery() as nursery:

        async def connect_smtp() -> SMTPConnection:
            client, far = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve, far)
            conn = SMTPConnection(client, security=Security.PLAIN, local_hostname="client.test")
            await conn.handshake()
            return conn

        config = config_for(9, closed_port(), state)
        async with open_mail_channel(
            config, connect_imap=fake.connector(nursery), connect_smtp=connect_smtp
        ):
            fields = await wait_for(records, "reply not sent yet, will retry")
        nursery.cancel_scope.cancel()
    assert not records.fields("SMTP cannot connect")
    assert "diagnosis" not in fields
    assert "421" in str(fields["error"])
