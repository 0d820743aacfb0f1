"""Tests of the durable state store: state table, outbox, loop ids, crash safety."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hypothesis
import hypothesis.stateful
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

from prxmail.errors import LocalProtocolError, StateError
from prxmail.state import (
    DB_FILENAME,
    MAX_REASON_CHARS,
    OUTBOX_TRANSITIONS,
    SCHEMA_VERSION,
    TRANSITIONS,
    ClaimOutcome,
    MessageKey,
    MessageStatus,
    OutboxDraft,
    OutboxStatus,
    RetryPolicy,
    StateStore,
    account_key,
    normalize_message_id,
    open_state_store,
    own_id_predicate,
)
from prxmail.state._db import CHECKPOINT_EVERY_COMMITS

ACCOUNT = account_key("bot@example.com", "imap.example.com", 993)
FOLDER = "INBOX"


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> StateStore:
    s = StateStore(tmp_path / "state", clock=clock, rng=random.Random(1))
    yield s  # type: ignore[misc]
    s.close()


def key(uid: int, uidvalidity: int = 1, folder: str = FOLDER) -> MessageKey:
    return MessageKey(ACCOUNT, folder, uidvalidity, uid)


def draft(n: int | str, raw: bytes = b"raw reply") -> OutboxDraft:
    return OutboxDraft(f"reply{n}@bot.example.com", "bot@example.com", ["a@example.com"], raw)


def claimed(store: StateStore, uid: int, uidvalidity: int = 1) -> MessageKey:
    k = key(uid, uidvalidity)
    result = store.claim(k, f"m{uid}.{uidvalidity}@example.com")
    assert result.outcome is ClaimOutcome.CLAIMED
    return k


def handling(store: StateStore, uid: int) -> MessageKey:
    k = claimed(store, uid)
    store.begin_handling(k)
    return k


@pytest.fixture
def synced(store: StateStore) -> StateStore:
    store.sync_mailbox(ACCOUNT, FOLDER, 1)
    return store


# -- small helpers -------------------------------------------------------------------


def test_account_key_normalises_host() -> None:
    assert account_key("u@x.org", "IMAP.Example.COM.", 993) == "u@x.org@imap.example.com:993"
    assert account_key("u", "h", 143) != account_key("u", "h", 993)


def test_normalize_message_id() -> None:
    assert normalize_message_id("abc@x") == "<abc@x>"
    assert normalize_message_id("  <abc@x>  ") == "<abc@x>"
    assert normalize_message_id("<abc@X>") != normalize_message_id("<ABC@X>")
    with pytest.raises(ValueError, match="empty"):
        normalize_message_id(" <> ")


def test_message_key_rejects_non_positive_uid() -> None:
    with pytest.raises(ValueError, match="positive"):
        MessageKey(ACCOUNT, FOLDER, 1, 0)


def test_outbox_draft_needs_a_recipient_and_hides_raw_in_repr() -> None:
    with pytest.raises(ValueError, match="recipient"):
        OutboxDraft("x@y", "bot@y", [], b"raw")
    d = OutboxDraft("x@y", "bot@y", ["a@b"], b"secret body text")
    assert "secret body" not in repr(d)
    assert "16 bytes" in repr(d)


# -- opening ---------------------------------------------------------------------------


def test_open_creates_private_dir_and_file_in_wal_full_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        with StateStore(tmp_path / "a" / "state") as s:
            d = tmp_path / "a" / "state"
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
            assert stat.S_IMODE((d / DB_FILENAME).stat().st_mode) == 0o600
            assert s._conn is not None
            assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert s.schema_version() == SCHEMA_VERSION
    finally:
        os.umask(old_umask)


def test_state_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        StateStore(tmp_path / "f")


def test_second_open_of_same_dir_is_refused_until_closed(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    with pytest.raises(StateError, match="in use"):
        StateStore(tmp_path)
    first.close()
    first.close()  # idempotent
    assert first.closed
    with StateStore(tmp_path) as again:
        assert again.schema_version() == SCHEMA_VERSION


def test_lock_error_names_the_holder_pid(tmp_path: Path) -> None:
    with StateStore(tmp_path), pytest.raises(StateError, match=rf"pid {os.getpid()}\b"):
        StateStore(tmp_path)


def test_read_only_open_while_writer_runs(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="has not run"):
        StateStore(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()  # nothing created
    writer = StateStore(tmp_path)
    writer.sync_mailbox(ACCOUNT, FOLDER, 1)
    reader = StateStore(tmp_path, read_only=True)
    try:
        claimed(writer, 5)
        # The reader sees committed changes, takes no lock and cannot write.
        assert reader.statistics().mailboxes[0].last_uid == 5
        assert reader.get_message(key(5)) is not None
        with pytest.raises(StateError, match="readonly"):
            reader.claim(key(6), "z@x")
        assert writer.get_message(key(6)) is None
    finally:
        reader.close()
        writer.close()
    # Also after the writer has gone (no -wal file any more).
    with StateStore(tmp_path, read_only=True) as again:
        assert again.mailbox(ACCOUNT, FOLDER).last_uid == 5  # type: ignore[union-attr]


def test_read_only_refuses_other_schema_versions(tmp_path: Path) -> None:
    with StateStore(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="upgrade prxmail"):
        StateStore(tmp_path, read_only=True)


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        s.statistics()


def test_data_survives_reopen_and_migration_is_not_rerun(tmp_path: Path) -> None:
    with StateStore(tmp_path) as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 5)
        s.claim(key(3, 5), "a@b")
    with StateStore(tmp_path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_message(key(3, 5)) is not None
        mb = s.mailbox(ACCOUNT, FOLDER)
        assert mb is not None
        assert mb.last_uid == 3
        assert s._conn is not None
        rows = s._conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0]
        assert rows == SCHEMA_VERSION


def test_database_from_newer_prxmail_is_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match=r"newer|upgrade"):
        StateStore(tmp_path)
    # The failed open released the directory lock.
    (tmp_path / DB_FILENAME).unlink()
    with StateStore(tmp_path):
        pass


def test_garbage_database_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError):
        StateStore(tmp_path)


def test_empty_database_file_is_refused_as_damage_not_started_over(tmp_path: Path) -> None:
    with StateStore(tmp_path) as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        s.mark_initialized(ACCOUNT, FOLDER, 1, 10)
    for leftover in tmp_path.glob(DB_FILENAME + "-*"):
        leftover.unlink()
    (tmp_path / DB_FILENAME).write_bytes(b"")  # truncated by a disk or a careless hand
    for read_only in (False, True):
        with pytest.raises(StateError) as info:
            StateStore(tmp_path, read_only=read_only)
        message = str(info.value)
        assert "empty (0 bytes)" in message
        assert str(tmp_path / DB_FILENAME) in message
        assert "first-start policy" in message
        assert "Restore the file" in message
    # Refused, not repaired: still empty, so the next start refuses again.
    assert (tmp_path / DB_FILENAME).stat().st_size == 0


def test_first_start_builds_the_database_under_another_name(tmp_path: Path) -> None:
    # What a first start that crashed before SQLite wrote anything leaves behind.
    (tmp_path / (DB_FILENAME + ".new")).write_bytes(b"")
    with StateStore(tmp_path) as s:
        assert s.schema_version() == SCHEMA_VERSION
    assert (tmp_path / DB_FILENAME).stat().st_size > 0
    assert not (tmp_path / (DB_FILENAME + ".new")).exists()


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable even for root (the immutable attribute), or by
    its mode when not root."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(directory)], check=False).returncode != 0:
        pytest.skip("running as root without chattr: cannot make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.parametrize("missing", [False, True], ids=["existing-dir", "dir-to-create"])
def test_unwritable_state_dir_is_a_state_error_naming_it(tmp_path: Path, missing: bool) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    state_dir = parent / "state" if missing else parent
    with unwritable(parent), pytest.raises(StateError) as info:
        StateStore(state_dir)
    message = str(info.value)
    assert message.startswith(f"state_dir {str(state_dir)!r} is not writable (")
    assert "point state_dir at a writable directory" in message
    assert isinstance(info.value.__cause__, OSError)


# -- mailboxes -------------------------------------------------------------------------


def test_sync_mailbox_first_same_and_changed_uidvalidity(store: StateStore) -> None:
    first = store.sync_mailbox(ACCOUNT, FOLDER, 10)
    assert (first.uidvalidity, first.last_uid, first.initialized) == (10, 0, False)
    assert first.previous_uidvalidity is None
    store.mark_initialized(ACCOUNT, FOLDER, 10, 41)
    store.claim(key(42, 10), "old@x")
    same = store.sync_mailbox(ACCOUNT, FOLDER, 10)
    assert (same.last_uid, same.initialized, same.previous_uidvalidity) == (42, True, None)

    changed = store.sync_mailbox(ACCOUNT, FOLDER, 11)
    assert (changed.uidvalidity, changed.last_uid, changed.initialized) == (11, 0, False)
    assert changed.previous_uidvalidity == 10
    assert changed.first_seen_at == first.first_seen_at
    # Old records are kept ...
    assert store.get_message(key(42, 10)) is not None
    # ... and a message already known by Message-ID is not handed on again.
    again = store.claim(key(1, 11), "<old@x>")
    assert again.outcome is ClaimOutcome.DUPLICATE
    assert again.record.status is MessageStatus.REJECTED
    assert again.record.reason == "duplicate-message-id"
    assert store.get_message(key(1, 11)) == again.record
    # Next sync with the same new value reports no change.
    assert store.sync_mailbox(ACCOUNT, FOLDER, 11).previous_uidvalidity is None


def test_mailboxes_are_separate_per_account_and_folder(store: StateStore) -> None:
    other = account_key("bot@example.com", "imap.example.com", 143)
    store.sync_mailbox(ACCOUNT, "INBOX", 1)
    store.sync_mailbox(ACCOUNT, "Support", 1)
    store.sync_mailbox(other, "INBOX", 1)
    store.claim(MessageKey(ACCOUNT, "Support", 1, 9), "s@x")
    assert store.mailbox(ACCOUNT, "Support").last_uid == 9  # type: ignore[union-attr]
    assert store.mailbox(ACCOUNT, "INBOX").last_uid == 0  # type: ignore[union-attr]
    assert store.mailbox(other, "INBOX").last_uid == 0  # type: ignore[union-attr]
    assert store.mailbox(ACCOUNT, "Nope") is None
    # The same Message-ID in another account is not a duplicate.
    assert store.claim(MessageKey(other, "INBOX", 1, 1), "s@x").outcome is ClaimOutcome.CLAIMED


def test_mark_initialized_and_advance_only_move_forward(synced: StateStore) -> None:
    s = synced
    assert s.mark_initialized(ACCOUNT, FOLDER, 1, 50).last_uid == 50
    assert s.mark_initialized(ACCOUNT, FOLDER, 1, 20).last_uid == 50
    assert s.advance_high_water_mark(ACCOUNT, FOLDER, 1, 10) == 50
    assert s.advance_high_water_mark(ACCOUNT, FOLDER, 1, 60) == 60
    assert s.mailbox(ACCOUNT, FOLDER).last_uid == 60  # type: ignore[union-attr]


def test_stale_or_unsynced_uidvalidity_is_refused(store: StateStore) -> None:
    with pytest.raises(LocalProtocolError, match="never synced"):
        store.claim(key(1), "a@b")
    store.sync_mailbox(ACCOUNT, FOLDER, 2)
    with pytest.raises(LocalProtocolError, match="stale"):
        store.claim(key(1, uidvalidity=1), "a@b")
    with pytest.raises(LocalProtocolError, match="stale"):
        store.mark_initialized(ACCOUNT, FOLDER, 1, 5)
    with pytest.raises(LocalProtocolError, match="stale"):
        store.advance_high_water_mark(ACCOUNT, FOLDER, 1, 5)


# -- claiming and the state table -----------------------------------------------------


def test_claim_records_and_advances_mark(synced: StateStore, clock: FakeClock) -> None:
    r = synced.claim(key(7), "x@y")
    assert r.outcome is ClaimOutcome.CLAIMED
    assert r.record.status is MessageStatus.CLAIMED
    assert r.record.message_id == "<x@y>"
    assert r.record.attempts == 0
    assert r.record.claimed_at == clock.now
    assert synced.mailbox(ACCOUNT, FOLDER).last_uid == 7  # type: ignore[union-attr]
    assert synced.get_message(key(7)) == r.record

    again = synced.claim(key(7), "x@y")
    assert again.outcome is ClaimOutcome.ALREADY_KNOWN
    assert again.record == r.record


def test_claim_rejects_empty_message_id(synced: StateStore) -> None:
    with pytest.raises(ValueError, match="empty"):
        synced.claim(key(1), "  ")
    assert synced.get_message(key(1)) is None


def test_claim_many_is_all_or_nothing(synced: StateStore) -> None:
    with pytest.raises(LocalProtocolError):
        synced.claim_many([(key(1), "a@x"), (key(2), "b@x"), (key(3, uidvalidity=99), "c@x")])
    assert synced.get_message(key(1)) is None
    assert synced.mailbox(ACCOUNT, FOLDER).last_uid == 0  # type: ignore[union-attr]

    results = synced.claim_many([(key(1), "a@x"), (key(2), "b@x"), (key(3), "a@x")])
    assert [r.outcome for r in results] == [
        ClaimOutcome.CLAIMED,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.DUPLICATE,
    ]
    assert synced.mailbox(ACCOUNT, FOLDER).last_uid == 3  # type: ignore[union-attr]


def test_claim_many_fails_unparseable_messages_in_the_same_transaction(
    synced: StateStore,
) -> None:
    pending_before = claimed(synced, 1)  # claimed earlier, e.g. by a run that crashed
    results = synced.claim_many(
        [(pending_before, "m1.1@example.com"), (key(2), "b@x"), (key(3), "c@x")],
        failed={pending_before: "cannot parse: bug", key(3): "cannot parse: bomb"},
    )
    assert [r.outcome for r in results] == [
        ClaimOutcome.ALREADY_KNOWN,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.CLAIMED,
    ]
    assert [r.record.status for r in results] == [
        MessageStatus.FAILED,
        MessageStatus.CLAIMED,
        MessageStatus.FAILED,
    ]
    assert synced.get_message(key(3)).reason == "cannot parse: bomb"  # type: ignore[union-attr]
    assert [r.key for r in synced.pending(ACCOUNT)] == [key(2)]
    assert synced.mailbox(ACCOUNT, FOLDER).last_uid == 3  # type: ignore[union-attr]
    # A finished message is never turned into a failure afterwards.
    synced.begin_handling(key(2))
    synced.mark_handled(key(2))
    again = synced.claim_many([(key(2), "b@x")], failed={key(2): "cannot parse"})
    assert again[0].record.status is MessageStatus.HANDLED


def test_record_verdicts_is_all_or_nothing(synced: StateStore) -> None:
    a, b, c, d = claimed(synced, 1), claimed(synced, 2), handling(synced, 3), claimed(synced, 4)
    with pytest.raises(LocalProtocolError):
        synced.record_verdicts([(a, "bounce"), (c, "list-mail")], d)
    assert synced.get_message(a).status is MessageStatus.CLAIMED  # type: ignore[union-attr]
    assert synced.get_message(d).status is MessageStatus.CLAIMED  # type: ignore[union-attr]
    started = synced.record_verdicts([(a, "bounce"), (b, "list-mail")], d)
    assert started is not None
    assert (started.status, started.attempts) == (MessageStatus.HANDLING, 1)
    assert [(synced.get_message(k).status, synced.get_message(k).reason) for k in (a, b)] == [  # type: ignore[union-attr]
        (MessageStatus.REJECTED, "bounce"),
        (MessageStatus.REJECTED, "list-mail"),
    ]
    assert synced.record_verdicts([]) is None


def test_claim_batch_claims_and_finds_our_ids_in_one_transaction(synced: StateStore) -> None:
    synced.remember_message_id(ACCOUNT, "<ours@bot.example.com>")
    with pytest.raises(LocalProtocolError):
        synced.claim_batch(
            [(key(1), "a@x"), (key(2, uidvalidity=99), "b@x")],
            message_ids=["<ours@bot.example.com>"],
        )
    assert synced.get_message(key(1)) is None
    batch = synced.claim_batch(
        [(key(1), "a@x"), (key(2), "b@x")],
        failed={key(2): "cannot parse"},
        message_ids=["<a@x>", "ours@bot.example.com", "<other@x>"],
    )
    assert [r.record.status for r in batch.results] == [
        MessageStatus.CLAIMED,
        MessageStatus.FAILED,
    ]
    assert batch.ours == frozenset({"<ours@bot.example.com>"})


def test_claim_many_reads_the_database_a_few_times_per_batch_not_per_message(
    synced: StateStore,
) -> None:
    # Issue 16: claiming a fetched group used to run three SELECTs per message (the
    # mailbox check, the existing record, the duplicate Message-ID).
    claimed(synced, 3)  # one already known, one duplicate Message-ID below
    statements: list[str] = []
    synced._conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    try:
        results = synced.claim_many(
            [(key(uid), f"m{uid}@example.com") for uid in range(1, 201)]
            + [(key(201), "m3.1@example.com")]
        )
    finally:
        synced._conn.set_trace_callback(None)  # type: ignore[union-attr]
    assert results[2].outcome is ClaimOutcome.ALREADY_KNOWN
    assert results[-1].outcome is ClaimOutcome.DUPLICATE
    assert sum(1 for r in results if r.outcome is ClaimOutcome.CLAIMED) == 199
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) <= 3, selects


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    earlier=st.lists(st.integers(min_value=1, max_value=12), max_size=4),
    batch=st.lists(
        st.tuples(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=5)),
        min_size=1,
        max_size=12,
    ),
)
def test_claim_many_decides_a_batch_as_one_claim_after_another(
    earlier: list[int], batch: list[tuple[int, int]]
) -> None:
    # Repeated keys, repeated Message-IDs and already known messages in one batch end
    # as they would if each item were claimed on its own, in order.
    items = [(key(uid), f"id{mid}@example.com") for uid, mid in batch]
    seen = []
    with tempfile.TemporaryDirectory() as tmp:
        for one_by_one in (False, True):
            path = Path(tmp) / str(one_by_one)
            with contextlib.closing(StateStore(path, clock=FakeClock(), rng=random.Random(1))) as s:
                s.sync_mailbox(ACCOUNT, FOLDER, 1)
                for uid in dict.fromkeys(earlier):
                    s.claim(key(uid), f"id{uid}@example.com")
                if one_by_one:
                    results = [s.claim(k, mid) for k, mid in items]
                else:
                    results = s.claim_many(items)
                seen.append(
                    (
                        results,
                        [s.get_message(key(uid)) for uid in range(1, 13)],
                        s.mailbox(ACCOUNT, FOLDER).last_uid,  # type: ignore[union-attr]
                    )
                )
    assert seen[0] == seen[1]


def _synchronous(store: StateStore) -> int:
    conn = store._conn
    assert conn is not None
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def test_commit_mode_is_full_where_power_loss_could_answer_twice(synced: StateStore) -> None:
    full, normal = 2, 1  # SQLite's numbers for synchronous=FULL / NORMAL
    k = claimed(synced, 1)
    assert _synchronous(synced) == normal
    synced.begin_handling(k)
    assert _synchronous(synced) == normal
    item = synced.record_reply(k, draft(1))
    assert _synchronous(synced) == full
    claimed(synced, 2)
    synced.mark_handled(handling(synced, 3))
    assert _synchronous(synced) == normal
    synced.mark_sent(item.id)
    assert _synchronous(synced) == full
    synced.mark_rejected(key(2), "bounce")
    assert _synchronous(synced) == normal
    synced.mark_initialized(ACCOUNT, FOLDER, 1, 10)
    assert _synchronous(synced) == full


def test_happy_path_to_handled(synced: StateStore) -> None:
    k = claimed(synced, 1)
    rec = synced.begin_handling(k)
    assert (rec.status, rec.attempts) == (MessageStatus.HANDLING, 1)
    done = synced.mark_handled(k)
    assert done.status is MessageStatus.HANDLED
    assert synced.get_message(k) == done


def test_rejected_and_failed_keep_reason(synced: StateStore) -> None:
    a = claimed(synced, 1)
    assert synced.mark_rejected(a, "bounce").reason == "bounce"
    b = handling(synced, 2)
    assert synced.mark_failed(b, "exit status 3").reason == "exit status 3"
    c = claimed(synced, 3)
    long = "x" * (MAX_REASON_CHARS * 3)
    stored = synced.mark_failed(c, long).reason
    assert stored is not None
    assert len(stored) == MAX_REASON_CHARS
    assert synced.get_message(c).reason == stored  # type: ignore[union-attr]


def test_every_transition_not_in_the_table_is_refused(tmp_path: Path) -> None:
    # Drive a fresh message into each state, then try every operation on it.
    def into(s: StateStore, uid: int, status: MessageStatus) -> MessageKey:
        k = claimed(s, uid)
        if status is MessageStatus.CLAIMED:
            return k
        if status is MessageStatus.REJECTED:
            s.mark_rejected(k, "r")
            return k
        if status is MessageStatus.DEFERRED:
            s.record_admission(ACCOUNT, deferred=[(k, 1e12, "rate-limited")])
            return k
        if status is MessageStatus.HELD:
            s.record_admission(ACCOUNT, held=[(k, "loop suspected")])
            return k
        s.begin_handling(k)
        if status is MessageStatus.HANDLED:
            s.mark_handled(k)
        elif status is MessageStatus.REPLIED:
            s.record_reply(k, draft(uid))
        elif status is MessageStatus.FAILED:
            s.mark_failed(k, "f")
        return k

    ops = {
        MessageStatus.HANDLING: lambda s, k: s.begin_handling(k),
        MessageStatus.HANDLED: lambda s, k: s.mark_handled(k),
        MessageStatus.REJECTED: lambda s, k: s.mark_rejected(k, "r"),
        MessageStatus.FAILED: lambda s, k: s.mark_failed(k, "f"),
        MessageStatus.REPLIED: lambda s, k: s.record_reply(k, draft(f"{k.uid}-again")),
    }
    with StateStore(tmp_path) as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        uid = 0
        checked = 0
        for start in MessageStatus:
            for target, op in ops.items():
                uid += 1
                k = into(s, uid, start)
                if target in TRANSITIONS[start]:
                    assert op(s, k) is not None
                    assert s.get_message(k).status is target  # type: ignore[union-attr]
                else:
                    with pytest.raises(LocalProtocolError):
                        op(s, k)
                    assert s.get_message(k).status is start  # type: ignore[union-attr]
                checked += 1
        assert checked == len(MessageStatus) * len(ops)
        for status in (
            MessageStatus.HANDLED,
            MessageStatus.REPLIED,
            MessageStatus.REJECTED,
            MessageStatus.FAILED,
        ):
            assert status.terminal
        assert not MessageStatus.CLAIMED.terminal


def test_operations_on_unknown_message_are_refused(synced: StateStore) -> None:
    with pytest.raises(LocalProtocolError, match="claim it first"):
        synced.begin_handling(key(5))


def test_recover_interrupted_retries_then_fails(synced: StateStore) -> None:
    k = handling(synced, 1)
    other = handling(synced, 2)
    synced.mark_handled(other)
    report = synced.recover_interrupted(max_attempts=2)
    assert report.retried == (k,)
    assert report.failed == ()
    rec = synced.get_message(k)
    assert rec is not None
    assert (rec.status, rec.attempts, rec.reason) == (MessageStatus.CLAIMED, 1, "interrupted")
    assert [r.key for r in synced.pending(ACCOUNT, FOLDER)] == [k]

    assert synced.begin_handling(k).attempts == 2
    report = synced.recover_interrupted(max_attempts=2)
    assert report == type(report)(retried=(), failed=(k,))
    rec = synced.get_message(k)
    assert rec is not None
    assert (rec.status, rec.reason) == (MessageStatus.FAILED, "interrupted-too-often")
    assert synced.pending(ACCOUNT) == []
    with pytest.raises(ValueError, match="at least 1"):
        synced.recover_interrupted(max_attempts=0)


def test_recover_interrupted_limited_to_account(store: StateStore) -> None:
    other = account_key("x", "h", 1)
    store.sync_mailbox(ACCOUNT, FOLDER, 1)
    store.sync_mailbox(other, FOLDER, 1)
    mine = handling(store, 1)
    theirs = MessageKey(other, FOLDER, 1, 1)
    store.claim(theirs, "t@x")
    store.begin_handling(theirs)
    report = store.recover_interrupted(max_attempts=5, account=ACCOUNT)
    assert report.retried == (mine,)
    assert store.get_message(theirs).status is MessageStatus.HANDLING  # type: ignore[union-attr]


def test_release_returns_to_claimed_until_max_attempts(synced: StateStore) -> None:
    k = handling(synced, 1)
    assert synced.release(k, "cannot start", max_attempts=2).status is MessageStatus.CLAIMED
    synced.begin_handling(k)
    rec = synced.release(k, "cannot start", max_attempts=2)
    assert rec.status is MessageStatus.FAILED
    assert rec.reason is not None
    assert "cannot start" in rec.reason


def test_pending_is_in_uid_order_and_per_folder(synced: StateStore) -> None:
    synced.sync_mailbox(ACCOUNT, "Other", 1)
    for uid in (3, 1, 2):
        claimed(synced, uid)
    synced.claim(MessageKey(ACCOUNT, "Other", 1, 1), "o@x")
    assert [r.key.uid for r in synced.pending(ACCOUNT, FOLDER)] == [1, 2, 3]
    assert len(synced.pending(ACCOUNT)) == 4


def test_messages_with_status(synced: StateStore, clock: FakeClock) -> None:
    for uid in (1, 2, 3):
        k = claimed(synced, uid)
        clock.now += 1
        synced.mark_failed(k, f"reason {uid}")
    claimed(synced, 4)
    failed = synced.messages_with_status(MessageStatus.FAILED)
    assert [(r.key.uid, r.reason) for r in failed] == [
        (3, "reason 3"),
        (2, "reason 2"),
        (1, "reason 1"),
    ]
    assert len(synced.messages_with_status(MessageStatus.FAILED, limit=2)) == 2
    assert synced.messages_with_status(MessageStatus.FAILED, account="other") == []
    assert [r.key.uid for r in synced.messages_with_status(MessageStatus.CLAIMED)] == [4]


def test_find_by_message_id(synced: StateStore) -> None:
    claimed(synced, 1)
    found = synced.find_by_message_id(ACCOUNT, "m1.1@example.com")
    assert [r.key for r in found] == [key(1)]
    assert synced.find_by_message_id(ACCOUNT, "<nope@x>") == []


# -- replies and the outbox ----------------------------------------------------------


def test_record_reply_is_atomic_and_only_once(synced: StateStore, clock: FakeClock) -> None:
    k = handling(synced, 1)
    item = synced.record_reply(k, draft(1, b"Subject: Re: hi\r\n\r\nbody"))
    assert item.status is OutboxStatus.QUEUED
    assert item.parent == k
    assert item.parent_message_id == "<m1.1@example.com>"
    assert item.raw == b"Subject: Re: hi\r\n\r\nbody"
    assert item.next_attempt_at == clock.now
    assert synced.get_message(k).status is MessageStatus.REPLIED  # type: ignore[union-attr]
    assert synced.is_our_message_id("reply1@bot.example.com")
    assert synced.get_outbox_item(item.id) == item

    with pytest.raises(LocalProtocolError):
        synced.record_reply(k, draft("other"))
    assert len(synced.outbox_items()) == 1
    assert not synced.is_our_message_id("replyother@bot.example.com")


def test_failed_reply_insert_rolls_back_the_status_change(synced: StateStore) -> None:
    first = handling(synced, 1)
    synced.record_reply(first, draft("same"))
    second = handling(synced, 2)
    with pytest.raises(LocalProtocolError, match="already used"):
        synced.record_reply(second, draft("same"))
    # Nothing of the failed transaction remains: still handling, no second row.
    assert synced.get_message(second).status is MessageStatus.HANDLING  # type: ignore[union-attr]
    assert len(synced.outbox_items()) == 1


def test_unique_index_backs_up_one_reply_per_parent(synced: StateStore) -> None:
    k = handling(synced, 1)
    synced.record_reply(k, draft(1))
    assert synced._conn is not None
    with pytest.raises(sqlite3.IntegrityError):
        synced._conn.execute(
            "INSERT INTO outbox (message_id, account, parent_folder, parent_uidvalidity,"
            " parent_uid, envelope_from, envelope_to, raw, raw_size, status,"
            " next_attempt_at, created_at, updated_at)"
            " VALUES ('<z@z>', ?, ?, 1, 1, 'a', '[]', x'', 0, 'queued', 0, 0, 0)",
            (ACCOUNT, FOLDER),
        )


def test_enqueue_without_parent(synced: StateStore) -> None:
    item = synced.enqueue(ACCOUNT, draft("fresh"))
    assert item.parent is None
    assert item.parent_message_id is None
    assert synced.due_outbox() == [item]
    assert synced.is_our_message_id("<replyfresh@bot.example.com>")


def test_due_outbox_order_limit_and_time(synced: StateStore, clock: FakeClock) -> None:
    items = []
    for n in range(5):
        items.append(synced.enqueue(ACCOUNT, draft(n)))
        clock.now += 1
    assert [i.id for i in synced.due_outbox(limit=3)] == [i.id for i in items[:3]]
    # Push the first one into the future: it is no longer due, the rest are.
    synced.mark_transient_failure(items[0].id, "421 try later")
    due = synced.due_outbox()
    assert items[0].id not in [i.id for i in due]
    assert len(due) == 4
    nxt = synced.next_due_at()
    assert nxt == items[1].next_attempt_at
    later = synced.get_outbox_item(items[0].id)
    assert later is not None
    assert items[0].id in [i.id for i in synced.due_outbox(now=later.next_attempt_at)]


def test_mark_sent_drops_bytes_and_keeps_row(synced: StateStore, clock: FakeClock) -> None:
    item = synced.enqueue(ACCOUNT, draft(1, b"x" * 1000))
    clock.now += 5
    sent = synced.mark_sent(item.id)
    assert (sent.status, sent.raw, sent.sent_at, sent.attempts) == (
        OutboxStatus.SENT,
        b"",
        clock.now,
        1,
    )
    assert synced.get_outbox_item(item.id) == sent
    assert synced.due_outbox() == []
    assert synced.next_due_at() is None
    assert synced.is_our_message_id(item.message_id)
    with pytest.raises(LocalProtocolError, match="not queued"):
        synced.mark_sent(item.id)
    with pytest.raises(LocalProtocolError, match="no outbox item"):
        synced.mark_sent(9999)


def test_mark_sent_many_is_one_all_or_nothing_change(synced: StateStore, clock: FakeClock) -> None:
    items = [synced.enqueue(ACCOUNT, draft(n, b"y" * 100)) for n in range(3)]
    done = synced.enqueue(ACCOUNT, draft(9))
    synced.mark_sent(done.id)
    with pytest.raises(LocalProtocolError, match="not queued"):
        synced.mark_sent_many([items[0].id, done.id])
    with pytest.raises(LocalProtocolError, match="no outbox item"):
        synced.mark_sent_many([items[0].id, 9999])
    assert [i.id for i in synced.due_outbox()] == [i.id for i in items]
    clock.now += 7
    synced.mark_sent_many([items[0].id, items[2].id, items[0].id])
    sent = [synced.get_outbox_item(i.id) for i in items]
    assert [(i.status, i.raw, i.sent_at, i.attempts) for i in sent if i is not None] == [
        (OutboxStatus.SENT, b"", clock.now, 1),
        (OutboxStatus.QUEUED, b"y" * 100, None, 0),
        (OutboxStatus.SENT, b"", clock.now, 1),
    ]
    synced.mark_sent_many([])
    assert [i.id for i in synced.due_outbox()] == [items[1].id]


def test_transient_failures_back_off_exponentially_then_give_up(
    tmp_path: Path, clock: FakeClock
) -> None:
    policy = RetryPolicy(initial_delay=10.0, multiplier=2.0, max_delay=70.0, jitter=0.2)
    with StateStore(tmp_path, clock=clock, retry_policy=policy, rng=random.Random(7)) as s:
        item = s.enqueue(ACCOUNT, draft(1))
        delays = []
        for attempt in range(1, policy.max_attempts):
            updated = s.mark_transient_failure(item.id, f"451 attempt {attempt}")
            assert updated.status is OutboxStatus.QUEUED
            assert updated.attempts == attempt
            assert updated.last_error == f"451 attempt {attempt}"
            delays.append(updated.next_attempt_at - clock.now)
        for n, d in enumerate(delays[:4], start=1):
            base = min(70.0, 10.0 * 2 ** (n - 1))
            assert base * 0.8 <= d <= base
        assert all(56.0 <= d <= 70.0 for d in delays[3:])  # capped
        assert len(set(delays)) > 1  # jittered
        final = s.mark_transient_failure(item.id, "451 again")
        assert final.status is OutboxStatus.FAILED_PERMANENT
        assert final.last_error is not None
        assert final.last_error.startswith(f"gave up after {policy.max_attempts} attempts")
        assert s.due_outbox(now=clock.now + 1e9) == []
        assert s.statistics().outbox_failed == 1


def test_permanent_failure_kept_and_requeue(synced: StateStore) -> None:
    item = synced.enqueue(ACCOUNT, draft(1, b"the bytes"))
    failed = synced.mark_permanent_failure(item.id, "550 no such user")
    assert failed.status is OutboxStatus.FAILED_PERMANENT
    assert failed.raw == b"the bytes"
    assert synced.outbox_items(OutboxStatus.FAILED_PERMANENT) == [failed]
    assert synced.outbox_items(OutboxStatus.QUEUED) == []
    with pytest.raises(LocalProtocolError):
        synced.mark_transient_failure(item.id, "x")
    back = synced.requeue(item.id)
    assert (back.status, back.attempts) == (OutboxStatus.QUEUED, 0)
    assert synced.due_outbox() == [back]
    with pytest.raises(LocalProtocolError):
        synced.requeue(item.id)


def _outbox_item_in(s: StateStore, status: OutboxStatus, n: int) -> int:
    item = s.enqueue(ACCOUNT, draft(f"{status.value}-{n}"))
    if status is OutboxStatus.SENT:
        s.mark_sent(item.id)
    elif status is OutboxStatus.FAILED_PERMANENT:
        s.mark_permanent_failure(item.id, "550")
    return item.id


# Each outbox operation: the status it starts from and the status it ends in.
OUTBOX_OPERATIONS: dict[str, tuple[OutboxStatus, OutboxStatus]] = {
    "mark_sent": (OutboxStatus.QUEUED, OutboxStatus.SENT),
    "mark_sent_many": (OutboxStatus.QUEUED, OutboxStatus.SENT),
    "mark_transient_failure": (OutboxStatus.QUEUED, OutboxStatus.QUEUED),
    "mark_permanent_failure": (OutboxStatus.QUEUED, OutboxStatus.FAILED_PERMANENT),
    "requeue": (OutboxStatus.FAILED_PERMANENT, OutboxStatus.QUEUED),
}


def test_outbox_table_covers_every_status_and_sent_is_final() -> None:
    assert set(OUTBOX_TRANSITIONS) == set(OutboxStatus)
    assert OUTBOX_TRANSITIONS[OutboxStatus.SENT] == frozenset()
    # Every operation is a move of the table, and every move has an operation.
    moves = {(a, b) for a, tos in OUTBOX_TRANSITIONS.items() for b in tos}
    assert set(OUTBOX_OPERATIONS.values()) == moves


def test_every_outbox_transition_not_in_the_table_is_refused(synced: StateStore) -> None:
    n = 0
    for status in OutboxStatus:
        for name, (source, target) in OUTBOX_OPERATIONS.items():
            n += 1
            item_id = _outbox_item_in(synced, status, n)
            before = synced.get_outbox_item(item_id)
            call = {
                "mark_sent": synced.mark_sent,
                "mark_sent_many": lambda i: synced.mark_sent_many([i]),
                "mark_transient_failure": lambda i: synced.mark_transient_failure(i, "421"),
                "mark_permanent_failure": lambda i: synced.mark_permanent_failure(i, "550"),
                "requeue": synced.requeue,
            }[name]
            if status is source and target in OUTBOX_TRANSITIONS[status]:
                call(item_id)
                after = synced.get_outbox_item(item_id)
                assert after is not None
                assert after.status is target, (status, name)
            else:
                with pytest.raises(LocalProtocolError, match=f"is {status.value}, not"):
                    call(item_id)
                # Refused means nothing changed.
                assert synced.get_outbox_item(item_id) == before, (status, name)


@hypothesis.given(
    failures=st.integers(min_value=1, max_value=10_000),
    initial=st.floats(min_value=0.0, max_value=1e4),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    cap=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=0.99),
    seed=st.integers(),
)
def test_retry_delay_is_bounded(  # noqa: PLR0917 - hypothesis passes arguments by name
    failures: int, initial: float, multiplier: float, cap: float, jitter: float, seed: int
) -> None:
    policy = RetryPolicy(initial_delay=initial, multiplier=multiplier, max_delay=cap, jitter=jitter)
    d = policy.delay(failures, random.Random(seed))
    base = min(cap, initial * multiplier ** min(failures - 1, 64))
    assert base * (1 - jitter) - 1e-9 <= d <= base + 1e-9
    assert d <= cap + 1e-9


def test_retry_policy_rejects_bad_jitter() -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.0)


# -- our Message-IDs and pruning -----------------------------------------------------


def test_remember_and_recognise_own_ids(synced: StateStore) -> None:
    assert not synced.is_our_message_id("<a@b>")
    assert not synced.is_our_message_id("")
    synced.remember_message_id(ACCOUNT, "a@b")
    synced.remember_message_id(ACCOUNT, "<a@b>")  # idempotent
    assert synced.is_our_message_id(" <a@b> ")
    with pytest.raises(LocalProtocolError, match="already used"):
        synced.enqueue(ACCOUNT, OutboxDraft("a@b", "bot@x", ["u@x"], b""))


def test_our_message_ids_among_and_predicate(synced: StateStore) -> None:
    synced.remember_message_id(ACCOUNT, "a@x")
    handling_key = handling(synced, 1)
    synced.record_reply(handling_key, draft(1))
    many = [f"other{n}@x" for n in range(1200)]  # several lookup chunks
    ours = synced.our_message_ids_among(["<a@x>", "b@x", "", "  ", *many, "reply1@bot.example.com"])
    assert ours == {"<a@x>", "<reply1@bot.example.com>"}
    is_ours = own_id_predicate(ours)
    assert is_ours("a@x")
    assert is_ours(" <reply1@bot.example.com>")
    assert not is_ours("b@x")
    assert not is_ours("")
    assert synced.our_message_ids_among([]) == frozenset()


def test_prune_by_age_and_cap_keeps_queued(tmp_path: Path, clock: FakeClock) -> None:
    day = 86400.0
    with StateStore(tmp_path, clock=clock) as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        s.remember_message_id(ACCOUNT, "ancient@x")
        queued_old = s.enqueue(ACCOUNT, draft("queued-old"))
        clock.now += 200 * day
        for n in range(5):
            s.remember_message_id(ACCOUNT, f"recent{n}@x")
            clock.now += 1
        report = s.prune(own_id_max_count=3)
        assert report.own_message_ids == 3  # ancient by age, recent0/1 by the cap
        assert not s.is_our_message_id("ancient@x")
        assert not s.is_our_message_id("recent0@x")
        assert not s.is_our_message_id("recent1@x")
        assert all(s.is_our_message_id(f"recent{n}@x") for n in (2, 3, 4))
        # Still queued: kept even though it is old and over the cap.
        assert s.is_our_message_id(queued_old.message_id)


def test_prune_sent_rows_and_old_finished_messages(tmp_path: Path, clock: FakeClock) -> None:
    day = 86400.0
    with StateStore(tmp_path, clock=clock) as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        done = handling(s, 1)
        s.mark_handled(done)
        replied_unsent = handling(s, 2)
        s.record_reply(replied_unsent, draft(2))
        replied_sent = handling(s, 3)
        sent_item = s.record_reply(replied_sent, draft(3))
        s.mark_sent(sent_item.id)
        still_claimed = claimed(s, 4)
        clock.now += 400 * day
        report = s.prune()
        assert report.sent_outbox == 1
        assert report.messages == 2  # handled + replied-and-sent
        assert s.get_message(done) is None
        assert s.get_message(replied_sent) is None
        assert s.get_message(replied_unsent) is not None  # reply still queued
        assert s.get_message(still_claimed) is not None  # never pruned while pending
        assert s.get_outbox_item(sent_item.id) is None
        assert s.mailbox(ACCOUNT, FOLDER).last_uid == 4  # type: ignore[union-attr]


def test_statistics(synced: StateStore) -> None:
    synced.sync_mailbox(ACCOUNT, "Other", 3)
    handling(synced, 1)
    a = handling(synced, 2)
    item = synced.record_reply(a, draft(2))
    b = handling(synced, 3)
    failed_item = synced.record_reply(b, draft(3))
    synced.mark_permanent_failure(failed_item.id, "550")
    claimed(synced, 4)
    st_ = synced.statistics()
    assert st_.schema_version == SCHEMA_VERSION
    assert st_.outbox_queued == 1
    assert st_.outbox_failed == 1
    assert st_.outbox_next_attempt_at == item.next_attempt_at
    assert st_.messages_by_status[MessageStatus.HANDLING] == 1
    assert st_.messages_by_status[MessageStatus.REPLIED] == 2
    assert st_.messages_by_status[MessageStatus.CLAIMED] == 1
    assert st_.messages_by_status[MessageStatus.FAILED] == 0
    assert [(m.folder, m.uidvalidity, m.last_uid) for m in st_.mailboxes] == [
        ("INBOX", 1, 4),
        ("Other", 3, 0),
    ]


# -- the trio facade -------------------------------------------------------------------


class RecordingConnection(sqlite3.Connection):
    """Notes the thread and text of every statement the store runs."""

    log: list[tuple[int, str, object]]

    def execute(self, sql: str, parameters: object = (), /) -> sqlite3.Cursor:
        self.log.append((threading.get_ident(), sql, parameters))
        return super().execute(sql, parameters)  # type: ignore[arg-type]


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, object]]:
    """Every statement any store opened during the test runs, with its thread."""
    log: list[tuple[int, str, object]] = []
    real_connect = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_connect(*args, factory=RecordingConnection, **kwargs)  # type: ignore[call-overload]
        conn.log = log
        return conn  # type: ignore[no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect)
    return log


async def test_async_store_serialises_the_calls_of_many_tasks(tmp_path: Path) -> None:
    async with open_state_store(tmp_path) as store:
        assert store.state_dir == tmp_path
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)

        # Many tasks at once: the calls never overlap on the one connection (each is
        # a transaction; an overlap would fail with "cannot start a transaction
        # within a transaction").
        async def work(uid: int) -> None:
            k = key(uid)
            assert (await store.claim(k, f"{uid}@x")).outcome is ClaimOutcome.CLAIMED
            await store.begin_handling(k)
            if uid % 2:
                await store.record_reply(k, draft(uid))
            else:
                await store.mark_handled(k)

        async with trio.open_nursery() as nursery:
            for uid in range(1, 41):
                nursery.start_soon(work, uid)
        stats = await store.statistics()
        assert stats.messages_by_status[MessageStatus.REPLIED] == 20
        assert stats.messages_by_status[MessageStatus.HANDLED] == 20
        assert stats.outbox_queued == 20
        assert len(await store.due_outbox(limit=100)) == 20
        assert await store.is_our_message_id("reply1@bot.example.com")
    # No thread is busy with the store any more and the directory lock is released.
    assert not [t for t in threading.enumerate() if t.name == "prxmail-state"]
    with StateStore(tmp_path) as s:
        assert s.mailbox(ACCOUNT, FOLDER).last_uid == 40  # type: ignore[union-attr]


async def test_no_store_call_runs_sqlite_on_the_trio_thread(
    tmp_path: Path, statements: list[tuple[int, str, object]]
) -> None:
    trio_thread = threading.get_ident()
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        # The short calls the channel makes for every message included.
        batch = await store.claim_batch([(key(1), "a@x"), (key(2), "b@x")], message_ids=["a@x"])
        assert len(batch.results) == 2
        await store.record_verdicts([(key(2), "list-mail")], key(1))
        await store.mark_handled(key(1))
        await store.claim(key(3), "c@x")
        await store.begin_handling(key(3))
        await store.mark_failed(key(3), "boom")
        await store.advance_high_water_mark(ACCOUNT, FOLDER, 1, 9)
        assert await store.mailbox(ACCOUNT, FOLDER) is not None
        assert await store.get_message(key(1)) is not None
        assert not await store.is_our_message_id("a@x")
        assert await store.our_message_ids_among(["a@x"]) == frozenset()
        assert await store.next_due_at() is None
    assert len(statements) > 20
    assert not [sql for thread, sql, _ in statements if thread == trio_thread]


async def test_async_store_keeps_the_order_the_calls_were_made_in(
    tmp_path: Path, statements: list[tuple[int, str, object]]
) -> None:
    made: list[str] = []
    async with open_state_store(tmp_path) as store:

        async def remember(n: int) -> None:
            made.append(f"<{n}@x>")  # in the same step that queues the call
            await store.remember_message_id(ACCOUNT, f"{n}@x")

        async with trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(remember, n)
    inserted = [
        params[0]  # type: ignore[index]
        for _, sql, params in statements
        if sql.startswith("INSERT OR IGNORE INTO own_message_id")
    ]
    assert len(made) == 60
    assert inserted == made


async def test_queued_calls_share_a_hop_each_in_its_own_transaction(
    tmp_path: Path,
    statements: list[tuple[int, str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hops: list[int] = []
    real_run_sync = trio.to_thread.run_sync

    async def counting_run_sync(
        fn: Callable[..., object], *args: object, **kwargs: object
    ) -> object:
        hops.append(len(args[0]) if args else 1)  # type: ignore[arg-type]
        return await real_run_sync(fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        hops.clear()
        del statements[:]

        async def remember(n: int) -> None:
            await store.remember_message_id(ACCOUNT, f"{n}@x")

        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(remember, n)
        # One hop ran the first call; the 29 that queued meanwhile shared the next.
        assert sum(hops) == 30
        assert len(hops) < 30
        assert all([await store.is_our_message_id(f"{n}@x") for n in range(30)])
    begins = [sql for _, sql, _ in statements if sql.startswith("BEGIN")]
    assert len(begins) >= 30  # one transaction per call, batched or not


async def test_cancelled_while_queued_starts_no_work_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        items = [(key(uid), f"{uid}@x") for uid in range(1, 3001)]
        cancelled = trio.CancelScope()

        async def queued_behind() -> None:
            with cancelled:
                await store.remember_message_id(ACCOUNT, "never@x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.claim_many, items)  # leads, runs a while
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(queued_behind)
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
        assert cancelled.cancelled_caught
        assert not await store.is_our_message_id("never@x")
        await store.remember_message_id(ACCOUNT, "later@x")  # not stuck behind it
        assert await store.is_our_message_id("later@x")


def test_wal_checkpoints_are_explicit_and_counted_by_writes(
    tmp_path: Path, statements: list[tuple[int, str, object]]
) -> None:
    with StateStore(tmp_path) as s:
        assert s._conn is not None
        # SQLite's automatic checkpoint (inside a COMMIT) is off.
        assert s._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        s.checkpoint()  # start counting from here
        for n in range(1, CHECKPOINT_EVERY_COMMITS):
            s.remember_message_id(ACCOUNT, f"{n}@x")
        assert not s.checkpoint_due
        s.remember_message_id(ACCOUNT, "one-more@x")
        for _ in range(50):
            s.statistics()  # reads do not count
        assert s.checkpoint_due
        s.checkpoint()
        assert not s.checkpoint_due
        # Nothing but checkpoint() checkpointed.
        runs = [sql for _, sql, _ in statements if "wal_checkpoint" in sql]
        assert runs == ["PRAGMA wal_checkpoint(PASSIVE)"] * 2


async def test_async_store_checkpoints_between_calls_on_the_worker(
    tmp_path: Path, statements: list[tuple[int, str, object]]
) -> None:
    trio_thread = threading.get_ident()
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        for n in range(CHECKPOINT_EVERY_COMMITS + 10):
            await store.remember_message_id(ACCOUNT, f"{n}@x")
        await trio.sleep(0.05)  # the checkpointer's turn comes between calls
        await store.remember_message_id(ACCOUNT, "last@x")
    runs = [
        (thread, index)
        for index, (thread, sql, _) in enumerate(statements)
        if "wal_checkpoint" in sql
    ]
    assert len(runs) == 1
    thread, index = runs[0]
    assert thread != trio_thread
    # Not inside a transaction: the statement before it ended one.
    assert statements[index - 1][1] == "COMMIT"


async def test_async_read_only_store(tmp_path: Path) -> None:
    with StateStore(tmp_path) as writer:
        writer.sync_mailbox(ACCOUNT, FOLDER, 3)
        async with open_state_store(tmp_path, read_only=True) as reader:
            stats = await reader.statistics()
            assert [(m.folder, m.uidvalidity) for m in stats.mailboxes] == [(FOLDER, 3)]


async def test_async_store_errors_propagate(tmp_path: Path) -> None:
    async with open_state_store(tmp_path) as store:
        with pytest.raises(LocalProtocolError, match="never synced"):
            await store.claim(key(1), "a@b")
        # Still usable afterwards.
        assert (await store.sync_mailbox(ACCOUNT, FOLDER, 1)).last_uid == 0


async def test_async_open_refused_when_locked(tmp_path: Path) -> None:
    with StateStore(tmp_path), pytest.raises(StateError, match="in use"):
        async with open_state_store(tmp_path):
            pass  # pragma: no cover
    assert not [t for t in threading.enumerate() if t.name == "prxmail-state"]


async def test_cancelled_caller_starts_no_work(tmp_path: Path) -> None:
    async with open_state_store(tmp_path) as store:
        with trio.CancelScope() as cs:
            cs.cancel()
            await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        assert cs.cancelled_caught
        assert await store.mailbox(ACCOUNT, FOLDER) is None


async def test_call_in_flight_completes_despite_cancel(tmp_path: Path) -> None:
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        # A big batch takes a while on the worker; cancel while it runs.
        items = [(key(uid), f"{uid}@x") for uid in range(1, 3001)]
        with trio.move_on_after(0.001) as cs:
            results = await store.claim_many(items)
            # The deadline passed while the call ran on the worker ...
            assert trio.current_time() > cs.deadline
            await trio.sleep(10)  # ... and is delivered at the next checkpoint.
        assert cs.cancelled_caught
        assert len(results) == 3000
        mb = await store.mailbox(ACCOUNT, FOLDER)
        assert mb is not None
        assert mb.last_uid == 3000


async def test_async_housekeeping_calls(tmp_path: Path) -> None:
    async with open_state_store(tmp_path) as store:
        await store.sync_mailbox(ACCOUNT, FOLDER, 1)
        assert (await store.mark_initialized(ACCOUNT, FOLDER, 1, 5)).initialized
        assert await store.advance_high_water_mark(ACCOUNT, FOLDER, 1, 6) == 6
        k = key(7)
        await store.claim_many([(k, "a@x")])
        assert [r.key for r in await store.pending(ACCOUNT)] == [k]
        assert [r.key for r in await store.find_by_message_id(ACCOUNT, "a@x")] == [k]
        await store.begin_handling(k)
        assert (await store.recover_interrupted(max_attempts=3)).retried == (k,)
        await store.begin_handling(k)
        assert (await store.release(k, "x", max_attempts=3)).status is MessageStatus.CLAIMED
        assert (await store.mark_rejected(k, "list-mail")).reason == "list-mail"
        k2 = key(8)
        await store.claim(k2, "b@x")
        assert (await store.mark_failed(k2, "boom")).status is MessageStatus.FAILED
        failed = await store.messages_with_status(MessageStatus.FAILED, account=ACCOUNT)
        assert [r.key for r in failed] == [k2]
        item = await store.enqueue(ACCOUNT, draft(1))
        assert await store.next_due_at() == item.next_attempt_at
        assert (await store.get_outbox_item(item.id)) == item
        retry = await store.mark_transient_failure(item.id, "421")
        assert retry.attempts == 1
        perm = await store.mark_permanent_failure(item.id, "550")
        assert await store.outbox_items(OutboxStatus.FAILED_PERMANENT) == [perm]
        back = await store.requeue(item.id)
        assert (await store.mark_sent(back.id)).status is OutboxStatus.SENT
        await store.remember_message_id(ACCOUNT, "z@x")
        assert await store.is_our_message_id("z@x")
        assert await store.our_message_ids_among(["z@x", "y@x"]) == {"<z@x>"}
        assert (await store.prune()).own_message_ids == 0
        assert await store.get_message(k2) is not None


# -- crash safety ------------------------------------------------------------------------

# A writer that runs the full life cycle as fast as it can and prints a line after
# each committed step. The test SIGKILLs it at random moments and checks that every
# printed (= committed) step is in the database and the invariants hold.
WRITER = r"""
import random, sys
from prxmail.state import *

