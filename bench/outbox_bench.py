"""SMTP through the outbox: 500 replies queued on an open channel vs direct SMTP sends.

``python -m bench outbox [--messages 500] [--rounds 3] [--state-root DIR] [--breakdown]
[--json FILE]``

What is measured (issue 7, benchmark 4)
---------------------------------------
Every contender gets a fresh sending account and a fresh recipient, and sends the same
number of text/plain messages over implicit TLS to the private Postfix, which delivers
them over LMTP into the recipient's Maildir. The clock starts at the first queue or
send call and stops when all messages are in the recipient's Maildir (polled; bounded).
The time until the last message was accepted by Postfix is shown too.

* prxmail reply: the sending account's INBOX holds as many messages from the
  recipient (put into its Maildir directly). ``open_mail_channel`` (all defaults except
  ``allowed_senders = ["*"]``, ``reply_rate_limit`` and ``reply_rate_burst`` 1000) hands
  them all over first, not timed; then ``channel.reply(message, body)`` for each, one
  after the other. Each call composes the threaded reply and records it in the outbox, marking the
  parent replied, in one SQLite transaction with ``synchronous=FULL`` (an fsync) before
  it returns; the channel's sender task meanwhile sends what is due, up to 20 pipelined
  in one exchange.
* prxmail send: ``channel.send(to, subject, body)`` for each (same durable outbox, no
  parent), on a channel whose INBOX is empty.
* aiosmtplib, smtplib: one connection, log in (not timed), ``sendmail`` of each message
  in turn (the helpers of ``bench/smtp_bench.py``), the messages composed beforehand by
  ``prxmail.compose.compose_message`` with the same body, so the bytes on the wire are
  the same but for prxmail's reply headers (In-Reply-To, References). No durable record.

``--state-root DIR`` puts prxmail's state directories there instead of next to the
servers (on /dev/shm, say: tmpfs, where fsync costs nothing, which shows the share of the
durable recording in prxmail's time).

``--breakdown`` adds one more prxmail reply run (not part of the table) that times the
channel's state-store calls (wall time seen by the trio task, and time inside the store's
thread; short calls the store runs on the trio thread are listed as such) and the reply
composition, wrapped from the bench.

Rounds interleave the contenders (Postfix's queue manager and LMTP deliveries share the
CPUs with everyone); the median round is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import trio

from bench._kit import Stats, add_sample, timed_state_store
from bench.channel_bench import _channel_toml, _machine
from bench.smtp_bench import Target, run_aiosmtplib, run_smtplib
from prxmail.message import Message
from prxmail.smtp import Security
from tests.mailservers import MailServers, User, mail_servers

# Everything must be in the Maildir within this long after the first queue call.
DELIVERY_TIMEOUT = 300.0
# Handing the inbound messages over (reply mode, not timed) must finish within this.
RECEIVE_TIMEOUT = 300.0
# How often the Maildir and the channel's counters are looked at while waiting.
POLL_SECONDS = 0.005
BODY = (
    "Thank you for your message. This is the answer to it, a few lines long as\n"
    "a real reply would be.\n\nRegards,\nthe bot\n"
)


def _maildir_count(servers: MailServers, user: User) -> int:
    root = servers.maildir(user)
    count = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(root / sub) as entries:
                count += sum(1 for e in entries if e.is_file())
        except FileNotFoundError:
            pass
    return count


def _maildir_bytes(servers: MailServers, user: User) -> int:
    root = servers.maildir(user)
    return sum(p.stat().st_size for sub in ("new", "cur") for p in (root / sub).iterdir())


def _wait_maildir(servers: MailServers, user: User, n: int, deadline: float) -> float:
    """Poll until ``user`` has ``n`` messages; returns the time seen (perf_counter)."""
    while _maildir_count(servers, user) < n:
        if time.perf_counter() > deadline:
            raise SystemExit(f"{user.address}: {_maildir_count(servers, user)} of {n} arrived")
        time.sleep(POLL_SECONDS)
    return time.perf_counter()


def _inbound(rcpt: User, sender: User, i: int) -> bytes:
    return (
        f"From: Peer <{rcpt.address}>\r\nTo: {sender.address}\r\nSubject: question {i}\r\n"
        f"Message-ID: <q-{i}-{time.monotonic_ns()}@bench.prxmail.test>\r\n"
        f"Date: {email.utils.formatdate()}\r\n\r\nCould you answer question {i}?\r\n"
    ).encode()


def _run_prxmail(
    servers: MailServers,
    sender: User,
    rcpt: User,
    n: int,
    state_root: pathlib.Path,
    *,
    mode: str,
) -> dict[str, Any]:
    from prxmail.channel import open_mail_channel
    from prxmail.config import parse_config

    if mode == "reply":
        servers.deliver_to_maildir(sender, [_inbound(rcpt, sender, i) for i in range(n)])
    config = parse_config(_channel_toml(servers, sender, state_root / f"state-{sender.localpart}"))
    out: dict[str, Any] = {}

    async def main() -> None:
        async with open_mail_channel(config) as channel:
            messages: list[Message] = []
            with trio.fail_after(RECEIVE_TIMEOUT):
                while len(messages) < (n if mode == "reply" else 0):
                    messages.append(await channel.receive())
                await channel.status.wait_value(lambda s: s.imap == "idle")
            deadline = time.perf_counter() + DELIVERY_TIMEOUT
            t0 = time.perf_counter()
            if mode == "reply":
                for message in messages:
                    await channel.reply(message, BODY)
            else:
                for i in range(n):
                    await channel.send(rcpt.address, f"outbox bench {i}", BODY)
            out["queued_s"] = time.perf_counter() - t0
            accepted_at = None
            while True:
                now = time.perf_counter()
                if accepted_at is None and channel.statistics().replies_sent >= n:
                    accepted_at = now
                if accepted_at is not None and _maildir_count(servers, rcpt) >= n:
                    break
                if now > deadline:
                    stats = channel.statistics()
                    raise SystemExit(
                        f"prxmail {mode}: {stats.replies_sent} of {n} sent,"
                        f" {_maildir_count(servers, rcpt)} delivered, status {channel.status.value}"
                    )
                await trio.sleep(POLL_SECONDS)
            assert accepted_at is not None
            out["accepted_s"] = accepted_at - t0
            out["delivered_s"] = now - t0

    trio.run(main)
    return out


def _compose(sender: User, rcpt: User, n: int, tag: str) -> list[bytes]:
    from prxmail.compose import compose_message
    from prxmail.message import Address

    return [
        compose_message(
            from_address=sender.address,
            to=Address(rcpt.address),
            subject=f"outbox bench {tag} {i}",
            body=BODY,
        ).raw
        for i in range(n)
    ]


def _run_peer(
    servers: MailServers,
    sender: User,
    rcpt: User,
    n: int,
    state_root: pathlib.Path,
    *,
    runner: Callable[..., float],
    tag: str,
) -> dict[str, Any]:
    del state_root  # the peers record nothing
    raws = _compose(sender, rcpt, n, tag)
    target = Target(servers, servers.smtp_tls_port, Security.TLS, sender)
    elapsed = runner(target, rcpt, n, raws=raws)
    # The runner times from after login to the last reply; it then QUITs (one more
    # round trip) before returning, so the start is taken as "return - elapsed".
    returned = time.perf_counter()
    t0 = returned - elapsed
    delivered = _wait_maildir(servers, rcpt, n, returned + DELIVERY_TIMEOUT)
    return {"queued_s": elapsed, "accepted_s": elapsed, "delivered_s": delivered - t0}


Contender = Callable[[MailServers, User, User, int, pathlib.Path], dict[str, Any]]
CONTENDERS: dict[str, Contender] = {
    "prxmail reply": partial(_run_prxmail, mode="reply"),
    "prxmail send": partial(_run_prxmail, mode="send"),
    "aiosmtplib": partial(_run_peer, runner=run_aiosmtplib, tag="aiosmtplib"),
    "smtplib": partial(_run_peer, runner=run_smtplib, tag="smtplib"),
}


@contextlib.contextmanager
def _instrumented() -> Iterator[dict[str, list[float]]]:
    """Time prxmail's state-store calls and ``compose_reply`` while the block runs.

    Yields:
        name -> [calls, wall seconds seen by the caller, seconds inside the call].
    """
    import prxmail.channel._api

    stats: Stats = {}
    original_compose = getattr(prxmail.channel._api, "compose_reply")  # noqa: B009 - private name

    def timed_compose(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original_compose(*a, **k)
        finally:
            wall = time.perf_counter() - t0
            add_sample(stats, "compose_reply", wall, wall)

    setattr(prxmail.channel._api, "compose_reply", timed_compose)  # noqa: B010
    try:
        with timed_state_store(stats):
            yield stats
    finally:
        setattr(prxmail.channel._api, "compose_reply", original_compose)  # noqa: B010


def _breakdown(servers: MailServers, n: int, state_root: pathlib.Path) -> dict[str, Any]:
    tag = f"bd-{os.getpid()}"
    sender, rcpt = servers.add_user(f"ob-{tag}"), servers.add_user(f"ob-rcpt-{tag}")
    with _instrumented() as stats:
        res = _run_prxmail(servers, sender, rcpt, n, state_root, mode="reply")
    print(
        f"  prxmail reply breakdown (separate instrumented run: queued {res['queued_s']:.2f} s,"
        f" in Maildir {res['delivered_s']:.2f} s; includes the untimed hand-over of {n}):"
    )
    print(f"    {'':<38} {'calls':>6} {'wall s':>7} {'in call s':>9} {'ms/call':>7}")
    for name, (calls, wall, inside) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"    {name:<38} {calls:6.0f} {wall:7.2f} {inside:9.2f} {wall / calls * 1000:7.2f}")
    return {"run": res, "stats": stats}


def bench_outbox(
    servers: MailServers,
    n: int,
    rounds: int,
    state_root: pathlib.Path | None = None,
    *,
    breakdown: bool = False,
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    tag = os.getpid()
    print(f"\n4. SMTP: {n} messages, first queue/send call -> all in the recipient's Maildir")
    for r in range(1, rounds + 1):
        for name, run in CONTENDERS.items():
            slug = name.replace(" ", "-")
            sender = servers.add_user(f"ob-{slug}-{r}-{tag}")
            rcpt = servers.add_user(f"ob-rcpt-{slug}-{r}-{tag}")
            res = run(servers, sender, rcpt, n, state_root or servers.workdir)
            res["bytes_per_msg"] = _maildir_bytes(servers, rcpt) / n
            runs[name].append(res)
            print(
                f"  round {r} {name:<14} queued {res['queued_s']:6.2f} s, accepted"
                f" {res['accepted_s']:6.2f} s, in Maildir {res['delivered_s']:6.2f} s"
                f" = {n / res['delivered_s']:6.1f} msg/s"
            )
    table: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        row = {
            key: statistics.median(x[key] for x in results)
            for key in ("queued_s", "accepted_s", "delivered_s", "bytes_per_msg")
        }
        row["msg_s"] = n / row["delivered_s"]
        row["accepted_msg_s"] = n / row["accepted_s"]
        table[name] = row
    print(f"  median of {rounds} rounds:")
    print(
        f"  {'':<14} {'queue s':>8} {'accepted s':>10} {'Maildir s':>9} {'msg/s':>7}"
        f" {'bytes/msg':>9}"
    )
    for name, row in table.items():
        print(
            f"  {name:<14} {row['queued_s']:8.2f} {row['accepted_s']:10.2f}"
            f" {row['delivered_s']:9.2f} {row['msg_s']:7.1f} {row['bytes_per_msg']:9.0f}"
        )
    ratios = {}
    for mine in ("prxmail reply", "prxmail send"):
        for peer in ("aiosmtplib", "smtplib"):
            ratios[f"{mine} / {peer}"] = table[mine]["msg_s"] / table[peer]["msg_s"]
            print(f"  {mine} / {peer}: {ratios[f'{mine} / {peer}']:.2f}x (to the Maildir)")
    print(
        "  (prxmail's queue time is the durable recording: one fsync'd SQLite commit per"
        " reply; the peers keep nothing.)"
    )
    result = {"n": n, "rounds": rounds, "runs": runs, "table": table, "ratios": ratios}
    if breakdown:
        result["breakdown"] = _breakdown(servers, n, state_root or servers.workdir)
    return result


def main(argv: list[str]) -> int:
    """Run the outbox bench against freshly started private servers.

    Args:
        argv: Command-line arguments after ``outbox``.

    Returns:
        0 (a contender whose messages do not all arrive stops the run with an error).
    """
    parser = argparse.ArgumentParser(prog="python -m bench outbox", description=__doc__)
    parser.add_argument("--messages", type=int, default=500, help="messages per run (500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument(
        "--state-root", type=pathlib.Path, default=None, help="parent of prxmail's state dirs"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="one more instrumented prxmail reply run"
    )
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    if args.state_root is not None:
        args.state_root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine_start": _machine(), "argv": argv}
    print(f"machine: {report['machine_start']}")
    with mail_servers() as servers:
        report["outbox"] = bench_outbox(
            servers, args.messages, args.rounds, args.state_root, breakdown=args.breakdown
        )
    report["machine_end"] = _machine()
    print(f"machine at end: {report['machine_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0
