"""The state store's conversation part: parked messages, threads, limits' state."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prxmail.state import (
    DB_FILENAME,
    MAX_THREAD_TEXT_CHARS,
    SCHEMA_VERSION,
    Direction,
    MessageKey,
    MessageStatus,
    OutboxDraft,
    StateStore,
    ThreadEntry,
    account_key,
)
from prxmail.state._schema import _MIGRATIONS

ACCOUNT = account_key("bot@example.com", "imap.example.com", 993)
FOLDER = "INBOX"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def open_store(path: Path, clock: Clock) -> StateStore:
    store = StateStore(path, clock=clock)
    store.sync_mailbox(ACCOUNT, FOLDER, 1)
    return store


def claim(store: StateStore, uid: int) -> MessageKey:
    key = MessageKey(ACCOUNT, FOLDER, 1, uid)
    store.claim(key, f"<m{uid}@example.org>")
    return key


def entry(
    mid: str, thread: str, direction: Direction = Direction.IN, text: str | None = None
) -> ThreadEntry:
    return ThreadEntry(mid, thread, direction, None, "alice@example.org", "hi", text)


def test_deferred_message_waits_for_its_due_time_then_is_pending_again(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock) as store:
        key = claim(store, 1)
        store.record_admission(ACCOUNT, deferred=[(key, clock.now + 60, "rate-limited")])
        assert store.get_message(key).status is MessageStatus.DEFERRED  # type: ignore[union-attr]
        assert store.pending(ACCOUNT) == []
        assert store.next_deferred_at(ACCOUNT, FOLDER) == clock.now + 60
        assert store.wake_deferred(ACCOUNT, FOLDER) == (0, clock.now + 60)
    clock.now += 61
    # Survives closing and reopening (a restart).
    with open_store(tmp_path, clock) as store:
        assert store.statistics().messages_by_status[MessageStatus.DEFERRED] == 1
        assert store.wake_deferred(ACCOUNT, FOLDER) == (1, None)
        assert [r.key for r in store.pending(ACCOUNT)] == [key]


def test_held_thread_is_released_by_thread_id_and_forgets_its_evidence(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock) as store:
        a, b, other = claim(store, 1), claim(store, 2), claim(store, 3)
        store.record_admission(
            ACCOUNT,
            held=[(a, "loop suspected"), (b, "loop suspected"), (other, "loop suspected")],
            entries=[
                entry("<m1@example.org>", "t1"),
                entry("<m2@example.org>", "t1"),
                entry("<m3@example.org>", "t2"),
            ],
            threads={"t1": {"v": 1, "held": "loop"}, "t2": {"v": 1, "held": "loop"}},
        )
        parked = store.parked_messages(ACCOUNT, MessageStatus.HELD)
        assert [(p.key.uid, p.thread_id) for p in parked] == [(1, "t1"), (2, "t1"), (3, "t2")]
        assert store.release_thread(ACCOUNT, "t1") == 2
        assert store.thread_activity(ACCOUNT, "t1") is None
        assert store.thread_activity(ACCOUNT, "t2") == {"v": 1, "held": "loop"}
        assert sorted(r.key.uid for r in store.pending(ACCOUNT)) == [1, 2]
        assert store.get_message(other).status is MessageStatus.HELD  # type: ignore[union-attr]
        assert store.release_thread(ACCOUNT, "t1") == 0


def test_thread_lookup_and_history_oldest_first_without_the_current_message(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with open_store(tmp_path, clock) as store:
        k1 = claim(store, 1)
        store.record_admission(ACCOUNT, accepted=k1, entries=[entry("<m1@example.org>", "t")])
        clock.now += 1
        draft = OutboxDraft("<r1@bot>", "bot@example.com", ["alice@example.org"], b"raw")
        long = "x" * (MAX_THREAD_TEXT_CHARS + 10)
        store.record_reply_in_thread(
            k1,
            draft,
            entry=entry("<r1@bot>", "t", Direction.OUT, long),
            activity={"v": 1, "replies": 1},
        )
        clock.now += 1
        k2 = claim(store, 2)
        store.record_admission(ACCOUNT, accepted=k2, entries=[entry("m2@example.org", "t")])
        assert store.thread_ids_among(ACCOUNT, ["<r1@bot>", "m1@example.org", "<nope@x>", ""]) == {
            "<r1@bot>": "t",
            "<m1@example.org>": "t",
        }
        history = store.thread_history(ACCOUNT, "t", exclude="<m2@example.org>")
        assert [(h.message_id, h.direction) for h in history] == [
            ("<m1@example.org>", Direction.IN),
            ("<r1@bot>", Direction.OUT),
        ]
        assert history[1].text is not None
        assert len(history[1].text) == MAX_THREAD_TEXT_CHARS
        # The history of an earlier message leaves out what came after it.
        assert store.thread_history(ACCOUNT, "t", exclude="<m1@example.org>") == []
        assert [h.message_id for h in store.thread_history(ACCOUNT, "t", limit=1)] == [
            "<m2@example.org>"
        ]
        assert store.thread_activity(ACCOUNT, "t") == {"v": 1, "replies": 1}


def test_rate_limiter_state_survives_reopening(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock) as store:
        store.record_admission(ACCOUNT, limiter_state={"v": 1, "saved_at": 5.0, "senders": {}})
    with open_store(tmp_path, clock) as store:
        assert store.rate_limiter_state(ACCOUNT) == {"v": 1, "saved_at": 5.0, "senders": {}}


def test_version_1_database_is_migrated_keeping_its_messages(tmp_path: Path) -> None:
    db = tmp_path / DB_FILENAME
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER NOT NULL, migrated_at REAL NOT NULL)"
    )
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute("INSERT INTO mailbox VALUES (?, 'INBOX', 1, 5, 1, 0, 0)", (ACCOUNT,))
    conn.execute(
        "INSERT INTO message (account, folder, uidvalidity, uid, message_id, status, reason,"
        " attempts, claimed_at, updated_at) VALUES (?, 'INBOX', 1, 5, '<old@x>', 'failed',"
        " 'exit 1', 1, 0, 0)",
        (ACCOUNT,),
    )
    conn.close()
    with StateStore(tmp_path, prune_on_open=False) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        record = store.get_message(MessageKey(ACCOUNT, FOLDER, 1, 5))
        assert record is not None
        assert (record.status, record.reason) == (MessageStatus.FAILED, "exit 1")
        key = claim(store, 6)
        store.record_admission(ACCOUNT, held=[(key, "loop")])
        assert store.statistics().messages_by_status[MessageStatus.HELD] == 1