state_dir, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
A = "bot@example.com@imap.example.com:993"
MAX_ATTEMPTS = 3

def out(*parts):
    print(*parts, flush=True)

def body(uid, attempt):
    return (f"reply to {uid} attempt {attempt} ".encode() * 50)

store = StateStore(state_dir, retry_policy=RetryPolicy(initial_delay=0.0, jitter=0.0,
                   max_attempts=4), rng=rng)
store.recover_interrupted(max_attempts=MAX_ATTEMPTS)
mb = store.sync_mailbox(A, "INBOX", 1)
out("OPEN", mb.last_uid)

def handle(key):
    rec = store.begin_handling(key)
    out("HANDLING", key.uid, rec.attempts)
    c = rng.random()
    if c < 0.15:
        return  # leave it in 'handling': the next kill/restart must deal with it
    if c < 0.6:
        d = OutboxDraft(f"r{key.uid}.{rec.attempts}@bot", "bot@example.com", ["u@x"],
                        body(key.uid, rec.attempts))
        store.record_reply(key, d)
        out("REPLIED", key.uid)
    elif c < 0.85:
        store.mark_handled(key)
        out("HANDLED", key.uid)
    else:
        store.mark_failed(key, "exit status 1")
        out("FAILED", key.uid)

uid = mb.last_uid
while True:
    for rec in store.pending(A, "INBOX"):
        handle(rec.key)
    uid += 1
    key = MessageKey(A, "INBOX", 1, uid)
    r = store.claim(key, f"m{uid}@x")
    out("CLAIMED", uid)
    if rng.random() < 0.1:
        store.mark_rejected(key, "bounce")
        out("REJECTED", uid)
    else:
        handle(key)
    for item in store.due_outbox(limit=3):
        if rng.random() < 0.7:
            store.mark_sent(item.id)
            out("SENT", item.id)
        else:
            store.mark_transient_failure(item.id, "421 busy")
            out("RETRY", item.id)
