"""``prxmail doctor`` against scripted fake servers on loopback.

Each fake server injects one exact fault (a password echoed back, no greeting, plain
text on a TLS port, a bad certificate, a missing folder); the integration tests in
tests/integration/test_doctor.py run the same checks against the real servers.
"""

from __future__ import annotations

import base64
import datetime
import errno
import io
import json
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from prxmail._redact import Redactor, config_secrets
from prxmail.config import DEFAULT_POLL_INTERVAL_SECS, Config, parse_config
from prxmail.doctor import (
    EXIT_BLOCKED,
    EXIT_CONFIG,
    EXIT_OK,
    DoctorReport,
    Status,
    StepResult,
    Timeouts,
    render_text,
    run_checks,
    run_doctor,
)
from prxmail.doctor import _network as doctor_module
from prxmail.doctor import _run as doctor_run
from prxmail.doctor._network import _connect_error
from prxmail.state import MessageKey, OutboxDraft, StateStore, account_key
from prxmail.state._schema import SCHEMA_VERSION

HOST = "127.0.0.1"
USER = "bot@example.com"
PASSWORD = "Hunter2-Secret"
# Short limits so the tests that wait for a timeout stay fast.
FAST = Timeouts(dns=0.5, connect=1.0, tls=1.0, greeting=0.3, command=2.0, close=0.5)

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def write_config(tmp_path: Path, **values: Any) -> Path:
    settings: dict[str, Any] = {
        "imap_host": HOST,
        "imap_port": closed_port(),
        "imap_security": "tls",
        "smtp_host": HOST,
        "smtp_port": closed_port(),
        "smtp_security": "tls",
        "username": USER,
        "password": PASSWORD,
        "from_address": USER,
        "allowed_senders": ["alice@example.com"],
        "state_dir": str(tmp_path / "state"),
    }
    settings.update(values)
    lines = ["[channels_config.email]"]
    for key, value in settings.items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "prxmail.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def all_text(report: DoctorReport) -> str:
    return render_text(report) + json.dumps(report.to_json())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="doctor test CA")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    """Serve ``handler`` on a fresh loopback port until the test ends; return the port."""

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the doctor hung up or rejected our certificate: expected
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    await nursery.start(trio.serve_listeners, guarded, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


class Lines:
    """Reads CRLF lines from a stream (the fakes only need whole lines)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line


def tls_wrap(stream: trio.abc.Stream, context: ssl.SSLContext | None) -> trio.abc.Stream:
    if context is None:
        return stream
    return trio.SSLStream(stream, context, server_side=True)


def fake_imap(
    *,
    context: ssl.SSLContext | None = None,
    capabilities: str = "IMAP4rev1 IDLE AUTH=PLAIN",
    login_ok: bool = True,
    login_failure: str = "Authentication failed.",
    login_refusal: str = "NO [AUTHENTICATIONFAILED]",
    folders: tuple[str, ...] = ("INBOX", "Archive", "Sent Items"),
    starttls: ssl.SSLContext | None = None,
    uidvalidity: bool = True,
) -> Handler:
    """A scripted IMAP server: enough of RFC 3501 for the doctor's questions."""

    async def handler(raw: trio.SocketStream) -> None:
        stream = tls_wrap(raw, context)
        caps = capabilities + (" STARTTLS" if starttls is not None else "")
        await stream.send_all(b"* OK fake IMAP ready\r\n")
        reader = Lines(stream)
        while (line := await reader.line()) is not None:
            tag, _, rest = line.decode().partition(" ")
            command, _, args = rest.partition(" ")
            command = command.upper()
            if command == "UID":
                command, _, args = args.partition(" ")
                command = "UID " + command.upper()
            if command == "AUTHENTICATE":  # SASL PLAIN: one continuation, then as LOGIN
                await stream.send_all(b"+ \r\n")
                await reader.line()
                command = "LOGIN"
            out = ""
            if command == "CAPABILITY":
                out = f"* CAPABILITY {caps}\r\n{tag} OK done\r\n"
            elif command == "STARTTLS" and starttls is not None:
                await stream.send_all(f"{tag} OK begin TLS\r\n".encode())
                stream = trio.SSLStream(stream, starttls, server_side=True)
                reader = Lines(stream)
                continue
            elif command == "LOGIN":
                if login_ok:
                    out = f"{tag} OK [CAPABILITY {capabilities}] logged in\r\n"
                else:
                    out = f"{tag} {login_refusal} {login_failure}\r\n"
            elif command == "EXAMINE":
                name = args.strip('"')
                if name in folders:
                    validity = "* OK [UIDVALIDITY 4242] ok\r\n" if uidvalidity else ""
                    out = (
                        f"* 7 EXISTS\r\n* 0 RECENT\r\n{validity}"
                        f"* OK [UIDNEXT 8] ok\r\n{tag} OK [READ-ONLY] done\r\n"
                    )
                else:
                    out = f"{tag} NO [NONEXISTENT] Mailbox doesn't exist: {name}\r\n"
            elif command == "UID SEARCH":
                out = f"* SEARCH 3 5\r\n{tag} OK done\r\n"
            elif command == "LIST":
                out = "".join(f'* LIST (\\HasNoChildren) "/" "{f}"\r\n' for f in folders)
                out += f"{tag} OK done\r\n"
            elif command == "LOGOUT":
                await stream.send_all(f"* BYE bye\r\n{tag} OK done\r\n".encode())
                return
            else:
                out = f"{tag} BAD unknown command\r\n"
            await stream.send_all(out.encode())

    return handler


def fake_smtp(
    *,
    context: ssl.SSLContext | None = None,
    auth_ok: bool = True,
    auth_failure: str = "5.7.8 authentication failed",
    auth_code: int = 535,
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10485760", "8BITMIME", "AUTH PLAIN LOGIN"),
) -> Handler:
    async def handler(raw: trio.SocketStream) -> None:
        stream = tls_wrap(raw, context)
        await stream.send_all(b"220 fake ESMTP\r\n")
        reader = Lines(stream)
        while (line := await reader.line()) is not None:
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                lines = ["fake", *extensions]
                text = "".join(f"250-{item}\r\n" for item in lines[:-1]) + f"250 {lines[-1]}\r\n"
                await stream.send_all(text.encode())
            elif verb == b"AUTH":
                reply = "235 2.7.0 ok" if auth_ok else f"{auth_code} {auth_failure}"
                await stream.send_all(reply.encode() + b"\r\n")
            elif verb == b"QUIT":
                await stream.send_all(b"221 bye\r\n")
                return
            else:
                await stream.send_all(b"502 5.5.2 unknown\r\n")

    return handler


def statuses(report: DoctorReport) -> dict[str, Status]:
    return {step.name: step.status for step in report.steps}


# -- configuration ----------------------------------------------------------------------


async def test_config_errors_are_reported_with_key_paths_and_nothing_else_runs(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, imap_prot=993, smtp_port="465")
    report = await run_checks(path)
    assert not report.ok
    assert [s.name for s in report.steps] == ["config"]
    problems = "\n".join(report.step("config").detail)
    assert "unknown key 'imap_prot'" in problems
    assert "@ $.channels_config.email.smtp_port" in problems
    assert PASSWORD not in all_text(report)
    assert report.exit_status == EXIT_CONFIG


async def test_an_unreadable_config_file_exits_2(tmp_path: Path) -> None:
    report = await run_checks(tmp_path / "no-such.toml")
    assert [(s.name, s.status) for s in report.steps] == [("config", Status.FAIL)]
    assert report.exit_status == EXIT_CONFIG


async def test_the_config_is_loaded_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading reads files and parses certificates: a slow disk must not stall the loop.
    loop_thread = threading.get_ident()
    loaded_in: list[int] = []
    real_load = doctor_run.load_config

    def recording_load(path: Path) -> Config:
        loaded_in.append(threading.get_ident())
        return real_load(path)

    monkeypatch.setattr(doctor_run, "load_config", recording_load)
    report = await run_checks(write_config(tmp_path), timeouts=FAST)
    assert report.step("config").status is Status.PASS
    assert loaded_in
    assert loop_thread not in loaded_in


async def test_port_mode_mismatch_in_config_is_a_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path, imap_port=143, imap_security="tls")
    report = await run_checks(path, timeouts=FAST)
    config = report.step("config")
    assert config.status is Status.WARN
    assert any("imap_port 143 is normally STARTTLS" in line for line in config.detail)


