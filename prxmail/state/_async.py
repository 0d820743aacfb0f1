"""ADOC"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from prxmail.state._model import (
    ClaimBatch,
    ClaimResult,
    MailboxState,
    MessageKey,
    MessageRecord,
    MessageStatus,
    OutboxDraft,
    OutboxItem,
    OutboxStatus,
    PruneReport,
    RecoveryReport,
    RetryPolicy,
    StateStatistics,
)
from prxmail.state._store import StateStore

T = TypeVar("T")
# ---------------------------------------------------------------------------------
# The trio facade.


class _DedicatedThread:
    """One thread that runs submitted callables in order; the SQLite connection lives
    and dies on it. Pending calls are bounded by the number of tasks awaiting them."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        # Calls submitted and not yet seen finished by trio. Zero means the thread is
        # waiting for work and touches nothing (its last job returned before the
        # wake-up that let trio see it finished).
        self.outstanding = 0

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        # A cancelled caller starts no new work ...
        await trio.lowlevel.checkpoint_if_cancelled()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        results: list[T] = []
        errors: list[BaseException] = []

        def job() -> None:
            try:
                results.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        self._jobs.put(job)
        self.outstanding += 1
        # ... but once submitted, a call is waited for: a cancelled write must not leave
        # the caller guessing whether it committed. Calls are short (one transaction).
        try:
            with trio.CancelScope(shield=True):
                await done.wait()
        finally:
            self.outstanding -= 1
        if errors:
            raise errors[0]
        return results[0]

    async def stop(self) -> None:
        # The last job tells us the queue is drained; after it the thread only returns,
        # so the join below does not block the event loop for any real time.
        await self.run(lambda: None)
        self._jobs.put(None)
        self._thread.join()