"""


def _check_invariants(state_dir: Path, committed: list[list[str]]) -> dict[str, int]:
    conn = sqlite3.connect(state_dir / DB_FILENAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        msgs = {
            row[0]: row[1:]
            for row in conn.execute("SELECT uid, status, attempts, message_id FROM message")
        }
        outbox = conn.execute(
            "SELECT id, parent_uid, status, raw, raw_size, message_id FROM outbox"
        ).fetchall()
        own = {r[0] for r in conn.execute("SELECT message_id FROM own_message_id")}
        last_uid = conn.execute("SELECT last_uid FROM mailbox").fetchone()[0]
    finally:
        conn.close()

    # Nothing lost: every UID up to the high-water mark has a record, none above it.
    assert set(msgs) == set(range(1, last_uid + 1))
    # Attempts are bounded; statuses valid.
    for uid, (status, attempts, mid) in msgs.items():
        assert status in {s.value for s in MessageStatus}
        assert attempts <= 3, (uid, attempts)
        assert mid == f"<m{uid}@x>"
    # Replies: exactly one outbox row per replied message and none for anything else;
    # rows are whole (queued ones carry exactly their bytes).
    parents = [row[1] for row in outbox]
    assert len(parents) == len(set(parents))
    assert {uid for uid, v in msgs.items() if v[0] == "replied"} == set(parents)
    for _id, parent_uid, status, raw, raw_size, message_id in outbox:
        assert message_id in own
        if status == "sent":
            assert raw == b""
        else:
            attempt = message_id.split(".")[1].split("@")[0]
            assert raw == f"reply to {parent_uid} attempt {attempt} ".encode() * 50
            assert len(raw) == raw_size
    # Durability: every step the writer saw committed is there.
    statuses = {uid: v[0] for uid, v in msgs.items()}
    sent_ids = {row[0] for row in outbox if row[2] == "sent"}
    for parts in committed:
        match parts:
            case ["CLAIMED", uid]:
                assert int(uid) in msgs
            case ["HANDLING", uid, attempts]:
                assert msgs[int(uid)][1] >= int(attempts)
            case ["REPLIED" | "HANDLED" | "FAILED" | "REJECTED" as what, uid]:
                assert statuses[int(uid)] == what.lower()
            case ["SENT", item_id]:
                assert int(item_id) in sent_ids
            case _:
                pass
    return {"messages": len(msgs), "outbox": len(outbox), "last_uid": last_uid}


@pytest.mark.timeout(120)
def test_sigkill_at_random_points_loses_nothing_and_answers_nothing_twice(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(20240607)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    kills = 0
    for round_no in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state_dir), str(round_no)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith(b"OPEN"), proc.stderr.read() if proc.stderr else first
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
        kills += 1
        # Only complete lines were committed-and-reported; a torn last line is ignored.
        lines = out.split(b"\n")[:-1]
        committed = [line.decode().split() for line in lines]
        counts = _check_invariants(state_dir, committed)
        assert counts["last_uid"] >= 1

    # After the last crash a normal start recovers: nothing left 'handling'.
    with StateStore(state_dir) as s:
        s.recover_interrupted(max_attempts=3)
        stats = s.statistics()
        assert stats.messages_by_status[MessageStatus.HANDLING] == 0
        assert stats.mailboxes[0].last_uid > 50  # the writer really made progress
    assert kills == 12
    _check_invariants(state_dir, [])


# -- model-based: random operation sequences against a plain-Python model ----------------


class StoreMachine(hypothesis.stateful.RuleBasedStateMachine):
    """Random sequences of operations, restarts included, checked against a model."""

    MAX_ATTEMPTS = 2

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="prxmail-state-"))
        self.clock = FakeClock()
        self.store = self._open()
        self.store.sync_mailbox(ACCOUNT, FOLDER, 1)
        self.status: dict[int, MessageStatus] = {}
        self.attempts: dict[int, int] = {}
        self.outbox: dict[int, str] = {}  # item id -> "queued" | "sent" | "failed_permanent"
        self.reply_of: dict[int, int] = {}  # uid -> item id
        self.transient: dict[int, int] = {}

    def _open(self) -> StateStore:
        policy = RetryPolicy(initial_delay=1.0, jitter=0.0, max_attempts=3)
        return StateStore(self.dir, clock=self.clock, retry_policy=policy, rng=random.Random(0))

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _try(self, allowed: bool, op: Callable[[], object]) -> bool:
        if allowed:
            op()
            return True
        with pytest.raises(LocalProtocolError):
            op()
        return False

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def claim(self, uid: int) -> None:
        result = self.store.claim(key(uid), f"m{uid}@x")
        if uid in self.status:
            assert result.outcome is ClaimOutcome.ALREADY_KNOWN
        else:
            assert result.outcome is ClaimOutcome.CLAIMED
            self.status[uid] = MessageStatus.CLAIMED
            self.attempts[uid] = 0

    def _move(self, uid: int, to: MessageStatus, op: Callable[[], object]) -> bool:
        current = self.status.get(uid)
        allowed = current is not None and to in TRANSITIONS[current]
        if current is None:
            with pytest.raises(LocalProtocolError):
                op()
            return False
        if self._try(allowed, op):
            self.status[uid] = to
            return True
        return False

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def begin(self, uid: int) -> None:
        if self._move(uid, MessageStatus.HANDLING, lambda: self.store.begin_handling(key(uid))):
            self.attempts[uid] += 1

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def handled(self, uid: int) -> None:
        self._move(uid, MessageStatus.HANDLED, lambda: self.store.mark_handled(key(uid)))

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def rejected(self, uid: int) -> None:
        self._move(uid, MessageStatus.REJECTED, lambda: self.store.mark_rejected(key(uid), "r"))

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def failed(self, uid: int) -> None:
        self._move(uid, MessageStatus.FAILED, lambda: self.store.mark_failed(key(uid), "f"))

    @hypothesis.stateful.rule(uid=st.integers(min_value=1, max_value=12))
    def reply(self, uid: int) -> None:
        items: list[int] = []

        def op() -> None:
            items.append(self.store.record_reply(key(uid), draft(uid)).id)

        if self._move(uid, MessageStatus.REPLIED, op):
            self.outbox[items[0]] = "queued"
            self.reply_of[uid] = items[0]
            self.transient[items[0]] = 0

    @hypothesis.stateful.rule(sent=st.booleans(), pick=st.integers(min_value=0, max_value=20))
    def send(self, sent: bool, pick: int) -> None:
        queued = sorted(i for i, s in self.outbox.items() if s == "queued")
        due = self.store.due_outbox(now=self.clock.now + 1e6)
        assert sorted(i.id for i in due) == queued
        if not queued:
            return
        item_id = queued[pick % len(queued)]
        if sent:
            self.store.mark_sent(item_id)
            self.outbox[item_id] = "sent"
        else:
            updated = self.store.mark_transient_failure(item_id, "421")
            self.transient[item_id] += 1
            expected = "failed_permanent" if self.transient[item_id] >= 3 else "queued"
            assert updated.status.value == expected
            self.outbox[item_id] = expected

    @hypothesis.stateful.rule()
    def restart(self) -> None:
        self.store.close()
        self.clock.now += 10
        self.store = self._open()
        report = self.store.recover_interrupted(max_attempts=self.MAX_ATTEMPTS)
        expect_failed, expect_retried = set(), set()
        for uid, status in self.status.items():
            if status is MessageStatus.HANDLING:
                if self.attempts[uid] >= self.MAX_ATTEMPTS:
                    self.status[uid] = MessageStatus.FAILED
                    expect_failed.add(key(uid))
                else:
                    self.status[uid] = MessageStatus.CLAIMED
                    expect_retried.add(key(uid))
        assert set(report.failed) == expect_failed
        assert set(report.retried) == expect_retried
        assert len(report.failed) + len(report.retried) == len(expect_failed | expect_retried)

    @hypothesis.stateful.invariant()
    def matches_model(self) -> None:
        for uid, status in self.status.items():
            rec = self.store.get_message(key(uid))
            assert rec is not None
            assert rec.status is status
            assert rec.attempts == self.attempts[uid]
        stats = self.store.statistics()
        assert stats.mailboxes[0].last_uid == max(self.status, default=0)
        assert sum(stats.messages_by_status.values()) == len(self.status)
        rows = self.store.outbox_items()
        assert {r.id: r.status.value for r in rows} == self.outbox
        parents = [r.parent.uid for r in rows if r.parent is not None]
        assert sorted(parents) == sorted(self.reply_of)
        replied = {u for u, s in self.status.items() if s is MessageStatus.REPLIED}
        assert replied == set(self.reply_of)


test_store_state_machine = StoreMachine.TestCase
test_store_state_machine.settings = hypothesis.settings(
    max_examples=40, stateful_step_count=25, deadline=None
)


async def test_async_store_closes_when_the_block_is_cancelled(tmp_path: Path) -> None:
    with trio.CancelScope() as scope:
        async with open_state_store(tmp_path) as store:
            await store.sync_mailbox(ACCOUNT, FOLDER, 1)
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught
    assert not [t for t in threading.enumerate() if t.name == "prxmail-state"]
    # Closed, not leaked: the directory lock is free again.
    with StateStore(tmp_path) as s:
        assert s.mailbox(ACCOUNT, FOLDER) is not None


async def test_async_store_gives_the_blocks_exception_back_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(KeyError) as info:
        async with open_state_store(tmp_path):
            raise KeyError("mine")
    assert info.value.args == ("mine",)
    assert info.value.__context__ is None


# -- the hand-over: one message's outcome and the next one's begin in one call ----------


def test_finish_and_begin_commits_the_outcome_and_the_next_begin_together(
    tmp_path: Path, statements: list[tuple[int, str, object]]
) -> None:
    with StateStore(tmp_path / "state") as s:
        s.sync_mailbox(ACCOUNT, FOLDER, 1)
        first, second, third = handling(s, 1), claimed(s, 2), claimed(s, 3)
        del statements[:]
        done, begun = s.finish_and_begin(first, MessageStatus.HANDLED, second)
        transactions = [sql for _, sql, _ in statements if sql.startswith(("BEGIN", "COMMIT"))]
        assert transactions == ["BEGIN IMMEDIATE", "COMMIT"]
        assert done.status is MessageStatus.HANDLED
        assert begun is not None
        assert (begun.status, begun.attempts) == (MessageStatus.HANDLING, 1)
        assert s.get_message(first) == done
        assert s.get_message(second) == begun

        failed, begun = s.finish_and_begin(
            second, MessageStatus.FAILED, third, reason="exit status 3"
        )
        assert (failed.status, failed.reason) == (MessageStatus.FAILED, "exit status 3")
        assert begun is not None
        assert begun.status is MessageStatus.HANDLING


def test_finish_and_begin_refuses_as_the_single_calls_do(synced: StateStore) -> None:
    first, second = handling(synced, 1), claimed(synced, 2)
    synced.mark_handled(first)
    # The finished message cannot be finished again: nothing changes, the next stays
    # claimed for whoever begins it.
    with pytest.raises(LocalProtocolError, match="cannot become handled"):
        synced.finish_and_begin(first, MessageStatus.HANDLED, second)
    assert synced.get_message(second).status is MessageStatus.CLAIMED  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="cannot make a message replied"):
        synced.finish_and_begin(first, MessageStatus.REPLIED, second)
    # A next message that cannot begin does not undo the outcome.
    third = handling(synced, 3)
    synced.begin_handling(second)
    done, begun = synced.finish_and_begin(third, MessageStatus.HANDLED, second)
    assert done.status is MessageStatus.HANDLED
    assert begun is None
    assert synced.get_message(second).attempts == 1  # type: ignore[union-attr]


# The channel's hand-over in a process that is SIGKILLed inside finish_and_begin (after
# the outcome's UPDATE, before the next begin and the COMMIT) or right after it returned.
HANDOVER = r"""
import os, signal, sys, time
from prxmail.state import *