# -- DNS and TCP ------------------------------------------------------------------------


async def test_closed_ports_are_refused_and_later_steps_skipped(tmp_path: Path) -> None:
    start = time.monotonic()
    report = await run_checks(write_config(tmp_path), timeouts=FAST)
    assert time.monotonic() - start < 3
    assert not report.ok
    assert report.exit_status == EXIT_BLOCKED
    tcp = report.step("imap.tcp")
    assert tcp.status is Status.FAIL
    assert "refused" in tcp.summary
    assert "imap_port" in tcp.hint
    assert report.step("smtp.tcp").status is Status.FAIL
    for name in ("imap.tls", "imap.login", "imap.idle", "smtp.greeting", "smtp.auth"):
        step = report.step(name)
        assert step.status is Status.SKIP
        assert "failed" in step.summary
    # The checks that need no network still run.
    assert report.step("policy").status is Status.PASS
    assert report.step("state.dir").status is Status.PASS


class _Resolver(trio.abc.HostnameResolver):
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    async def getaddrinfo(  # noqa: PLR0917 - the signature trio's ABC defines
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        if self.behaviour == "hang":
            await trio.sleep_forever()
        if self.behaviour == "again":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [("none", "does not resolve"), ("again", "failed temporarily"), ("hang", "did not finish")],
)
async def test_dns_failures_are_told_apart(tmp_path: Path, behaviour: str, expected: str) -> None:
    trio.socket.set_custom_hostname_resolver(_Resolver(behaviour))
    path = write_config(tmp_path, imap_host="imap.example.test", smtp_host="smtp.example.test")
    start = time.monotonic()
    report = await run_checks(path, timeouts=FAST)
    assert time.monotonic() - start < 3
    for proto in ("imap", "smtp"):
        step = report.step(f"{proto}.dns")
        assert step.status is Status.FAIL
        assert expected in step.summary
        assert report.step(f"{proto}.tcp").status is Status.SKIP


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ECONNREFUSED, "refused"),
        (errno.ENETUNREACH, "network unreachable"),
        (errno.EHOSTUNREACH, "no route to host"),
        (errno.ETIMEDOUT, "timed out"),
        (errno.EACCES, "not permitted"),
    ],
)
def test_connect_errors_are_named(code: int, words: str) -> None:
    summary, hint = _connect_error("mail.example.com", 993, "imap", OSError(code, "x"))
    assert words in summary
    assert "mail.example.com:993" in summary
    assert hint


