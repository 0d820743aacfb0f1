"""The library API (open_mail_channel) against the real Dovecot + Postfix.

Each test makes fresh users, so it does not see other tests' mail, and is bounded in time.
"""

from __future__ import annotations

import functools
from pathlib import Path

import attrs
import pytest
import trio

from prxmail.channel import open_mail_channel
from prxmail.compose import compose_message
from prxmail.config import Secret
from prxmail.message import Address, Message
from prxmail.state import OutboxDraft, OutboxStatus, StateStore, account_key
from tests.integration.servicekit import (
    append,
    fresh_pair,
    imap_login,
    make_config,
    make_message,
    replies,
    send_mail,
    wait_replies,
)
from tests.mailservers import REJECTED_ADDRESS, MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def in_thread(fn: object, *args: object, **kwargs: object) -> object:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))  # type: ignore[arg-type]


async def next_message(channel: object) -> Message:
    with trio.fail_after(30):
        return await channel.receive()  # type: ignore[attr-defined, no-any-return]


async def test_threaded_reply_and_second_message_keeps_references(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "thread")
    config = make_config(mail_servers, pair, tmp_path / "state")
    first = make_message(pair.alice, pair.bot, "Question one", "What is 6 x 7?\n")
    async with open_mail_channel(config) as channel:
        await in_thread(send_mail, mail_servers, pair.alice, first, pair.bot)
        message = await next_message(channel)
        assert message.message_id == first["Message-ID"]
        assert message.from_.addr == pair.alice.address
        assert "6 x 7" in message.text
        reply_id = await channel.reply(message, "42, of course.")
        (reply,) = await in_thread(wait_replies, mail_servers, pair.alice, 1)  # type: ignore[misc]
        assert reply["Subject"] == "Re: Question one"
        assert reply["In-Reply-To"] == first["Message-ID"]
        assert reply["References"] == first["Message-ID"]
        assert reply["Message-ID"] == reply_id
        assert reply["Auto-Submitted"] == "auto-replied"
        assert "42, of course." in reply.get_content()

        # alice answers the reply: the thread continues with the full chain.
        second = make_message(
            pair.alice,
            pair.bot,
            "Re: Question one",
            "And 7 x 8?\n",
            headers={
                "In-Reply-To": reply_id,
                "References": f"{first['Message-ID']} {reply_id}",
            },
        )
        await in_thread(send_mail, mail_servers, pair.alice, second, pair.bot)
        message2 = await next_message(channel)
        assert message2.message_id == second["Message-ID"]
        await channel.reply(message2, "56.")
        got = await in_thread(wait_replies, mail_servers, pair.alice, 2)
        reply2 = got[-1]  # type: ignore[index]
        assert reply2["Subject"] == "Re: Question one"
        assert reply2["In-Reply-To"] == second["Message-ID"]
        assert reply2["References"].split() == [first["Message-ID"], reply_id, second["Message-ID"]]


async def test_policy_and_loop_guards_only_allowed_mail_reaches_the_handler(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "policy")
    config = make_config(mail_servers, pair, tmp_path / "state")
    refused = [
        (pair.bob, make_message(pair.bob, pair.bot, "from bob")),
        (
            pair.alice,
            make_message(
                pair.alice, pair.bot, "vacation", headers={"Auto-Submitted": "auto-replied"}
            ),
        ),
        (pair.alice, make_message(pair.alice, pair.bot, "bulk", headers={"Precedence": "bulk"})),
        (pair.alice, make_message(pair.alice, pair.bot, "list", headers={"List-Id": "<x.lists>"})),
        (pair.bot, make_message(pair.bot, pair.bot, "from myself")),
    ]
    good = make_message(pair.alice, pair.bot, "a real question")
    async with open_mail_channel(config) as channel:
        for sender, msg in refused:
            await in_thread(send_mail, mail_servers, sender, msg, pair.bot)
        await in_thread(mail_servers.wait_for_messages, pair.bot, len(refused))
        await in_thread(send_mail, mail_servers, pair.alice, good, pair.bot)
        # Mail is processed in UID order: the refused ones came first and were skipped.
        message = await next_message(channel)
        assert message.subject == "a real question"
        await channel.mark_handled(message)
        # Our reply coming back (a loop) is refused too.
        reply_id = await channel.send(pair.alice.address, "note", "fyi")
        loop = make_message(pair.alice, pair.bot, "Re: note", headers={"Message-ID": reply_id})
        await in_thread(send_mail, mail_servers, pair.alice, loop, pair.bot)
        await in_thread(mail_servers.wait_for_messages, pair.bot, len(refused) + 2)
        last = make_message(pair.alice, pair.bot, "after the loop")
        await in_thread(send_mail, mail_servers, pair.alice, last, pair.bot)
        message = await next_message(channel)
        assert message.subject == "after the loop"
        stats = channel.statistics()
        assert stats.rejected == len(refused) + 1
        assert stats.delivered == 2
        assert stats.in_flight == 1
        assert stats.replies_queued == 1
    # Nothing was answered except what we sent on purpose.
    assert [m["Subject"] for m in replies(mail_servers, pair.alice)] == ["note"]


