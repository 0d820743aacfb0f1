"""The trio facade: every store call on a worker thread, one at a time, in call order.

Theory of operation
-------------------
SQLite calls block: a NORMAL commit is a WAL append (tens of microseconds, but up to
milliseconds when the disk is busy), a FULL commit an fsync (1-2 ms), a checkpoint
copies megabytes. None of that may run on the event loop, where it delays every other
task. So every call of :class:`AsyncStateStore` runs in ``trio.to_thread.run_sync``
under the store's own ``trio.CapacityLimiter(1)``: one call at a time, which is what a
single SQLite connection needs, and in the order the calls were made (they queue first
in, first out in ``_Worker``, and only the caller whose turn it is enters
``run_sync``). The connection is opened with ``check_same_thread=False`` because trio's
thread cache may run successive calls on different threads; the queue and the limiter,
not the thread identity, keep two threads off it at once.

A hop to a thread and back costs about as much as a short call, and far more while
another thread (a parse) holds the GIL; so calls that queue up while one hop runs are
taken together into the next (``_Worker``): each still its own transaction, in order,
with its own result. A catch-up's watcher and consumer thereby share hops.

A call that has started is completed even if its caller is cancelled meanwhile (the
cancellation arrives at the caller's next checkpoint): the caller never has to guess
whether a write happened. A caller cancelled before its call started (also while it
waits in the queue) starts nothing.

WAL checkpoints are ours, not SQLite's: the database layer turns the automatic
checkpoint off (it would land inside whichever commit crossed 1000 pages) and counts
committed writes; when enough have accumulated (``CHECKPOINT_EVERY_COMMITS``) the
facade's checkpointer task queues one PASSIVE checkpoint behind the calls already
waiting, so it runs on the worker between two calls and is never part of one.

The methods are not written out: each is ``name = _offload(StateStore.name)``, a
descriptor that gives the method of :class:`StateStore` with the same signature,
returning an awaitable (checked by mypy through ``ParamSpec``), so the facade cannot
drift from the store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import attrs
import trio

from prxmail.errors import StateError
from prxmail.state._model import RetryPolicy
from prxmail.state._store import StateStore

P = ParamSpec("P")
R = TypeVar("R")

#: The name store calls' threads carry while they run one (trio's cached threads take
#: it for the job's duration), so a thread still busy with the store can be found.
THREAD_NAME = "prxmail-state"


def _snapshot(value: object) -> object:
    """An argument as it is *now*: iterables the caller passed (lists, generators) are
    read on the trio thread, so another task changing them meanwhile, or a generator
    over trio-side state, cannot race the worker."""
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Iterable):
        return tuple(value)
    return value


class _offload(Generic[P, R]):
    """``name = _offload(StateStore.name)``: the async twin of a store method.

    On an :class:`AsyncStateStore` instance it is a coroutine function with the same
    parameters as the store method, running it on the store's worker.
    """

    def __init__(self, method: Callable[Concatenate[StateStore, P], R]) -> None:
        self._method = method
        self.__doc__ = f"See :meth:`StateStore.{method.__name__}`."
        self.__name__ = method.__name__

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> _offload[P, R]: ...

    @overload
    def __get__(self, instance: AsyncStateStore, owner: type[Any]) -> Callable[P, Awaitable[R]]: ...

    def __get__(
        self, instance: AsyncStateStore | None, owner: type[Any]
    ) -> _offload[P, R] | Callable[P, Awaitable[R]]:
        if instance is None:
            return self
        method, store = self._method, instance._store

        @functools.wraps(method)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            # Any: a snapshot has the type the parameter accepts (an Iterable parameter
            # gets a tuple), which mypy cannot follow through P.
            frozen_args: Any = [_snapshot(a) for a in args]
            frozen_kwargs: Any = {k: _snapshot(v) for k, v in kwargs.items()}
            return await instance._run(
                functools.partial(method, store, *frozen_args, **frozen_kwargs)
            )

        # Built once per store: the instance attribute now hides this (non-data)
        # descriptor, so later calls skip building the wrapper.
        instance.__dict__[self.__name__] = call
        return call


class AsyncStateStore:
    """Trio access to the state store; every call runs on a worker thread.

    Obtain one with :func:`open_state_store`. Methods have the same meaning,
    arguments and errors as those of :class:`StateStore`; see there. A call that has
    started is completed even if the caller is cancelled meanwhile (the cancellation
    then arrives at the caller's next checkpoint), so the caller never has to guess
    whether a write happened.
    """

    def __init__(self, store: StateStore, worker: _Worker) -> None:
        self._store = store
        self._worker = worker
        self._checkpoint_due = trio.Event()

    @property
    def state_dir(self) -> Path:
        """The directory holding the database."""
        return self._store.state_dir

    async def _run(self, fn: Callable[[], R]) -> R:
        result = await self._worker.run(fn)
        if self._store.checkpoint_due:
            self._checkpoint_due.set()
        return result

    async def _checkpointer(self) -> None:
        # Queued behind the calls waiting at that moment (the queue is FIFO), so the
        # checkpoint runs between two calls, never inside one.
        while True:
            await self._checkpoint_due.wait()
            await self._worker.run(self._store.checkpoint)
            # Only now: calls finishing while this one waited its turn set the same
            # event again, and must not queue a second checkpoint.
            self._checkpoint_due = trio.Event()

    sync_mailbox = _offload(StateStore.sync_mailbox)
    mailbox = _offload(StateStore.mailbox)
    mark_initialized = _offload(StateStore.mark_initialized)
    advance_high_water_mark = _offload(StateStore.advance_high_water_mark)
    get_message = _offload(StateStore.get_message)
    find_by_message_id = _offload(StateStore.find_by_message_id)
    claim = _offload(StateStore.claim)
    claim_many = _offload(StateStore.claim_many)
    begin_handling = _offload(StateStore.begin_handling)
    mark_handled = _offload(StateStore.mark_handled)
    finish_and_begin = _offload(StateStore.finish_and_begin)
    mark_rejected = _offload(StateStore.mark_rejected)
    claim_batch = _offload(StateStore.claim_batch)
    record_verdicts = _offload(StateStore.record_verdicts)
    mark_failed = _offload(StateStore.mark_failed)
    release = _offload(StateStore.release)
    recover_interrupted = _offload(StateStore.recover_interrupted)
    pending = _offload(StateStore.pending)
    messages_with_status = _offload(StateStore.messages_with_status)
    record_reply = _offload(StateStore.record_reply)
    enqueue = _offload(StateStore.enqueue)
    due_outbox = _offload(StateStore.due_outbox)
    next_due_at = _offload(StateStore.next_due_at)
    get_outbox_item = _offload(StateStore.get_outbox_item)
    outbox_items = _offload(StateStore.outbox_items)
    mark_sent = _offload(StateStore.mark_sent)
    mark_sent_many = _offload(StateStore.mark_sent_many)
    mark_transient_failure = _offload(StateStore.mark_transient_failure)
    mark_permanent_failure = _offload(StateStore.mark_permanent_failure)
    requeue = _offload(StateStore.requeue)
    is_our_message_id = _offload(StateStore.is_our_message_id)
    our_message_ids_among = _offload(StateStore.our_message_ids_among)
    remember_message_id = _offload(StateStore.remember_message_id)
    prune = _offload(StateStore.prune)
    statistics = _offload(StateStore.statistics)
    thread_ids_among = _offload(StateStore.thread_ids_among)
    thread_history = _offload(StateStore.thread_history)
    thread_activity = _offload(StateStore.thread_activity)
    thread_activities = _offload(StateStore.thread_activities)
    thread_of = _offload(StateStore.thread_of)
    rate_limiter_state = _offload(StateStore.rate_limiter_state)
    record_admission = _offload(StateStore.record_admission)
    wake_deferred = _offload(StateStore.wake_deferred)
    next_deferred_at = _offload(StateStore.next_deferred_at)
    parked_messages = _offload(StateStore.parked_messages)
    release_thread = _offload(StateStore.release_thread)
    record_reply_in_thread = _offload(StateStore.record_reply_in_thread)
    enqueue_in_thread = _offload(StateStore.enqueue_in_thread)
    prune_conversations = _offload(StateStore.prune_conversations)
    write_heartbeat = _offload(StateStore.write_heartbeat)
    operator_generation = _offload(StateStore.operator_generation)
    account_summary = _offload(StateStore.account_summary)


def _run_batch(batch: list[_Job]) -> None:
    for job in batch:
        try:
            job.result = job.fn()
        except BaseException as exc:
            job.error = exc
        job.done = True


@attrs.define(eq=False)
class _Job:
    fn: Callable[[], Any]
    # Set on the worker; read by the caller after the hop that ran the job returned.
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    #: Taken into a batch: it will run (or ran) and must be waited for.
    taken: bool = False
    #: Set when the job is done, or when its caller is to lead the next batch.
    wake: trio.Event = attrs.field(factory=trio.Event)


class _Worker:
    """Runs store calls in ``trio.to_thread.run_sync`` under the store's limiter, in
    call order; calls that queue up while a hop runs share the next hop.

    One hop (two thread wake-ups) costs about as much as a short call itself, and
    while another thread holds the GIL -- the parse thread during a catch-up -- far
    more. So the caller whose turn it is (the *leader*) takes every call queued at that
    moment into one ``run_sync``; each still runs as its own transaction, in order, and
    gets its own result or exception. The leader then wakes the next queued caller to
    lead the next batch. The batch is bounded by the number of tasks awaiting a call.
    """

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._queued: list[_Job] = []
        self._busy = False

    async def run(self, fn: Callable[[], R]) -> R:
        # A cancelled caller starts no new work ...
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn)
        self._queued.append(job)
        if self._busy:
            try:
                await job.wake.wait()
            except trio.Cancelled:
                if not job.taken:
                    # Still queued: nothing was done, so the cancellation may win.
                    self._queued.remove(job)
                    if job.wake.is_set():  # it had just been handed the lead
                        self._hand_on()
                    raise
                # ... but a call that has started is waited for: a cancelled write
                # must not leave the caller guessing whether it committed. The
                # cancellation arrives at the caller's next checkpoint.
                with trio.CancelScope(shield=True):
                    await job.wake.wait()
        else:
            self._busy = True
            # Let the tasks that are ready to run make their calls first, so they share
            # this hop: in a catch-up the watcher's begin_handling and the consumer's
            # mark_handled become ready in the same scheduler pass.
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not job.done:
            # Our turn: run everything queued so far. Shielded, because the callers in
            # the batch wait for it.
            with trio.CancelScope(shield=True):
                batch, self._queued = self._queued, []
                for queued in batch:
                    queued.taken = True
                try:
                    await trio.to_thread.run_sync(
                        _run_batch,
                        batch,
                        limiter=self._limiter,
                        abandon_on_cancel=False,
                        thread_name=THREAD_NAME,
                    )
                finally:
                    for queued in batch:
                        if not queued.done:  # the hop itself failed (trio shutting down)
                            queued.error = StateError("the state store's worker did not run")
                            queued.done = True
                        if queued is not job:
                            queued.wake.set()
                    self._hand_on()
        if job.error is not None:
            error, job.error = job.error, None  # no reference cycle through the frame
            raise error
        result: R = job.result
        return result

    def _hand_on(self) -> None:
        if self._queued:
            self._queued[0].wake.set()
        else:
            self._busy = False


@contextlib.asynccontextmanager
async def open_state_store(
    state_dir: str | os.PathLike[str],
    *,
    retry_policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    read_only: bool = False,
) -> AsyncIterator[AsyncStateStore]:
    """Open the state store for trio code; closed on exit, also when cancelled.

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
    worker = _Worker(trio.CapacityLimiter(1))
    store = await worker.run(
        functools.partial(
            StateStore,
            state_dir,
            retry_policy=retry_policy,
            rng=rng,
            clock=clock,
            read_only=read_only,
            # trio's thread cache may run successive calls on different threads; the
            # limiter keeps them from using the connection at the same time.
            check_same_thread=False,
        ),
    )
    facade = AsyncStateStore(store, worker)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(facade._checkpointer)
            try:
                yield facade
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The checkpointer ends only by cancellation, which its nursery absorbs; what is
        # left is the block's own exception, given back as it was raised (callers never
        # see an ExceptionGroup from here).
        exc = _sole_exception(group)
        context, cause, suppress = exc.__context__, exc.__cause__, exc.__suppress_context__
        try:
            raise exc
        finally:
            exc.__context__, exc.__cause__ = context, cause
            exc.__suppress_context__ = suppress
    finally:
        # Even when the block was cancelled: the connection and the directory lock
        # must not outlive it.
        with trio.CancelScope(shield=True):
            await worker.run(store.close)


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
        group = group.exceptions[0]
    return group.exceptions[0] if len(group.exceptions) == 1 else group