class _HangingSocket:
    """Stands in for a socket whose SYNs a firewall drops: connect() never returns."""

    def __init__(self, *args: object) -> None:
        self.closed = False

    async def connect(self, address: object) -> None:
        await trio.sleep_forever()

    def close(self) -> None:
        self.closed = True


async def test_connect_that_never_completes_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trio.socket, "socket", _HangingSocket)
    start = time.monotonic()
    report = await run_checks(write_config(tmp_path), timeouts=FAST)
    assert time.monotonic() - start < FAST.connect + 1.5
    tcp = report.step("imap.tcp")
    assert tcp.status is Status.FAIL
    assert f"timed out after {FAST.connect:g} s" in tcp.summary
    assert "firewall" in tcp.hint


async def test_a_bug_in_a_check_is_a_failure_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor_module, "_step_dns", broken)
    report = await run_checks(write_config(tmp_path), timeouts=FAST)
    dns = report.step("imap.dns")
    assert dns.status is Status.FAIL
    assert dns.summary == "unexpected error: RuntimeError: boom"
    assert report.step("imap.tcp").status is Status.SKIP
    assert report.step("policy").status is Status.PASS


async def test_chain_time_limit(tmp_path: Path, nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await serve(nursery, silent)
    path = write_config(tmp_path, imap_port=port, imap_security="plain")
    limits = Timeouts(greeting=30.0, chain=0.4)
    start = time.monotonic()
    report = await run_checks(path, timeouts=limits)
    assert time.monotonic() - start < 2
    greeting = report.step("imap.greeting")
    assert greeting.status is Status.FAIL
    assert "did not finish within 0.4 s" in greeting.summary


# -- greeting and TLS faults ------------------------------------------------------------


async def test_server_that_never_greets_means_implicit_tls_port(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await serve(nursery, silent)
    path = write_config(tmp_path, imap_port=port, imap_security="starttls")
    start = time.monotonic()
    report = await run_checks(path, timeouts=FAST)
    assert time.monotonic() - start < 3
    greeting = report.step("imap.greeting")
    assert greeting.status is Status.FAIL
    assert "no greeting" in greeting.summary
    assert "imap_security = 'tls'" in greeting.hint
    assert report.step("imap.tls").status is Status.SKIP


async def test_tls_server_that_never_greets(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))

    async def handshake_then_silence(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, context, server_side=True)
        await stream.do_handshake()
        await trio.sleep_forever()

    port = await serve(nursery, handshake_then_silence)
    path = write_config(tmp_path, imap_port=port, tls_ca_file=str(ca_file))
    report = await run_checks(path, timeouts=FAST)
    assert report.step("imap.tls").status is Status.PASS
    greeting = report.step("imap.greeting")
    assert greeting.status is Status.FAIL
    assert "TLS is up but the server sent no greeting" in greeting.summary
    assert "imap_port" in greeting.hint


async def test_tls_port_speaking_plain_text_means_starttls(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = await serve(nursery, fake_imap())
    smtp_port = await serve(nursery, fake_smtp())
    path = write_config(tmp_path, imap_port=port, smtp_port=smtp_port)
    report = await run_checks(path, timeouts=FAST)
    for proto, said in (("imap", "* OK fake IMAP ready"), ("smtp", "220 fake ESMTP")):
        tls = report.step(f"{proto}.tls")
        assert tls.status is Status.FAIL
        assert "plain text" in tls.summary
        assert said in tls.summary
        assert f"{proto}_security = 'starttls'" in tls.hint
        assert report.step(f"{proto}.greeting").status is Status.SKIP


async def test_plain_port_answering_with_tls_bytes(tmp_path: Path, nursery: trio.Nursery) -> None:
    async def tls_alert(stream: trio.SocketStream) -> None:
        await stream.send_all(b"\x15\x03\x03\x00\x02\x02\x46")
        await trio.sleep_forever()

    port = await serve(nursery, tls_alert)
    path = write_config(tmp_path, smtp_port=port, smtp_security="starttls")
    report = await run_checks(path, timeouts=FAST)
    greeting = report.step("smtp.greeting")
    assert greeting.status is Status.FAIL
    assert "answered with TLS" in greeting.summary
    assert "smtp_security = 'tls'" in greeting.hint


@pytest.mark.parametrize(
    ("proto", "refusal", "words"),
    [
        ("smtp", b"554 5.7.1 no service for you\r\n", "refused the session: 554"),
        ("imap", b"* BYE too many connections\r\n", "too many connections"),
    ],
)
async def test_greeting_refusals(
    tmp_path: Path, nursery: trio.Nursery, proto: str, refusal: bytes, words: str
) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await stream.send_all(refusal)

    port = await serve(nursery, refuse)
    path = write_config(tmp_path, **{f"{proto}_port": port, f"{proto}_security": "plain"})
    report = await run_checks(path, timeouts=FAST)
    greeting = report.step(f"{proto}.greeting")
    assert greeting.status is Status.FAIL
    assert words in greeting.summary
    assert greeting.hint


async def test_wrong_protocol_on_port_is_named(tmp_path: Path, nursery: trio.Nursery) -> None:
    smtp_port = await serve(nursery, fake_smtp())
    path = write_config(tmp_path, imap_port=smtp_port, imap_security="starttls")
    report = await run_checks(path, timeouts=FAST)
    greeting = report.step("imap.greeting")
    assert greeting.status is Status.FAIL
    assert "greets like SMTP" in greeting.summary


@pytest.mark.parametrize(
    "case",
    [
        ("expired", "has expired", "renew"),
        ("wrong-name", "not valid for the name", "imap_host"),
        ("untrusted", "does not trust", "tls_ca_file"),
    ],
    ids=lambda case: case[0],
)
async def test_certificate_problems_are_classified(
    tmp_path: Path,
    nursery: trio.Nursery,
    ca: trustme.CA,
    ca_file: Path,
    case: tuple[str, str, str],
) -> None:
    kind, words, hint_words = case
    now = datetime.datetime.now(datetime.UTC)
    if kind == "expired":
        cert = ca.issue_cert(
            HOST,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    elif kind == "wrong-name":
        cert = ca.issue_cert("other.example.com")
    else:
        cert = trustme.CA().issue_cert(HOST)
    port = await serve(nursery, fake_imap(context=server_context(cert)))
    path = write_config(tmp_path, imap_port=port, tls_ca_file=str(ca_file))
    report = await run_checks(path, timeouts=FAST)
    tls = report.step("imap.tls")
    assert tls.status is Status.FAIL
    assert words in tls.summary
    assert hint_words in tls.hint
    assert report.step("imap.greeting").status is Status.SKIP


async def test_self_signed_certificate_is_named(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA
) -> None:
    # A CA certificate served as the leaf: self-signed, and trusted by nobody here.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.cert_pem.write_to_path(str(tmp_path / "self.pem"))
    ca.private_key_pem.write_to_path(str(tmp_path / "self.key"))
    context.load_cert_chain(tmp_path / "self.pem", tmp_path / "self.key")
    port = await serve(nursery, fake_imap(context=context))
    report = await run_checks(write_config(tmp_path, imap_port=port), timeouts=FAST)
    tls = report.step("imap.tls")
    assert tls.status is Status.FAIL
    assert "self-signed" in tls.summary
    assert "tls_ca_file" in tls.hint


async def test_missing_ca_file_is_a_config_failure(tmp_path: Path) -> None:
    # Checked when the configuration is loaded, so no network step runs at all.
    path = write_config(tmp_path, tls_ca_file=str(tmp_path / "missing.pem"))
    report = await run_checks(path, timeouts=FAST)
    (step,) = report.steps
    assert (step.name, step.status) == ("config", Status.FAIL)
    (problem,) = step.detail
    assert problem.endswith("No such file or directory @ $.channels_config.email.tls_ca_file")


# -- protocol steps ---------------------------------------------------------------------


async def test_everything_passes_against_good_fakes(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context))
    smtp_port = await serve(nursery, fake_smtp(context=context))
    path = write_config(
        tmp_path, imap_port=imap_port, smtp_port=smtp_port, tls_ca_file=str(ca_file)
    )
    report = await run_checks(path, timeouts=FAST)
    assert report.ok, render_text(report)
    assert report.exit_status == EXIT_OK
    assert all(s.status is Status.PASS for s in report.steps), render_text(report)
    folder = report.step("imap.folder").summary
    assert "7 messages" in folder
    assert "2 unseen" in folder
    assert "UIDVALIDITY 4242" in folder
    ehlo = report.step("smtp.ehlo").summary
    assert "SIZE 10 MiB" in ehlo
    assert "PIPELINING" in ehlo
    assert "AUTH LOGIN PLAIN" in ehlo
    assert "TLSv1" in report.step("imap.tls").summary


async def test_starttls_on_both_protocols(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))

    async def smtp_starttls(raw: trio.SocketStream) -> None:
        await raw.send_all(b"220 fake ESMTP\r\n")
        reader = Lines(raw)
        stream: trio.abc.Stream = raw
        while (line := await reader.line()) is not None:
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO" and stream is raw:
                await stream.send_all(b"250-fake\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                await stream.send_all(b"220 go ahead\r\n")
                stream = trio.SSLStream(raw, context, server_side=True)
                reader = Lines(stream)
            elif verb == b"EHLO":
                await stream.send_all(b"250-fake\r\n250 AUTH PLAIN\r\n")
            elif verb == b"AUTH":
                await stream.send_all(b"235 ok\r\n")
            else:
                await stream.send_all(b"221 bye\r\n")
                return

    imap_port = await serve(nursery, fake_imap(starttls=context))
    smtp_port = await serve(nursery, smtp_starttls)
    path = write_config(
        tmp_path,
        imap_port=imap_port,
        imap_security="starttls",
        smtp_port=smtp_port,
        smtp_security="starttls",
        tls_ca_file=str(ca_file),
    )
    report = await run_checks(path, timeouts=FAST)
    assert report.ok, render_text(report)
    names = [s.name for s in report.steps]
    assert names.index("imap.greeting") < names.index("imap.tls")
    assert report.step("imap.tls").summary.startswith("STARTTLS up")
    assert report.step("smtp.tls").summary.startswith("STARTTLS up")
    assert report.step("smtp.ehlo").summary == "AUTH PLAIN"


async def test_starttls_not_offered(tmp_path: Path, nursery: trio.Nursery) -> None:
    imap_port = await serve(nursery, fake_imap())
    path = write_config(tmp_path, imap_port=imap_port, imap_security="starttls")
    report = await run_checks(path, timeouts=FAST)
    tls = report.step("imap.tls")
    assert tls.status is Status.FAIL
    assert "does not offer" in tls.summary
    assert "imap_security = 'tls'" in tls.hint


async def test_echoed_password_never_appears(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    plain_blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    b64_password = base64.b64encode(PASSWORD.encode()).decode()
    echo = f"you sent {PASSWORD} aka {PASSWORD.upper()} aka {b64_password} aka {plain_blob}"
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context, login_ok=False, login_failure=echo))
    smtp_port = await serve(
        nursery, fake_smtp(context=context, auth_ok=False, auth_failure="5.7.8 " + echo)
    )
    path = write_config(
        tmp_path, imap_port=imap_port, smtp_port=smtp_port, tls_ca_file=str(ca_file)
    )
    report = await run_checks(path, timeouts=FAST)
    login, auth = report.step("imap.login"), report.step("smtp.auth")
    assert login.status is Status.FAIL
    assert "authentication failed" in login.summary
    assert "app password" in login.hint
    assert "IMAP" in login.hint
    assert auth.status is Status.FAIL
    assert "authentication failed" in auth.summary
    assert "you sent ***" in login.summary
    assert "you sent ***" in auth.summary
    text = all_text(report)
    for secret in (PASSWORD, PASSWORD.upper(), b64_password, b64_password.rstrip("="), plain_blob):
        assert secret not in text
    out = io.StringIO()
    run_doctor_out = await trio.to_thread.run_sync(lambda: run_doctor(path, as_json=False, out=out))
    assert run_doctor_out == EXIT_BLOCKED
    assert PASSWORD not in out.getvalue()
    assert b64_password not in out.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        ("NO [UNAVAILABLE]", "authentication failed", "try again later"),
        ("NO [EXPIRED]", "authentication failed", "has expired"),
        ("NO [PRIVACYREQUIRED]", "authentication failed", "imap_security = 'tls'"),
        ("BAD", "did not accept the LOGIN command", "check imap_host and imap_port"),
    ],
)
async def test_imap_login_refusals_are_told_apart_by_their_code(
    tmp_path: Path,
    nursery: trio.Nursery,
    ca: trustme.CA,
    ca_file: Path,
    case: tuple[str, str, str],
) -> None:
    refusal, summary, advice = case
    context = server_context(ca.issue_cert(HOST))
    port = await serve(
        nursery,
        fake_imap(context=context, login_ok=False, login_refusal=refusal, login_failure="no"),
    )
    path = write_config(tmp_path, imap_port=port, tls_ca_file=str(ca_file))
    login = (await run_checks(path, timeouts=FAST)).step("imap.login")
    assert login.status is Status.FAIL
    assert summary in login.summary
    assert advice in login.hint
    assert "app password" not in login.hint  # not a wrong-password case