async def test_restart_nothing_lost_nothing_answered_twice(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "restart")
    config = make_config(mail_servers, pair, tmp_path / "state")
    subjects = [f"msg {i}" for i in range(6)]
    handled: list[str] = []
    async with open_mail_channel(config) as channel:
        for subject in subjects[:2]:
            await in_thread(
                send_mail,
                mail_servers,
                pair.alice,
                make_message(pair.alice, pair.bot, subject),
                pair.bot,
            )
        for _ in range(2):
            message = await next_message(channel)
            await channel.reply(message, f"answer to {message.subject}")
            handled.append(message.subject)
        # Mail arriving while we are "down" (third received but not finished).
        for subject in subjects[2:4]:
            await in_thread(
                send_mail,
                mail_servers,
                pair.alice,
                make_message(pair.alice, pair.bot, subject),
                pair.bot,
            )
        # Received but not finished: handed on again after the restart. (Postfix may
        # deliver the two in either order, so which one this is does not matter.)
        unfinished = await next_message(channel)
        assert unfinished.subject in subjects[2:4]
    for subject in subjects[4:]:
        await in_thread(
            send_mail,
            mail_servers,
            pair.alice,
            make_message(pair.alice, pair.bot, subject),
            pair.bot,
        )
    async with open_mail_channel(config) as channel:
        while len(handled) < len(subjects):
            message = await next_message(channel)
            await channel.reply(message, f"answer to {message.subject}")
            handled.append(message.subject)
        got = await in_thread(wait_replies, mail_servers, pair.alice, len(subjects))
    assert sorted(handled) == subjects
    answered = sorted(m["Subject"] for m in got)  # type: ignore[attr-defined]
    assert answered == [f"Re: {s}" for s in subjects]


async def test_smtp_down_then_back_reply_delivered_once(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "smtpdown")
    config = make_config(mail_servers, pair, tmp_path / "state")
    question = make_message(pair.alice, pair.bot, "while smtp is down")
    async with open_mail_channel(config) as channel:
        mail_servers.stop_postfix()
        try:
            await in_thread(append, mail_servers, pair.bot, bytes(question))
            message = await next_message(channel)
            await channel.reply(message, "sent later")
            with trio.fail_after(20):
                await channel.status.wait_value(lambda s: s.smtp_error is not None)
        finally:
            await in_thread(mail_servers.start_postfix)
        with trio.fail_after(30):
            await channel.status.wait_value(lambda s: s.smtp_error is None)
        got = await in_thread(wait_replies, mail_servers, pair.alice, 1)
        await trio.sleep(3)  # a duplicate would arrive within the retry interval
    got = replies(mail_servers, pair.alice)
    assert [m["Subject"] for m in got] == ["Re: while smtp is down"]


async def test_uidvalidity_change_does_not_reanswer_or_lose_mail(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "uidv")
    folder = "Work"
    config = make_config(mail_servers, pair, tmp_path / "state", imap_folder=folder)
    old = make_message(pair.alice, pair.bot, "old one")
    imap = imap_login(mail_servers, pair.bot)
    try:
        assert imap.create(folder)[0] == "OK"
    finally:
        imap.logout()
    await in_thread(append, mail_servers, pair.bot, bytes(old), folder)
    async with open_mail_channel(config) as channel:
        message = await next_message(channel)
        assert message.subject == "old one"
        await channel.reply(message, "answered once")
        await in_thread(wait_replies, mail_servers, pair.alice, 1)
    # The folder is re-created (new UIDVALIDITY) holding the old mail and a new one.
    imap = imap_login(mail_servers, pair.bot)
    try:
        _, before = imap.select(folder)
        uidvalidity_before = imap.response("UIDVALIDITY")
        imap.close()
        assert imap.delete(folder)[0] == "OK"
        assert imap.create(folder)[0] == "OK"
        _, _ = imap.select(folder)
        uidvalidity_after = imap.response("UIDVALIDITY")
        imap.close()
    finally:
        imap.logout()
    assert uidvalidity_before != uidvalidity_after, (before, uidvalidity_before)
    new = make_message(pair.alice, pair.bot, "new one")
    await in_thread(append, mail_servers, pair.bot, bytes(old), folder)
    await in_thread(append, mail_servers, pair.bot, bytes(new), folder)
    async with open_mail_channel(config) as channel:
        message = await next_message(channel)
        assert message.subject == "new one"
        assert channel.statistics().duplicates == 1
        await channel.reply(message, "fresh")
        await in_thread(wait_replies, mail_servers, pair.alice, 2)
    subjects = sorted(m["Subject"] for m in replies(mail_servers, pair.alice))
    assert subjects == ["Re: new one", "Re: old one"]


