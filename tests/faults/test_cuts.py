"""Connections cut at random moments while mail keeps arriving (library API, in-process).

prxmail talks to Dovecot and Postfix through two :class:`FaultProxy` instances. While
messages are appended to the bot's INBOX, the proxies cut connections: at once (usually
mid-IDLE), after a random number of server->client IMAP bytes (inside a FETCH literal:
the bodies are 1-150 KB), after a random number of client->server SMTP bytes (inside
DATA: every reply is ~60 KB) and early in an SMTP session (handshake, commands).
Afterwards every message must have been handed over exactly once and answered; the
only duplicate allowed is the same reply (same Message-ID) sent again after a cut
between the end of DATA and the server's answer.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path
from typing import Any

import pytest
import trio

from prxmail.channel import MailChannel, open_mail_channel
from prxmail.config import parse_config
from tests.faults._kit import (
    incoming,
    proxied_config_text,
    seeded,
    tally_replies,
    wait_reply_count,
)
from tests.faults.proxy import FaultProxy
from tests.integration.servicekit import append, fresh_pair
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MESSAGES = 24
CUTS = 8
# Large enough that DATA spans several TLS records, so a cut after N up-bytes lands in it.
REPLY_BODY = "This reply is long on purpose, to make DATA span many records.\n" * 1000


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def test_random_cuts_while_mail_arrives(mail_servers: MailServers, tmp_path: Path) -> None:
    rng, _seed = seeded("cuts")
    pair = fresh_pair(mail_servers, "cuts")
    host = mail_servers.host
    with (
        FaultProxy(host, mail_servers.imap_tls_port) as imap_proxy,
        FaultProxy(host, mail_servers.smtp_tls_port) as smtp_proxy,
    ):
        config = parse_config(
            proxied_config_text(
                mail_servers,
                pair,
                tmp_path / "state",
                imap_proxy.port,
                smtp_proxy.port,
                command_timeout_secs=5,
                keepalive_secs=5,
                reply_rate_limit=1000,
                reply_rate_burst=1000,
            )
        )
        sent: list[str] = []
        received: list[str] = []
        # The cut after message i, for CUTS distinct i, never among the last few so
        # there is traffic left for an armed cut to fire on.
        at = dict(zip(rng.sample(range(2, MESSAGES - 4), CUTS), range(CUTS), strict=True))
        kinds = ["imap-now", "imap-now", "imap-literal", "imap-literal"]
        kinds += ["smtp-data", "smtp-data", "smtp-data", "smtp-early"]
        rng.shuffle(kinds)
        done_cuts: list[str] = []

        def cut(kind: str) -> None:
            rst = rng.random() < 0.5
            if kind == "imap-now":
                imap_proxy.cut(rst=rst)
            elif kind == "imap-literal":
                imap_proxy.cut_after(rng.randrange(2_000, 120_000), "down", rst=rst)
            elif kind == "smtp-data":
                smtp_proxy.cut_after(rng.randrange(1_000, 50_000), "up", rst=rst)
            else:  # greeting, TLS handshake or the commands before DATA
                smtp_proxy.cut_after(rng.randrange(0, 4_000), "any", rst=rst)
            done_cuts.append(f"{kind}/{'rst' if rst else 'fin'}")

        async def consume(channel: MailChannel) -> None:
            async for message in channel:
                received.append(message.message_id or "")
                await channel.reply(message, f"{message.subject}\n{REPLY_BODY}")

        async with open_mail_channel(config, rng=rng) as channel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, channel)
                for i in range(MESSAGES):
                    message_id, raw = incoming(pair, rng, i, "cuts")
                    await in_thread(append, mail_servers, pair.bot, raw)
                    sent.append(message_id)
                    if i in at:
                        cut(kinds[at[i]])
                    await trio.sleep(rng.uniform(0.05, 0.5))
                with trio.fail_after(75):
                    # Polling: the counters have no event to wait on.
                    while len(received) < MESSAGES or channel.statistics().replies_sent < MESSAGES:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                # No armed cut may fire after this point and count as a loss.
                imap_proxy.disarm()
                smtp_proxy.disarm()
                tally = await in_thread(wait_reply_count, mail_servers, pair, MESSAGES, 30.0)
                await trio.sleep(1.5)  # room for a late wrong duplicate
                nursery.cancel_scope.cancel()
            stats = channel.statistics()
            status = channel.status.value
        tally = tally_replies(mail_servers, pair)
        imap_cuts = imap_proxy.statistics().cuts
        smtp_cuts = smtp_proxy.statistics().cuts

    handed = collections.Counter(received)
    print(
        f"cuts: messages={MESSAGES} handed={len(received)} cuts_fired={imap_cuts + smtp_cuts} "
        f"(imap={imap_cuts} smtp={smtp_cuts}) planned={done_cuts} "
        f"imap_reconnects={status.reconnects} replies={tally.copies} "
        f"lost={len(tally.lost(sent))} answered_twice={len(tally.answered_twice())} "
        f"resent_same_id={tally.resent()} handed_twice={sum(1 for n in handed.values() if n > 1)}"
    )
    assert sorted(handed) == sorted(sent)
    assert all(n == 1 for n in handed.values()), handed
    assert tally.lost(sent) == []
    assert tally.answered_twice() == {}
    assert set(tally.answered) == set(sent)
    assert stats.replies_sent >= MESSAGES
    # The test only means something if the faults happened.
    assert imap_cuts + smtp_cuts >= 3, done_cuts