state_dir, when = sys.argv[1], sys.argv[2]
A = "bot@example.com@imap.example.com:993"
armed = [False]
calls = [0]

def clock():
    if armed[0]:
        calls[0] += 1
        if calls[0] == 2:  # the second transition's timestamp: the next message's begin
            os.kill(os.getpid(), signal.SIGKILL)
    return time.time()

store = StateStore(state_dir, clock=clock)
store.sync_mailbox(A, "INBOX", 1)
first, second = MessageKey(A, "INBOX", 1, 1), MessageKey(A, "INBOX", 1, 2)
store.claim_many([(first, "m1@x"), (second, "m2@x")])
store.begin_handling(first)
armed[0] = when == "inside"
store.finish_and_begin(first, MessageStatus.HANDLED, second)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    ("when", "redelivered", "first_status"),
    [
        # Before the commit: neither change exists. The first message is handed out
        # again (its handler ran: at least once); the second was never handed out and
        # has no attempt counted.
        ("inside", [(1, 1), (2, 0)], MessageStatus.CLAIMED),
        # After it: the first is finished for good; the second was handed out (its
        # attempt counted) and is handed out again.
        ("after", [(2, 1)], MessageStatus.HANDLED),
    ],
)
def test_a_crash_in_the_hand_over_redelivers_only_what_was_not_finished(
    tmp_path: Path,
    when: str,
    redelivered: list[tuple[int, int]],
    first_status: MessageStatus,
) -> None:
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", HANDOVER, str(state_dir), when],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")
    with StateStore(state_dir) as s:
        s.recover_interrupted(max_attempts=3)
        pending = s.pending(ACCOUNT, FOLDER)
        assert [(r.key.uid, r.attempts) for r in pending] == redelivered
        assert s.get_message(key(1)).status is first_status  # type: ignore[union-attr]