async def test_exception_in_the_block_is_not_an_exception_group(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "exc")
    config = make_config(mail_servers, pair, tmp_path / "state")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with open_mail_channel(config):
            raise Boom


async def test_dovecot_restart_during_idle_reconnects_and_catches_up(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "imaprestart")
    config = make_config(mail_servers, pair, tmp_path / "state")
    async with open_mail_channel(config) as channel:
        await in_thread(
            send_mail,
            mail_servers,
            pair.alice,
            make_message(pair.alice, pair.bot, "before"),
            pair.bot,
        )
        message = await next_message(channel)
        await channel.mark_handled(message)
        with trio.fail_after(20):
            await channel.status.wait_value(lambda s: s.imap == "idle")
        await in_thread(mail_servers.restart_dovecot)
        # Sent while the watcher is reconnecting (or just after).
        await in_thread(
            send_mail,
            mail_servers,
            pair.alice,
            make_message(pair.alice, pair.bot, "after"),
            pair.bot,
        )
        message = await next_message(channel)
        assert message.subject == "after"
        assert channel.status.value.reconnects >= 1


async def test_refused_login_is_reported_not_hammered(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "badauth")
    text = make_config(mail_servers, pair, tmp_path / "state")
    config = attrs.evolve(text, password=Secret("definitely-wrong"))
    async with open_mail_channel(config) as channel:
        with trio.fail_after(20):
            await channel.status.wait_value(lambda s: s.imap == "auth-failed")
        await trio.sleep(2)
        status = channel.status.value
    assert status.reconnects == 1  # one attempt, then a long wait (AUTH_RETRY_SECONDS)
    assert "definitely-wrong" not in str(status.imap_error)


async def test_idle_push_latency(mail_servers: MailServers, tmp_path: Path) -> None:
    """New mail reaches the program within a fraction of a second of its delivery."""
    pair = fresh_pair(mail_servers, "latency")
    config = make_config(mail_servers, pair, tmp_path / "state")
    after_delivery: list[float] = []
    after_submission: list[float] = []
    async with open_mail_channel(config) as channel:
        for i in range(5):
            with trio.fail_after(20):
                await channel.status.wait_value(lambda s: s.imap == "idle")
            msg = make_message(pair.alice, pair.bot, f"latency {i}")
            await in_thread(send_mail, mail_servers, pair.alice, msg, pair.bot)
            sent = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def watch_maildir(stored: list[float], count: int) -> None:
                    # Poll the Maildir the way a test can: when did Dovecot store it?
                    while len(mail_servers.inbox_messages(pair.bot)) < count:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                    stored.append(trio.current_time())

                stored: list[float] = []
                nursery.start_soon(watch_maildir, stored, i + 1)
                message = await next_message(channel)
            got = trio.current_time()
            after_submission.append(got - sent)
            after_delivery.append(got - stored[0])
            assert message.subject == f"latency {i}"
            await channel.mark_handled(message)
    after_delivery.sort()
    after_submission.sort()
    print(
        f"IDLE push latency: delivery -> program median {after_delivery[2] * 1000:.0f} ms"
        f" (max {after_delivery[-1] * 1000:.0f} ms); submission -> program median"
        f" {after_submission[2] * 1000:.0f} ms"
    )
    # Dovecot itself waits 500 ms after a change before it notifies IDLE clients
    # (NOTIFY_DELAY_MSECS in its mailbox-watch.c); our share is the rest.
    assert after_delivery[2] < 1.0, after_delivery


async def test_permanent_smtp_failure_is_kept_for_inspection(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "permfail")
    config = make_config(mail_servers, pair, tmp_path / "state")
    async with open_mail_channel(config) as channel:
        message_id = await channel.send(REJECTED_ADDRESS, "to nowhere", "never delivered")
        with trio.fail_after(20):
            await channel.status.wait_value(lambda s: s.smtp_error is not None)
        assert "SMTPPermanentError" in str(channel.status.value.smtp_error)
        assert channel.statistics().replies_sent == 0
    with StateStore(tmp_path / "state", read_only=True) as store:
        (item,) = store.outbox_items()
    assert item.message_id == message_id
    assert item.status is OutboxStatus.FAILED_PERMANENT
    assert item.raw  # the message is kept, not dropped
    assert item.attempts == 1  # a 5xx is not retried