@pytest.mark.parametrize(
    "case",
    [
        (538, "5.7.11 Encryption required", "smtp_security = 'tls'"),
        (534, "5.7.9 Application-specific password required", "stronger mechanism"),
        (535, "5.7.8 bad credentials", "smtp_username and smtp_password"),
    ],
)
async def test_smtp_auth_refusals_are_told_apart_by_their_codes(
    tmp_path: Path,
    nursery: trio.Nursery,
    ca: trustme.CA,
    ca_file: Path,
    case: tuple[int, str, str],
) -> None:
    code, text, advice = case
    context = server_context(ca.issue_cert(HOST))
    port = await serve(
        nursery, fake_smtp(context=context, auth_ok=False, auth_code=code, auth_failure=text)
    )
    path = write_config(tmp_path, smtp_port=port, tls_ca_file=str(ca_file))
    auth = (await run_checks(path, timeouts=FAST)).step("smtp.auth")
    assert auth.status is Status.FAIL
    assert f"authentication failed for {USER}: {code}" in auth.summary
    assert advice in auth.hint


async def test_missing_folder_lists_existing_ones(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context))
    path = write_config(tmp_path, imap_port=imap_port, imap_folder="Bots", tls_ca_file=str(ca_file))
    report = await run_checks(path, timeouts=FAST)
    folder = report.step("imap.folder")
    assert folder.status is Status.FAIL
    assert "'Bots'" in folder.summary
    assert "doesn't exist" in folder.summary
    assert folder.detail == ("folders on the server: Archive, INBOX, Sent Items",)
    assert "imap_folder" in folder.hint
    assert report.step("imap.idle").status is Status.SKIP


