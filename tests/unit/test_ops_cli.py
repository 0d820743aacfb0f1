"""``prxmail status`` / ``outbox`` / ``messages`` and the store methods behind them (issue 14)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prxmail.channel._core import HEARTBEAT_SECONDS
from prxmail.cli import main
from prxmail.config import load_config
from prxmail.errors import LocalProtocolError
from prxmail.state import (
    HEARTBEAT_STALE_FACTOR,
    OPERATOR_MOVES,
    TRANSITIONS,
    Direction,
    MessageKey,
    MessageStatus,
    OutboxDraft,
    OutboxStatus,
    StateStore,
    ThreadEntry,
    account_key,
    state_dir_in_use,
)

CONFIG = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "s3cret-pw"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
state_dir = "state"
"""

ACCOUNT = account_key("bot@example.com", "imap.example.com", 993)
REPLY = (
    b"From: bot@example.com\r\nTo: alice@example.com\r\nSubject: Re: hello there\r\n"
    b"Message-ID: <r1@example.com>\r\n\r\nbody\r\n"
)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "prxmail.toml"
    path.write_text(CONFIG)
    assert account_key(*_login(path)) == ACCOUNT
    return path


def _login(path: Path) -> tuple[str, str, int]:
    config = load_config(path)
    return config.username, config.imap_host, config.imap_port


@pytest.fixture
def state_dir(config_path: Path) -> Path:
    return config_path.parent / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[StateStore]:
    """A populated store, closed (lock free) before the command runs unless a test
    keeps one open itself."""
    with StateStore(state_dir, prune_on_open=False) as s:
        s.sync_mailbox(ACCOUNT, "INBOX", 7)
        yield s


def _key(uid: int) -> MessageKey:
    return MessageKey(ACCOUNT, "INBOX", 7, uid)


def _failed(store: StateStore, uid: int) -> MessageKey:
    key = _key(uid)
    store.claim(key, f"<m{uid}@example.org>")
    store.begin_handling(key)
    store.mark_failed(key, "handler exited with status 3")
    return key


def _held(store: StateStore, uid: int, thread: str) -> MessageKey:
    key = _key(uid)
    mid = f"<h{uid}@example.org>"
    store.claim(key, mid)
    entry = ThreadEntry(mid, thread, Direction.IN, None, "loop@example.org", "ping")
    store.record_admission(ACCOUNT, held=[(key, "loop suspected")], entries=[entry])
    return key


def _queued(store: StateStore, n: int) -> int:
    raw = REPLY.replace(b"<r1@", f"<r{n}@".encode())
    draft = OutboxDraft(f"<r{n}@example.com>", "bot@example.com", ["alice@example.com"], raw)
    return store.enqueue(ACCOUNT, draft).id


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    status, out, _ = _run([*argv, "--json"], capsys)
    return status, json.loads(out)


# -- the state tables ------------------------------------------------------------------


def test_failed_may_go_back_to_claimed_only_as_an_operator_move() -> None:
    assert MessageStatus.CLAIMED in TRANSITIONS[MessageStatus.FAILED]
    assert OPERATOR_MOVES[MessageStatus.FAILED] == {MessageStatus.CLAIMED}
    # The service still never looks at a failed message on its own (pruning, fetch).
    assert MessageStatus.FAILED.terminal


# -- status ----------------------------------------------------------------------------