async def test_catch_up_of_a_full_mailbox_in_batches(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    """200 unseen messages waiting at first start: all delivered once, in UID order."""
    pair = fresh_pair(mail_servers, "catchup")
    count = 200
    config = make_config(
        mail_servers,
        pair,
        tmp_path / "state",
        fetch_batch_size=25,
        reply_rate_limit=1000,
        reply_rate_burst=1000,
    )

    def fill() -> None:
        imap = imap_login(mail_servers, pair.bot)
        try:
            for i in range(count):
                raw = bytes(make_message(pair.alice, pair.bot, f"queued {i:03d}"))
                assert imap.append("INBOX", None, None, raw)[0] == "OK"
        finally:
            imap.logout()

    await in_thread(fill)
    subjects = []
    started = trio.current_time()
    async with open_mail_channel(config) as channel:
        for _ in range(count):
            message = await next_message(channel)
            subjects.append(message.subject)
            await channel.mark_handled(message)
        elapsed = trio.current_time() - started
    assert subjects == [f"queued {i:03d}" for i in range(count)]
    print(
        f"catch-up: {count} messages fetched, parsed, recorded and handed over in"
        f" {elapsed:.2f} s ({count / elapsed:.0f} msg/s)"
    )


async def test_folder_recreated_while_the_channel_watches_it(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "uidvlive")
    folder = "Live"
    # Dovecot does not tell an IDLE session that its folder was re-created; the
    # keepalive's renewal (DONE, then searching again) is what finds out.
    config = make_config(
        mail_servers, pair, tmp_path / "state", imap_folder=folder, keepalive_secs=2
    )
    old = make_message(pair.alice, pair.bot, "answered before")

    def create() -> None:
        imap = imap_login(mail_servers, pair.bot)
        try:
            assert imap.create(folder)[0] == "OK"
        finally:
            imap.logout()

    def recreate() -> None:
        imap = imap_login(mail_servers, pair.bot)
        try:
            assert imap.delete(folder)[0] == "OK"
            assert imap.create(folder)[0] == "OK"
        finally:
            imap.logout()

    await in_thread(create)
    await in_thread(append, mail_servers, pair.bot, bytes(old), folder)
    async with open_mail_channel(config) as channel:
        message = await next_message(channel)
        await channel.reply(message, "first answer")
        with trio.fail_after(20):
            await channel.status.wait_value(lambda s: s.imap == "idle")
        await in_thread(recreate)
        await in_thread(append, mail_servers, pair.bot, bytes(old), folder)
        await in_thread(
            append,
            mail_servers,
            pair.bot,
            bytes(make_message(pair.alice, pair.bot, "fresh")),
            folder,
        )
        message = await next_message(channel)
        assert message.subject == "fresh"
        assert channel.statistics().duplicates == 1


async def test_queued_replies_go_out_pipelined_once_each(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    """Replies waiting in the outbox at start leave in one pipelined exchange; one
    refused recipient among them is kept as a permanent failure, the rest are sent once."""
    pair = fresh_pair(mail_servers, "batch")
    config = make_config(mail_servers, pair, tmp_path / "state")
    # The channel sends only its own account's outbox (accounts may share a store).
    account = account_key(config.username, config.imap_host, config.imap_port)
    recipients = [pair.alice.address] * 4 + [REJECTED_ADDRESS] + [pair.alice.address]
    with StateStore(tmp_path / "state") as store:
        for n, rcpt in enumerate(recipients):
            outgoing = compose_message(
                to=Address(rcpt),
                subject=f"queued {n}",
                body=f"number {n}",
                from_address=config.from_address,
            )
            store.enqueue(
                account,
                OutboxDraft(outgoing.message_id, config.from_address, (rcpt,), outgoing.raw),
            )
    async with open_mail_channel(config) as channel:
        with trio.fail_after(30):
            await channel.status.wait_value(lambda s: s.smtp_error is not None)
        await in_thread(wait_replies, mail_servers, pair.alice, 5)
        await trio.sleep(1)  # a duplicate would be delivered by now
        assert channel.statistics().replies_sent == 5
    got = sorted(str(m["Subject"]) for m in replies(mail_servers, pair.alice))
    assert got == [f"queued {n}" for n in (0, 1, 2, 3, 5)]
    with StateStore(tmp_path / "state", read_only=True) as store:
        statuses = {item.envelope_to: item.status for item in store.outbox_items()}
    assert statuses[(REJECTED_ADDRESS,)] is OutboxStatus.FAILED_PERMANENT