class AsyncStateStore:
    """Trio access to the state store; every method runs on the store's own thread.

    Obtain one with :func:`open_state_store`. Methods have the same meaning,
    arguments and errors as those of :class:`StateStore`; see there. A call that has
    started is completed even if the caller is cancelled meanwhile (the cancellation
    then arrives at the caller's next checkpoint), so the caller never has to guess
    whether a write happened.
    """

    def __init__(self, worker: _DedicatedThread, store: StateStore) -> None:
        self._worker = worker
        self._store = store

    @property
    def state_dir(self) -> Path:
        """The directory holding the database."""
        return self._store.state_dir

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._worker.run(lambda: fn(*args, **kwargs))

    async def _call_quick(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A short call (no fsync, little data): on the trio thread when the worker is
        idle, else queued behind the worker's calls (order is kept either way)."""
        if self._worker.outstanding:
            return await self._call(fn, *args, **kwargs)
        await trio.lowlevel.checkpoint_if_cancelled()
        result = fn(*args, **kwargs)
        # Like a worker call, a call that ran is reported even if cancelled meanwhile;
        # the cancellation arrives at the caller's next checkpoint.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def sync_mailbox(self, account: str, folder: str, uidvalidity: int) -> MailboxState:
        """See :meth:`StateStore.sync_mailbox`."""
        return await self._call(self._store.sync_mailbox, account, folder, uidvalidity)

    async def mailbox(self, account: str, folder: str) -> MailboxState | None:
        """See :meth:`StateStore.mailbox`."""
        return await self._call_quick(self._store.mailbox, account, folder)

    async def mark_initialized(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> MailboxState:
        """See :meth:`StateStore.mark_initialized`."""
        return await self._call(
            self._store.mark_initialized, account, folder, uidvalidity, last_uid
        )

    async def advance_high_water_mark(
        self, account: str, folder: str, uidvalidity: int, uid: int
    ) -> int:
        """See :meth:`StateStore.advance_high_water_mark`."""
        return await self._call_quick(
            self._store.advance_high_water_mark, account, folder, uidvalidity, uid
        )

    async def get_message(self, key: MessageKey) -> MessageRecord | None:
        """See :meth:`StateStore.get_message`."""
        return await self._call_quick(self._store.get_message, key)

    async def find_by_message_id(self, account: str, message_id: str) -> list[MessageRecord]:
        """See :meth:`StateStore.find_by_message_id`."""
        return await self._call_quick(self._store.find_by_message_id, account, message_id)

    async def claim(self, key: MessageKey, message_id: str) -> ClaimResult:
        """See :meth:`StateStore.claim`."""
        return await self._call_quick(self._store.claim, key, message_id)

    async def claim_many(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
    ) -> list[ClaimResult]:
        """See :meth:`StateStore.claim_many`."""
        return await self._call(self._store.claim_many, list(items), failed=failed)

    async def begin_handling(self, key: MessageKey) -> MessageRecord:
        """See :meth:`StateStore.begin_handling`."""
        return await self._call_quick(self._store.begin_handling, key)

    async def mark_handled(self, key: MessageKey) -> MessageRecord:
        """See :meth:`StateStore.mark_handled`."""
        return await self._call_quick(self._store.mark_handled, key)

    async def mark_rejected(self, key: MessageKey, reason: str) -> MessageRecord:
        """See :meth:`StateStore.mark_rejected`."""
        return await self._call_quick(self._store.mark_rejected, key, reason)

    async def claim_batch(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
        message_ids: Iterable[str] = (),
    ) -> ClaimBatch:
        """See :meth:`StateStore.claim_batch`."""
        return await self._call(
            self._store.claim_batch, list(items), failed=failed, message_ids=list(message_ids)
        )

    async def record_verdicts(
        self,
        rejected: Iterable[tuple[MessageKey, str]],
        accepted: MessageKey | None = None,
    ) -> MessageRecord | None:
        """See :meth:`StateStore.record_verdicts`."""
        return await self._call_quick(self._store.record_verdicts, list(rejected), accepted)

    async def mark_failed(self, key: MessageKey, reason: str) -> MessageRecord:
        """See :meth:`StateStore.mark_failed`."""
        return await self._call_quick(self._store.mark_failed, key, reason)

    async def release(self, key: MessageKey, reason: str, *, max_attempts: int) -> MessageRecord:
        """See :meth:`StateStore.release`."""
        return await self._call_quick(self._store.release, key, reason, max_attempts=max_attempts)

    async def recover_interrupted(
        self, *, max_attempts: int, account: str | None = None
    ) -> RecoveryReport:
        """See :meth:`StateStore.recover_interrupted`."""
        return await self._call(
            self._store.recover_interrupted, max_attempts=max_attempts, account=account
        )

    async def pending(self, account: str, folder: str | None = None) -> list[MessageRecord]:
        """See :meth:`StateStore.pending`."""
        return await self._call(self._store.pending, account, folder)

    async def messages_with_status(
        self, status: MessageStatus, *, account: str | None = None, limit: int = 100
    ) -> list[MessageRecord]:
        """See :meth:`StateStore.messages_with_status`."""
        return await self._call(
            self._store.messages_with_status, status, account=account, limit=limit
        )

    async def record_reply(self, key: MessageKey, draft: OutboxDraft) -> OutboxItem:
        """See :meth:`StateStore.record_reply`."""
        return await self._call(self._store.record_reply, key, draft)

    async def enqueue(self, account: str, draft: OutboxDraft) -> OutboxItem:
        """See :meth:`StateStore.enqueue`."""
        return await self._call(self._store.enqueue, account, draft)

    async def due_outbox(self, *, limit: int = 100, now: float | None = None) -> list[OutboxItem]:
        """See :meth:`StateStore.due_outbox`."""
        return await self._call(self._store.due_outbox, limit=limit, now=now)

    async def next_due_at(self) -> float | None:
        """See :meth:`StateStore.next_due_at`."""
        return await self._call_quick(self._store.next_due_at)

    async def get_outbox_item(self, item_id: int) -> OutboxItem | None:
        """See :meth:`StateStore.get_outbox_item`."""
        return await self._call(self._store.get_outbox_item, item_id)

    async def outbox_items(self, status: OutboxStatus | None = None) -> list[OutboxItem]:
        """See :meth:`StateStore.outbox_items`."""
        return await self._call(self._store.outbox_items, status)

    async def mark_sent(self, item_id: int) -> OutboxItem:
        """See :meth:`StateStore.mark_sent`."""
        return await self._call(self._store.mark_sent, item_id)

    async def mark_sent_many(self, item_ids: Iterable[int]) -> None:
        """See :meth:`StateStore.mark_sent_many`."""
        await self._call(self._store.mark_sent_many, list(item_ids))

    async def mark_transient_failure(self, item_id: int, error: str) -> OutboxItem:
        """See :meth:`StateStore.mark_transient_failure`."""
        return await self._call(self._store.mark_transient_failure, item_id, error)

    async def mark_permanent_failure(self, item_id: int, error: str) -> OutboxItem:
        """See :meth:`StateStore.mark_permanent_failure`."""
        return await self._call(self._store.mark_permanent_failure, item_id, error)

    async def requeue(self, item_id: int) -> OutboxItem:
        """See :meth:`StateStore.requeue`."""
        return await self._call(self._store.requeue, item_id)

    async def is_our_message_id(self, message_id: str) -> bool:
        """See :meth:`StateStore.is_our_message_id`."""
        return await self._call_quick(self._store.is_our_message_id, message_id)

    async def our_message_ids_among(self, message_ids: Iterable[str]) -> frozenset[str]:
        """See :meth:`StateStore.our_message_ids_among`."""
        return await self._call_quick(self._store.our_message_ids_among, list(message_ids))

    async def remember_message_id(self, account: str, message_id: str) -> None:
        """See :meth:`StateStore.remember_message_id`."""
        await self._call(self._store.remember_message_id, account, message_id)

    async def prune(self) -> PruneReport:
        """See :meth:`StateStore.prune` (with the default limits)."""
        return await self._call(self._store.prune)

    async def statistics(self) -> StateStatistics:
        """See :meth:`StateStore.statistics`."""
        return await self._call(self._store.statistics)


@contextlib.asynccontextmanager
async def open_state_store(
    state_dir: str | os.PathLike[str],
    *,
    retry_policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    read_only: bool = False,
) -> AsyncIterator[AsyncStateStore]:
    """Open the state store for trio code; closed (and its thread ended) on exit.

    Args:
        state_dir: Directory holding the database; created with mode 0700 if missing.
        retry_policy: Backoff for outbox retries.
        rng: Random source for the backoff jitter.
        clock: Wall-clock time source.
        read_only: Open for inspection while another process may be using it (see
            :class:`StateStore`).

    Yields:
        An :class:`AsyncStateStore`.

    Raises:
        StateError: the directory is in use by another process, the database is from
            a newer prxmail, or it cannot be opened.
    """
    worker = _DedicatedThread(name="prxmail-state")
    try:
        store = await worker.run(
            lambda: StateStore(
                state_dir,
                retry_policy=retry_policy,
                rng=rng,
                clock=clock,
                read_only=read_only,
                # The facade's calls come from its worker or, for short ones when the
                # worker is idle, from the trio thread; never from both at once.
                check_same_thread=False,
            )
        )
        try:
            yield AsyncStateStore(worker, store)
        finally:
            with trio.CancelScope(shield=True):
                await worker.run(store.close)
    finally:
        # Even when the block was cancelled: an unstopped worker would be a thread left
        # waiting for work forever.
        with trio.CancelScope(shield=True):
            await worker.stop()