async def test_no_idle_is_a_warning_not_a_failure(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context, capabilities="IMAP4rev1"))
    smtp_port = await serve(nursery, fake_smtp(context=context))
    path = write_config(
        tmp_path, imap_port=imap_port, smtp_port=smtp_port, tls_ca_file=str(ca_file)
    )
    report = await run_checks(path, timeouts=FAST)
    idle = report.step("imap.idle")
    assert idle.status is Status.WARN
    assert f"poll for new mail every {DEFAULT_POLL_INTERVAL_SECS} s" in idle.summary
    assert "poll_interval_secs" in idle.hint
    assert report.ok


async def test_folder_without_uidvalidity_fails(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context, uidvalidity=False))
    path = write_config(tmp_path, imap_port=imap_port, tls_ca_file=str(ca_file))
    report = await run_checks(path, timeouts=FAST)
    folder = report.step("imap.folder")
    assert folder.status is Status.FAIL
    assert "UIDVALIDITY not reported" in folder.summary
    assert "UIDVALIDITY" in folder.hint


async def test_smtp_without_auth_is_named(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    smtp_port = await serve(nursery, fake_smtp(context=context, extensions=("PIPELINING",)))
    path = write_config(tmp_path, smtp_port=smtp_port, tls_ca_file=str(ca_file))
    report = await run_checks(path, timeouts=FAST)
    auth = report.step("smtp.auth")
    assert auth.status is Status.FAIL
    assert "no AUTH" in auth.summary
    assert "587" in auth.hint


# -- checks without network -------------------------------------------------------------


@pytest.mark.parametrize(
    ("senders", "status", "words"),
    [
        ([], Status.WARN, "nobody will be answered"),
        (["*"], Status.WARN, "anyone can make the bot answer"),
        (["alice@example.com", "@example.org"], Status.PASS, "alice@example.com, @example.org"),
    ],
)
async def test_policy(tmp_path: Path, senders: list[str], status: Status, words: str) -> None:
    report = await run_checks(write_config(tmp_path, allowed_senders=senders), timeouts=FAST)
    policy = report.step("policy")
    assert policy.status is status
    assert words in policy.summary
    # The config step does not repeat the policy warning.
    assert report.step("config").status is Status.PASS


async def test_from_address_outside_login_domain_warns(tmp_path: Path) -> None:
    path = write_config(tmp_path, from_address="bot@other.example")
    report = await run_checks(path, timeouts=FAST)
    step = report.step("smtp.from_address")
    assert step.status is Status.WARN
    assert "example.com" in step.summary
    same = await run_checks(write_config(tmp_path, from_address="x@example.com"), timeouts=FAST)
    assert same.step("smtp.from_address").status is Status.PASS


async def test_state_dir_that_is_a_file_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "state-file"
    blocker.write_text("not a directory")
    report = await run_checks(write_config(tmp_path, state_dir=str(blocker)), timeouts=FAST)
    assert report.step("state.dir").status is Status.FAIL
    assert "not a directory" in report.step("state.dir").summary


async def test_state_is_not_created_by_the_doctor(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    report = await run_checks(write_config(tmp_path, state_dir=str(state)), timeouts=FAST)
    assert report.step("state.dir").status is Status.PASS
    assert "can be created" in report.step("state.dir").summary
    assert report.step("state.db").status is Status.PASS
    assert not (tmp_path / "deep").exists()


async def test_existing_state_shows_outbox_and_last_uid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_config(tmp_path, imap_port=993, state_dir=str(state))
    account = account_key(USER, HOST, 993)
    with StateStore(state) as store:
        store.sync_mailbox(account, "INBOX", 777)
        store.advance_high_water_mark(account, "INBOX", 777, 41)
        draft = OutboxDraft(
            message_id="<r1@example.com>",
            envelope_from=USER,
            envelope_to=("alice@example.com",),
            raw=b"Subject: hi\r\n\r\nhello\r\n",
        )
        store.enqueue(account, draft)
        # serve still holds the directory lock: the doctor must read anyway.
        report = await run_checks(path, timeouts=FAST)
    db = report.step("state.db")
    assert db.status is Status.PASS
    assert "1 replies waiting" in db.summary
    assert "last processed UID 41 in 'INBOX'" in db.summary
    assert "UIDVALIDITY 777" in db.detail[0]


async def test_state_step_counts_deferred_and_held_messages(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_config(tmp_path, imap_port=993, state_dir=str(state))
    account = account_key(USER, HOST, 993)
    with StateStore(state) as store:
        store.sync_mailbox(account, "INBOX", 1)
        keys = [MessageKey(account, "INBOX", 1, uid) for uid in (1, 2, 3)]
        for key in keys:
            store.claim(key, f"<m{key.uid}@example.com>")
        store.record_admission(
            account,
            deferred=[(keys[0], 1e12, "rate-limited"), (keys[1], 1e12, "rate-limited")],
            held=[(keys[2], "loop suspected")],
        )
        report = await run_checks(path, timeouts=FAST)
    db = report.step("state.db")
    assert "2 messages deferred, 1 held" in db.summary
    assert db.status is Status.WARN
    assert "thread held" in db.hint


async def test_unreadable_state_database_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"this is not a database" * 100)
    report = await run_checks(write_config(tmp_path, state_dir=str(state)), timeouts=FAST)
    db = report.step("state.db")
    assert db.status is Status.FAIL
    assert "cannot be read" in db.summary
    assert db.hint


def _set_schema_version(state: Path, version: int) -> None:
    with StateStore(state):
        pass
    conn = sqlite3.connect(state / "state.sqlite3")
    with conn:
        conn.execute("DELETE FROM schema_version")
        if version:
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
    conn.close()


@pytest.mark.parametrize(
    ("offset", "status", "advice"),
    [(-1, Status.WARN, "upgrades it when it next starts"), (1, Status.FAIL, "upgrade prxmail")],
)
async def test_state_schema_version_is_judged_by_the_versions(
    tmp_path: Path, offset: int, status: Status, advice: str
) -> None:
    # Older: serve migrates it, so a warning. Newer: this prxmail is too old -- the
    # fix is an upgrade, not a restore from backup.
    state = tmp_path / "state"
    _set_schema_version(state, SCHEMA_VERSION + offset)
    report = await run_checks(write_config(tmp_path, state_dir=str(state)), timeouts=FAST)
    db = report.step("state.db")
    assert db.status is status
    assert advice in db.hint
    assert "backup" not in db.hint


# -- output -----------------------------------------------------------------------------


def test_redactor_covers_wire_forms() -> None:
    config = parse_config(
        "[channels_config.email]\n"
        'imap_host = "h"\nsmtp_host = "h"\nusername = "u@x.org"\n'
        'password = "pa\\"ss"\nfrom_address = "u@x.org"\n'
        'smtp_username = "s@x.org"\nsmtp_password = "other-secret"\n',
        environ={},
    )
    redact = Redactor(config_secrets(config))
    forms = [
        'pa"ss',
        'pa\\"ss',
        'PA"SS',
        base64.b64encode(b'pa"ss').decode(),
        base64.b64encode(b'\0u@x.org\0pa"ss').decode(),
        "other-secret",
        base64.b64encode(b"\0s@x.org\0other-secret").decode(),
        base64.b64encode(b"other-secret").decode().rstrip("="),
    ]
    for form in forms:
        assert redact(f"<{form}>") == "<***>", form
    assert redact("nothing secret here") == "nothing secret here"


def test_text_rendering_marks_and_fixes() -> None:
    report = DoctorReport(
        "x.toml",
        (
            StepResult("config", Status.PASS, "x.toml loaded"),
            StepResult("imap.tcp", Status.FAIL, "refused", ("detail line",), hint="fix it"),
            StepResult("imap.tls", Status.SKIP, "not checked: imap.tcp failed"),
            StepResult("policy", Status.WARN, "nobody", hint="list senders"),
        ),
    )
    lines = render_text(report).splitlines()
    assert lines[0].startswith("PASS config")
    assert lines[1].startswith("FAIL imap.tcp")
    assert lines[2].strip() == "detail line"
    assert lines[3].strip() == "fix: fix it"
    assert lines[4].startswith("SKIP imap.tls")
    assert lines[5].startswith("WARN policy")
    assert lines[6].strip() == "fix: list senders"
    assert lines[-1] == "BLOCKED: 1 step(s) failed: imap.tcp"


def test_run_doctor_json_document(tmp_path: Path) -> None:
    out = io.StringIO()
    code = run_doctor(write_config(tmp_path), as_json=True, out=out)
    document = json.loads(out.getvalue())
    assert code == EXIT_BLOCKED
    assert document["ok"] is False
    steps = {s["name"]: s for s in document["steps"]}
    assert steps["config"]["status"] == "pass"
    assert steps["imap.tcp"]["status"] == "fail"
    assert steps["imap.tcp"]["hint"]
    assert steps["imap.login"]["status"] == "skip"
    assert set(steps["policy"]) == {"name", "status", "summary", "detail", "hint"}


# -- OAuth 2 and provider presets (issue 13) ----------------------------------------------


async def test_a_presets_hints_appear_with_a_login_failure(
    tmp_path: Path, nursery: trio.Nursery, ca: trustme.CA, ca_file: Path
) -> None:
    context = server_context(ca.issue_cert(HOST))
    imap_port = await serve(nursery, fake_imap(context=context, login_ok=False))
    smtp_port = await serve(nursery, fake_smtp(context=context, auth_ok=False))
    path = write_config(
        tmp_path,
        provider="gmail",
        imap_host=HOST,
        smtp_host=HOST,
        imap_port=imap_port,
        smtp_port=smtp_port,
        tls_ca_file=str(ca_file),
    )
    report = await run_checks(path, timeouts=FAST)
    for name in ("imap.login", "smtp.auth"):
        step = report.step(name)
        assert step.status is Status.FAIL
        assert any(line.startswith("gmail: Gmail: a password login needs") for line in step.detail)
    # Passing steps carry no hints.
    assert report.step("imap.capabilities").detail == ()


async def test_oauth2_token_refusal_is_decoded_and_ends_in_the_logins(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from tests.oauthserver import auth_server

    secret = "rt-doctor-refresh-token-0001"
    with auth_server() as oauth:
        oauth.register_client("doctor-client")
        path = write_config(
            tmp_path,
            password=None,
            auth="oauth2",
            oauth2_token_url=oauth.token_url,
            oauth2_client_id="doctor-client",
            oauth2_refresh_token=secret,
        )
        report = await run_checks(path, timeouts=FAST)
    token = report.step("oauth2.token")
    assert token.status is Status.FAIL
    assert "invalid_grant" in token.summary
    assert "prxmail auth" in token.summary + token.hint
    assert report.step("oauth2.dns").status is Status.PASS
    assert secret not in all_text(report)
    # The mail servers are not reachable here; their steps still ran and failed on TCP.
    assert report.step("imap.tcp").status is Status.FAIL


async def test_stuck_outbox_is_a_warning_with_the_last_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_config(tmp_path, imap_port=993, state_dir=str(state))
    account = account_key(USER, HOST, 993)
    with StateStore(state) as store:
        drafts = [
            OutboxDraft(f"<r{n}@example.com>", USER, ("alice@example.com",), b"Subject: x\r\n\r\n")
            for n in (1, 2)
        ]
        fresh = store.enqueue(account, drafts[0])
        report = await run_checks(path, timeouts=FAST)
        assert report.step("state.db").status is Status.PASS  # queued a moment ago
        failed = store.enqueue(account, drafts[1])
        store.mark_permanent_failure(failed.id, "SMTPPermanentError: 554 relay denied")
        report = await run_checks(path, timeouts=FAST)
    db = report.step("state.db")
    assert db.status is Status.WARN
    assert "554 relay denied" in db.summary
    assert "prxmail outbox retry" in db.hint
    assert not any(f"outbox item {fresh.id} " in line for line in db.detail)


async def test_long_overdue_queued_reply_is_stuck(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_config(tmp_path, imap_port=993, state_dir=str(state))
    account = account_key(USER, HOST, 993)
    draft = OutboxDraft("<r1@example.com>", USER, ("alice@example.com",), b"Subject: x\r\n\r\n")
    # Composed and due two hours ago, never sent: nobody is sending.
    with StateStore(state, clock=lambda: time.time() - 7200) as store:
        store.enqueue(account, draft)
    report = await run_checks(path, timeouts=FAST)
    db = report.step("state.db")
    assert db.status is Status.WARN
    assert "1 stuck" in db.summary
    assert "never tried" in db.summary


async def test_world_readable_password_file_is_a_warning(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    path = write_config(tmp_path, password=None, password_file=str(secret))
    report = await run_checks(path, timeouts=FAST)
    assert report.step("config").status is Status.PASS
    secret.chmod(0o640)  # shared with the service's group on purpose: fine
    report = await run_checks(path, timeouts=FAST)
    assert report.step("config").status is Status.PASS
    secret.chmod(0o644)
    report = await run_checks(path, timeouts=FAST)
    step = report.step("config")
    assert step.status is Status.WARN
    assert "password_file" in step.hint
    assert "chmod 600" in step.hint
    assert PASSWORD not in all_text(report)
