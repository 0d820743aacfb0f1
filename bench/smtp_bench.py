"""SMTP send throughput: prxmail vs aiosmtplib vs smtplib on the same private Postfix.

``python -m bench smtp [--messages N] [--rounds R] [--security tls|starttls]``

Each library opens one connection, logs in, and sends N small messages one after the
other (timing starts after login and stops at the last reply).  ``prxmail`` calls
``send_message`` once per message like the peers; ``prxmail-data`` does the same with
CHUNKING off (DATA); ``prxmail-batch`` hands all N to ``send_messages``, which
pipelines across messages.  Rounds interleave the
libraries so that Postfix's background work (queue manager, LMTP to Dovecot) falls on
all of them alike; the median round is reported.  Every message is checked to have
reached its Maildir at the end, so a fast-but-wrong client cannot win.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import statistics
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from prxmail.smtp import MailTransaction, Security, open_smtp_connection
from tests.mailservers import MailServers, User, start_mail_servers


def _message(sender: User, rcpt: User, lib: str, i: int) -> bytes:
    return (
        f"From: {sender.address}\r\nTo: {rcpt.address}\r\nSubject: bench {lib} {i}\r\n"
        f"Message-ID: <bench-{lib}-{i}-{time.monotonic_ns()}@prxmail.test>\r\n\r\n"
        f"Small benchmark message number {i}.\r\n.A line that starts with a dot.\r\n"
    ).encode()


@attrs.frozen
class Target:
    servers: MailServers
    port: int
    security: Security
    sender: User


def _run_prxmail(target: Target, rcpt: User, n: int, *, chunking: bool) -> float:
    servers, sender = target.servers, target.sender

    async def main() -> float:
        async with open_smtp_connection(
            servers.host,
            target.port,
            security=target.security,
            ssl_context=servers.ssl_context(),
        ) as conn:
            conn.use_chunking = chunking
            await conn.login(sender.address, sender.password)
            messages = [_message(sender, rcpt, "prxmail", i) for i in range(n)]
            start = time.perf_counter()
            for data in messages:
                await conn.send_message(sender.address, [rcpt.address], data)
            return time.perf_counter() - start

    return trio.run(main)


def run_prxmail_batch(target: Target, rcpt: User, n: int) -> float:
    servers, sender = target.servers, target.sender

    async def main() -> float:
        async with open_smtp_connection(
            servers.host,
            target.port,
            security=target.security,
            ssl_context=servers.ssl_context(),
        ) as conn:
            await conn.login(sender.address, sender.password)
            messages = [
                MailTransaction(sender.address, [rcpt.address], _message(sender, rcpt, "batch", i))
                for i in range(n)
            ]
            start = time.perf_counter()
            outcomes = await conn.send_messages(messages)
            elapsed = time.perf_counter() - start
            assert all(o.accepted for o in outcomes)
            return elapsed

    return trio.run(main)


def run_prxmail(target: Target, rcpt: User, n: int) -> float:
    return _run_prxmail(target, rcpt, n, chunking=True)


def run_prxmail_data(target: Target, rcpt: User, n: int) -> float:
    return _run_prxmail(target, rcpt, n, chunking=False)


def run_aiosmtplib(
    target: Target, rcpt: User, n: int, *, raws: Sequence[bytes] | None = None
) -> float:
    """Send ``n`` messages (``raws`` when given, else small ones) over one connection.

    Returns:
        Seconds from after login to the last message's reply.
    """
    import aiosmtplib

    servers, port, security, sender = target.servers, target.port, target.security, target.sender

    async def main() -> float:
        smtp = aiosmtplib.SMTP(
            hostname=servers.host,
            port=port,
            use_tls=security is Security.TLS,
            start_tls=security is Security.STARTTLS,
            tls_context=servers.ssl_context(),
        )
        await smtp.connect()
        try:
            await smtp.login(sender.address, sender.password)
            messages = (
                list(raws)
                if raws is not None
                else [_message(sender, rcpt, "aiosmtplib", i) for i in range(n)]
            )
            start = time.perf_counter()
            for data in messages:
                await smtp.sendmail(sender.address, [rcpt.address], data)
            return time.perf_counter() - start
        finally:
            await smtp.quit()

    return asyncio.run(main())


def run_smtplib(
    target: Target, rcpt: User, n: int, *, raws: Sequence[bytes] | None = None
) -> float:
    """Send ``n`` messages (``raws`` when given, else small ones) over one connection.

    Returns:
        Seconds from after login to the last message's reply.
    """
    servers, port, security, sender = target.servers, target.port, target.security, target.sender
    context = servers.ssl_context()
    client: smtplib.SMTP
    if security is Security.TLS:
        client = smtplib.SMTP_SSL(servers.host, port, context=context)
    else:
        client = smtplib.SMTP(servers.host, port)
        client.starttls(context=context)
    with client:
        client.login(sender.address, sender.password)
        messages = (
            list(raws)
            if raws is not None
            else [_message(sender, rcpt, "smtplib", i) for i in range(n)]
        )
        start = time.perf_counter()
        for data in messages:
            client.sendmail(sender.address, [rcpt.address], data)
        return time.perf_counter() - start


Runner = Callable[[Target, User, int], float]
LIBRARIES: dict[str, Runner] = {
    "prxmail": run_prxmail,  # PIPELINING + CHUNKING: one write per message
    "prxmail-data": run_prxmail_data,  # PIPELINING + DATA: two round trips
    "prxmail-batch": run_prxmail_batch,  # send_messages: pipelined across messages
    "aiosmtplib": run_aiosmtplib,
    "smtplib": run_smtplib,
}


def main(argv: list[str]) -> int:
    """Run the benchmark; print msg/s per library and the ratios.

    Args:
        argv: Command-line arguments after ``smtp``.

    Returns:
        0 on success, 1 when a library's messages did not all arrive.
    """
    parser = argparse.ArgumentParser(prog="python -m bench smtp", description=__doc__)
    parser.add_argument("--messages", type=int, default=500, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median is reported)")
    parser.add_argument(
        "--security", choices=["tls", "starttls"], default="tls", help="submission port"
    )
    parser.add_argument(
        "--only", action="append", choices=list(LIBRARIES), help="run only these libraries"
    )
    args = parser.parse_args(argv)
    security = Security(args.security)
    names = args.only or list(LIBRARIES)

    servers = start_mail_servers()
    try:
        port = servers.smtp_tls_port if security is Security.TLS else servers.smtp_starttls_port
        target = Target(servers, port, security, servers.add_user("bench-sender"))
        rcpts = {name: servers.add_user(f"bench-{name}") for name in names}
        print(
            f"SMTP bench: {args.messages} messages x {args.rounds} rounds over one "
            f"{security.value} connection each, Postfix on {servers.host}:{port}"
        )
        times: dict[str, list[float]] = {name: [] for name in names}
        status = 0
        for round_no in range(1, args.rounds + 1):
            for name in names:
                elapsed = LIBRARIES[name](target, rcpts[name], args.messages)
                times[name].append(elapsed)
                print(
                    f"  round {round_no} {name:<13} {args.messages / elapsed:8.1f} msg/s "
                    f"({elapsed:.2f} s)"
                )
                # Let Postfix deliver this run's messages before the next run starts,
                # so no library pays for another's queue; this also checks that every
                # message arrived.
                try:
                    servers.wait_for_messages(rcpts[name], args.messages * round_no, timeout=120)
                except TimeoutError as exc:
                    print(f"  {name}: not all messages arrived: {exc}")
                    status = 1
        rates = {name: args.messages / statistics.median(times[name]) for name in names}
        print("median msg/s:")
        for name in names:
            print(f"  {name:<13} {rates[name]:8.1f}")
        ours = [name for name in names if name.startswith("prxmail")]
        peers = [name for name in names if not name.startswith("prxmail")]
        for mine in ours:
            for peer in peers:
                print(f"  {mine} / {peer}: {rates[mine] / rates[peer]:.2f}x")
        return status
    finally:
        servers.stop()