def test_status_without_a_state_database_fails(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _out, err = _run(["status", "-c", str(config_path)], capsys)
    assert status == 1
    assert "prxmail serve has not run there yet" in err


def test_status_when_serve_is_not_running(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _failed(store, 1)
    _queued(store, 1)
    store.write_heartbeat(
        ACCOUNT, pid=4242, started_at=1.0, imap="idle", imap_error=None, smtp_error=None,
        reconnects=0,
    )  # fmt: skip
    store.close()
    status, out, _ = _run(["status", "-c", str(config_path)], capsys)
    assert status == 0
    assert "not running" in out
    assert "failed 1" in out
    assert "queued 1" in out
    status, doc = _json(["status", "-c", str(config_path)], capsys)
    (account,) = doc["accounts"]  # type: ignore[misc]
    assert account["service"] == "not-running"
    assert account["imap"] == "stopped"
    assert account["messages"] == {"pending": 0, "deferred": 0, "held": 0, "failed": 1}
    assert account["outbox"] == {"queued": 1, "failed": 0}


def test_status_of_a_running_service_shows_auth_failed_and_errors(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # The open store holds the directory lock, as serve does.
    store.write_heartbeat(
        ACCOUNT, pid=4242, started_at=time.time(), imap="idle", imap_error=None,
        smtp_error="SMTPTransientError: 451 try later", reconnects=0,
    )  # fmt: skip
    store.write_heartbeat(
        ACCOUNT, pid=4242, started_at=time.time(), imap="auth-failed",
        imap_error="AuthenticationError: [AUTHENTICATIONFAILED] nope",
        smtp_error=None, reconnects=1,
    )  # fmt: skip
    assert state_dir_in_use(store.state_dir)
    status, doc = _json(["status", "-c", str(config_path), "--account", "default"], capsys)
    assert status == 0
    (account,) = doc["accounts"]  # type: ignore[misc]
    assert account["service"] == "running"
    assert account["pid"] == 4242
    assert account["imap"] == "auth-failed"
    assert "AUTHENTICATIONFAILED" in account["imap_error"]
    # The last SMTP error is kept after it passed, with its time.
    assert account["smtp_error"] == "SMTPTransientError: 451 try later"
    assert account["smtp_error_at"] is not None
    # Connected once (idle), then the login was refused.
    assert account["last_connected_at"] is not None
    status, out, _ = _run(["status", "-c", str(config_path), "--account", ACCOUNT], capsys)
    assert status == 0
    assert "auth-failed" in out
    assert "running (pid 4242" in out
    assert "s3cret-pw" not in out


def test_status_with_a_stale_heartbeat_says_not_responding(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.write_heartbeat(
        ACCOUNT, pid=4242, started_at=1.0, imap="idle", imap_error=None, smtp_error=None,
        reconnects=0,
    )  # fmt: skip
    old = time.time() - HEARTBEAT_STALE_FACTOR * HEARTBEAT_SECONDS - 5
    assert store._conn is not None
    store._conn.execute("UPDATE heartbeat SET updated_at = ?", (old,))
    status, doc = _json(["status", "-c", str(config_path)], capsys)
    assert status == 0
    assert doc["accounts"][0]["service"] == "not-responding"  # type: ignore[index]


def test_status_config_problems_exit_2(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.close()
    status, _out, err = _run(["status", "-c", str(config_path), "--account", "sales"], capsys)
    assert status == 2
    assert "no account 'sales'" in err
    config_path.write_text(CONFIG.replace("imap_host", "imap_hots"))
    status, doc = _json(["status", "-c", str(config_path)], capsys)
    assert status == 2
    assert doc["ok"] is False


# -- outbox ----------------------------------------------------------------------------


def test_outbox_list_shows_queued_and_failed_replies(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _queued(store, 1)
    store.mark_transient_failure(first, "ConnectionRefusedError: [Errno 111] refused")
    second = _queued(store, 2)
    store.mark_permanent_failure(second, "SMTPPermanentError: 550 no such user")
    sent = _queued(store, 3)
    store.mark_sent(sent)
    status, out, _ = _run(["outbox", "list", "-c", str(config_path)], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "TO"]
    assert len(lines) == 3  # the sent one is not listed
    assert lines[1].startswith(f"{first}  ")
    assert "Re: hello there" in lines[1]
    assert "Errno 111" in lines[1]
    assert "failed_permanent" in lines[2]
    assert "550 no such user" in lines[2]
    status, doc = _json(["outbox", "list", "-c", str(config_path)], capsys)
    items = doc["items"]
    assert [(i["id"], i["status"], i["attempts"]) for i in items] == [  # type: ignore[union-attr,index]
        (first, "queued", 1),
        (second, "failed_permanent", 1),
    ]
    assert items[0]["to"] == ["alice@example.com"]  # type: ignore[index]
    assert items[0]["next_attempt_at"] is not None  # type: ignore[index]


def test_outbox_retry_makes_items_due_now_and_signals_the_service(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _queued(store, 1)
    store.mark_transient_failure(first, "refused")
    second = _queued(store, 2)
    store.mark_permanent_failure(second, "550")
    assert store.due_outbox() == []
    before = store.operator_generation(ACCOUNT)
    # The store stays open (the lock held, as by serve): the command writes shared.
    status, out, _ = _run(["outbox", "retry", str(first), "-c", str(config_path)], capsys)
    assert status == 0, out
    assert "1 outbox item(s) due now" in out
    assert [i.id for i in store.due_outbox()] == [first]
    assert store.operator_generation(ACCOUNT) == before + 1
    status, doc = _json(["outbox", "retry", "--all", "-c", str(config_path)], capsys)
    assert status == 0
    assert doc["retried"] == [first, second]
    item = store.get_outbox_item(second)
    assert item is not None
    assert (item.status, item.attempts) == (OutboxStatus.QUEUED, 0)
    assert store.operator_generation(ACCOUNT) == before + 2


def test_outbox_retry_and_drop_errors(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = _queued(store, 1)
    store.mark_sent(sent)
    c = ["-c", str(config_path)]
    assert _run(["outbox", "retry", "99", *c], capsys)[0] == 1
    assert _run(["outbox", "retry", str(sent), *c], capsys)[0] == 1  # sent is final
    assert _run(["outbox", "drop", str(sent), *c], capsys)[0] == 1
    assert _run(["outbox", "retry", *c], capsys)[0] == 2  # neither ID nor --all
    assert _run(["outbox", "retry", "1", "--all", *c], capsys)[0] == 2
    assert _run(["outbox", "drop", *c], capsys)[0] == 2
    status, out, _ = _run(["outbox", "retry", "--all", *c], capsys)
    assert (status, out.strip()) == (0, "0 outbox item(s) due now")


def test_outbox_drop_removes_the_item_and_keeps_the_reason(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    item = _queued(store, 1)
    c = ["-c", str(config_path)]
    status, out, _ = _run(["outbox", "drop", str(item), "--reason", "wrong answer", *c], capsys)
    assert status == 0
    assert "dropped (wrong answer)" in out
    assert store.get_outbox_item(item) is None
    assert store.is_our_message_id("<r1@example.com>")  # a reply to it is still ours
    (logged,) = store.operator_log(ACCOUNT)
    assert (logged["action"], logged["target"], logged["reason"]) == (
        "outbox-drop",
        str(item),
        "wrong answer",
    )
    assert _run(["outbox", "drop", str(item), *c], capsys)[0] == 1


# -- messages --------------------------------------------------------------------------


def test_messages_list_by_status(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _failed(store, 1)
    _held(store, 2, "thread-a")
    c = ["-c", str(config_path)]
    status, doc = _json(["messages", "list", *c], capsys)
    assert status == 0
    assert sorted(m["status"] for m in doc["messages"]) == ["failed", "held"]  # type: ignore[union-attr,index]
    status, doc = _json(["messages", "list", "--status", "failed", *c], capsys)
    (failed,) = doc["messages"]  # type: ignore[misc]
    assert (failed["uid"], failed["reason"]) == (1, "handler exited with status 3")
    status, out, _ = _run(["messages", "list", "--status", "held", *c], capsys)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "FROM", "SUBJECT"]
    assert "held" in lines[1]
    assert "loop@example.org" in lines[1]
    assert "ping" in lines[1]
    status, out, _ = _run(["messages", "list", "--status", "deferred", *c], capsys)
    assert (status, out.strip()) == (0, "no failed, held, deferred or rejected messages")


def test_messages_retry_hands_a_failed_message_on_again(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _failed(store, 1)
    c = ["-c", str(config_path)]
    _, doc = _json(["messages", "list", "--status", "failed", *c], capsys)
    ident = doc["messages"][0]["id"]  # type: ignore[index]
    before = store.operator_generation(ACCOUNT)
    status, out, _ = _run(["messages", "retry", str(ident), *c], capsys)
    assert status == 0, out
    record = store.get_message(key)
    assert record is not None
    assert (record.status, record.attempts) == (MessageStatus.CLAIMED, 0)
    assert [r.key for r in store.pending(ACCOUNT)] == [key]
    assert store.operator_generation(ACCOUNT) == before + 1
    # Once: it is no longer failed.
    assert _run(["messages", "retry", str(ident), *c], capsys)[0] == 1
    assert _run(["messages", "retry", "999", *c], capsys)[0] == 1
    assert _run(["messages", "retry", *c], capsys)[0] == 2


def test_messages_release_lets_a_held_thread_go_on(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    k1 = _held(store, 1, "thread-a")
    k2 = _held(store, 2, "thread-a")
    failed = _failed(store, 3)
    c = ["-c", str(config_path)]
    _, doc = _json(["messages", "list", "--status", "held", *c], capsys)
    ident = doc["messages"][0]["id"]  # type: ignore[index]
    status, doc = _json(["messages", "release", str(ident), *c], capsys)
    assert (status, doc["released"]) == (0, 2)
    assert {r.key for r in store.pending(ACCOUNT)} == {k1, k2}
    _, listed = _json(["messages", "list", "--status", "failed", *c], capsys)
    failed_id = listed["messages"][0]["id"]  # type: ignore[index]
    assert store.get_message(failed) is not None
    assert _run(["messages", "release", str(failed_id), *c], capsys)[0] == 1  # not held


def test_store_refuses_operator_moves_from_the_wrong_status(store: StateStore) -> None:
    key = _key(1)
    store.claim(key, "<m1@example.org>")
    with pytest.raises(LocalProtocolError, match=r"not failed"):
        store.retry_message(ACCOUNT, 1)
    with pytest.raises(LocalProtocolError):
        store.retry_outbox(ACCOUNT, 12345)
    assert store.operator_generation(ACCOUNT) == 0


def test_heartbeat_keeps_error_times_and_last_connection(store: StateStore) -> None:
    def beat(imap: str, error: str | None) -> object:
        return store.write_heartbeat(
            ACCOUNT, pid=1, started_at=0.0, imap=imap, imap_error=error, smtp_error=None,
            reconnects=0,
        )  # fmt: skip

    first = beat("connecting", None)
    assert first.last_connected_at is None  # type: ignore[attr-defined]
    failed = beat("reconnecting", "OSError: refused")
    again = beat("reconnecting", "OSError: refused")
    assert again.imap_error_at == failed.imap_error_at  # type: ignore[attr-defined]
    up = beat("idle", None)
    # The error is kept (status says it passed) and the connection is timed.
    assert up.imap_error == "OSError: refused"  # type: ignore[attr-defined]
    assert up.last_connected_at is not None  # type: ignore[attr-defined]
    assert store.heartbeat(ACCOUNT) == up


def test_a_status_probe_at_the_instant_serve_starts_does_not_stop_it(state_dir: Path) -> None:
    import fcntl
    import os
    import threading

    StateStore(state_dir, prune_on_open=False).close()
    assert not state_dir_in_use(state_dir)
    fd = os.open(state_dir / "lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what state_dir_in_use holds for a moment
    releaser = threading.Timer(0.05, os.close, (fd,))
    releaser.start()
    try:
        with StateStore(state_dir, prune_on_open=False) as s:
            assert state_dir_in_use(s.state_dir)
    finally:
        releaser.join()
    assert not state_dir_in_use(state_dir)


def test_old_operator_actions_are_pruned(store: StateStore) -> None:
    item = _queued(store, 1)
    store.drop_outbox(ACCOUNT, item, "test")
    assert store.prune_operator_log(now=time.time() + 364 * 86400) == 0
    assert store.prune_operator_log(now=time.time() + 366 * 86400) == 1
    assert store.operator_log(ACCOUNT) == []


SALES = """
[channels_config.email.accounts.sales]
username = "sales@example.com"
from_address = "sales@example.com"
"""


def test_status_shows_every_account_and_one_account_commands_need_a_name(
    config_path: Path, store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path.write_text(CONFIG + SALES)
    sales = account_key("sales@example.com", "imap.example.com", 993)
    store.sync_mailbox(sales, "INBOX", 7)
    _failed(store, 1)
    store.close()
    status, doc = _json(["status", "-c", str(config_path)], capsys)
    assert status == 0
    accounts = {a["account"]: a for a in doc["accounts"]}  # type: ignore[union-attr]
    assert set(accounts) == {"default", "sales"}
    assert accounts["default"]["messages"]["failed"] == 1
    assert accounts["sales"]["messages"]["failed"] == 0
    assert accounts["sales"]["account_key"] == sales
    status, doc = _json(["status", "-c", str(config_path), "--account", "sales"], capsys)
    assert [a["account"] for a in doc["accounts"]] == ["sales"]  # type: ignore[union-attr]
    # A command that acts on one account does not guess which.
    status, _out, err = _run(["messages", "list", "-c", str(config_path)], capsys)
    assert status == 2
    assert "several accounts (default, sales): choose one with --account" in err
    status, out, _ = _run(
        ["messages", "list", "-c", str(config_path), "--account", "default"], capsys
    )
    assert status == 0
    assert "failed" in out
    status, _out, err = _run(["status", "-c", str(config_path), "--account", "nope"], capsys)
    assert status == 2
    assert "no account 'nope'" in err
    assert "'sales'" in err
