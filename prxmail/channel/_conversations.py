"""Admission of claimed mail: policy, thread identity, loop guard, rate limit.

Theory of operation: after a fetched group is claimed, every message the claim
left ``claimed`` goes through four steps, and only the first can refuse it:

1. the sender policy and the RFC 3834 / bounce / own-mail guards
   (:func:`prxmail.policy.evaluate`, without its rate limiter): a refusal is
   ``rejected`` with the reason, as before;
2. its ``thread_id`` (:func:`prxmail.conversation.message_thread_id`), from the
   ids the store already knows, fetched for the whole group in one query; the
   message is recorded in its thread (``thread_message``);
3. the per-thread loop guard (:class:`prxmail.conversation.LoopGuard` over the
   thread's :class:`~prxmail.conversation.ThreadActivity`): *hold* parks the
   message ``held`` and logs a WARNING naming the thread and why; *defer* parks it
   ``deferred`` until the guard's time;
4. the per-sender token bucket (:class:`prxmail.conversation.SenderRateLimiter`):
   over the limit the message is ``deferred`` until a token is back.

Nothing over a limit is finished: parked messages stay unseen on the server, and
their status, the threads' evidence and the buckets are written in the same
transaction as the verdicts (:meth:`~prxmail.state.StateStore.record_admission`),
so all of it survives a restart. The watcher wakes at the earliest due time
(:meth:`_Conversations._wake_due`) and the woken messages are admitted afresh
through the ordinary pending path. A held thread comes back only through
:meth:`_Conversations.release_thread` (or the store's method of that name).

The channel is the only writer of the loop evidence and the buckets (the state
directory's lock keeps other processes out), so both live in memory and are
persisted with every change; the evidence of at most :data:`MAX_CACHED_THREADS`
threads is cached, the rest read from the store when a thread is met again.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from prxmail._log import log_event
from prxmail.channel._core import _ChannelCore, _message_fields
from prxmail.config import Config
from prxmail.conversation import (
    Defer,
    Hold,
    LoopGuard,
    SenderRateLimiter,
    ThreadActivity,
    message_thread_id,
    thread_id_from_root,
    thread_lookup_ids,
)
from prxmail.message import Message
from prxmail.policy import evaluate
from prxmail.state import (
    AsyncStateStore,
    Direction,
    MessageKey,
    ThreadEntry,
    normalize_message_id,
)

# Threads whose loop evidence is kept in memory (a few hundred bytes each): far more
# than the conversations one mailbox has going at a time; a thread met again after
# falling out is read back from the store, so the bound costs a query, never a rule.
MAX_CACHED_THREADS: Final = 10_000


def _date(message: Message) -> str | None:
    return message.date.isoformat() if message.date is not None else None


def thread_payload(entries: Sequence[ThreadEntry]) -> list[dict[str, object]]:
    """Thread entries as the handler's JSON ``thread`` (and :meth:`MailChannel.thread`).

    Args:
        entries: From :meth:`~prxmail.state.StateStore.thread_history`, oldest first.

    Returns:
        One dict per entry: ``message_id``, ``direction`` (``"in"``/``"out"``),
        ``date`` (ISO 8601 or null), ``from``, ``subject`` and ``text`` (null when
        not kept: received mail without ``thread_keep_incoming_text``).
    """
    return [
        {
            "message_id": entry.message_id,
            "direction": entry.direction.value,
            "date": entry.date,
            "from": entry.sender,
            "subject": entry.subject,
            "text": entry.text,
        }
        for entry in entries
    ]


class _Conversations(_ChannelCore):
    """The admission steps and the conversation API of a channel (see the module comment)."""

    def __init__(
        self,
        config: Config,
        store: AsyncStateStore,
        *,
        rng: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(config, store, rng=rng)
        # Wall clock: due times and the evidence are persisted (the store's clock too).
        self._clock = clock
        self._loop_guard = LoopGuard(
            clock=clock,
            fast_answer_secs=config.loop_fast_answer_secs,
            slow_down_secs=config.loop_slow_down_secs,
        )
        self._limiter = SenderRateLimiter(
            config.reply_rate_limit,
            float(config.reply_rate_window_secs),
            burst=config.reply_rate_burst,
            clock=clock,
        )
        self._activities: collections.OrderedDict[str, ThreadActivity] = collections.OrderedDict()
        #: When the earliest deferred message of the folder is due (wall clock).
        self._deferred_due: float | None = None

    async def _load_conversation_state(self) -> None:
        """Read the rate limiter's buckets back from the store (once, at start)."""
        state = await self._store.rate_limiter_state(self.account)
        if state is None:
            return
        try:
            self._limiter.load_state(state, wall_clock=self._clock)
        except ValueError as exc:
            log_event(logging.WARNING, "stored rate-limit state ignored", error=str(exc))

    def _remember(self, thread_id: str, activity: ThreadActivity) -> None:
        self._activities[thread_id] = activity
        self._activities.move_to_end(thread_id)
        while len(self._activities) > MAX_CACHED_THREADS:
            self._activities.popitem(last=False)

    async def _activities_of(self, thread_ids: Sequence[str]) -> dict[str, ThreadActivity]:
        missing = [t for t in dict.fromkeys(thread_ids) if t not in self._activities]
        stored = await self._store.thread_activities(self.account, missing) if missing else {}
        for thread_id in missing:
            activity = ThreadActivity()
            if thread_id in stored:
                try:
                    activity = ThreadActivity.from_state(stored[thread_id])
                except ValueError as exc:
                    log_event(
                        logging.WARNING,
                        "stored thread state ignored",
                        thread_id=thread_id,
                        error=str(exc),
                    )
            self._remember(thread_id, activity)
        return {t: self._activities[t] for t in thread_ids}

    def _entry(self, message: Message, thread_id: str) -> ThreadEntry:
        return ThreadEntry(
            message_id=message.message_id,
            thread_id=thread_id,
            direction=Direction.IN,
            date=_date(message),
            sender=message.from_.addr,
            subject=message.subject,
            text=message.text if self.config.thread_keep_incoming_text else None,
        )

    async def _admit_candidates(
        self,
        candidates: Sequence[tuple[MessageKey, Message]],
        is_ours: Callable[[str], bool],
    ) -> list[tuple[MessageKey, Message]]:
        """Decide on claimed messages and record every verdict in one transaction.

        Returns:
            The accepted messages (with ``thread_id``), the first already
            ``handling``, in order.
        """
        rejected: list[tuple[MessageKey, str]] = []
        admissible: list[tuple[MessageKey, Message]] = []
        for key, message in candidates:
            verdict = evaluate(message, self._policy, is_our_message_id=is_ours)
            if verdict.accepted:
                admissible.append((key, message))
                continue
            rejected.append((key, verdict.reason))
            log_event(
                logging.INFO,
                "message rejected",
                **_message_fields(message),
                reason=verdict.reason,
                detail=verdict.detail or None,
            )
        lookups = [ident for _, m in admissible for ident in thread_lookup_ids(m)]
        known = await self._store.thread_ids_among(self.account, lookups) if lookups else {}
        threaded: list[tuple[MessageKey, Message]] = []
        for key, message in admissible:
            thread_id = message_thread_id(message, known=known.get)
            # A later message of the same group may answer this one.
            known[normalize_message_id(message.message_id)] = thread_id
            threaded.append((key, attrs.evolve(message, thread_id=thread_id)))
        activities = await self._activities_of([m.thread_id for _, m in threaded])
        deferred: list[tuple[MessageKey, float, str]] = []
        held: list[tuple[MessageKey, str]] = []
        accepted: list[tuple[MessageKey, Message]] = []
        changed: dict[str, dict[str, Any]] = {}
        limiter_used = False
        for key, message in threaded:
            thread_id = message.thread_id
            decision, activity = self._loop_guard.check(activities[thread_id])
            activities[thread_id] = activity
            self._remember(thread_id, activity)
            changed[thread_id] = activity.to_state()
            fields = {**_message_fields(message), "thread_id": thread_id}
            if isinstance(decision, Hold):
                held.append((key, decision.reason))
                log_event(
                    logging.WARNING,
                    "thread held: kept unanswered until an operator releases it",
                    **fields,
                    reason=decision.reason,
                )
                continue
            if isinstance(decision, Defer):
                deferred.append((key, decision.until, decision.reason))
                log_event(
                    logging.INFO,
                    "message deferred (loop guard)",
                    **fields,
                    due_in=round(decision.until - self._clock(), 1),
                    reason=decision.reason,
                )
                continue
            limiter_used = True
            retry_at = self._limiter.admit(message.from_.addr)
            if retry_at is not None:
                reason = (
                    f"rate-limited: over {self._limiter.burst} at once or "
                    f"{self.config.reply_rate_limit} per {self.config.reply_rate_window_secs} s"
                )
                deferred.append((key, retry_at, reason))
                log_event(
                    logging.INFO,
                    "message deferred (rate limit)",
                    **fields,
                    due_in=round(retry_at - self._clock(), 1),
                )
                continue
            accepted.append((key, message))
        for _, due_at, _ in deferred:
            if self._deferred_due is None or due_at < self._deferred_due:
                self._deferred_due = due_at
        try:
            await self._store.record_admission(
                self.account,
                rejected=rejected,
                deferred=deferred,
                held=held,
                accepted=accepted[0][0] if accepted else None,
                entries=[self._entry(m, m.thread_id) for _, m in threaded],
                threads=changed,
                limiter_state=self._limiter.to_state(wall_clock=self._clock)
                if limiter_used
                else None,
            )
        except BaseException:
            self._pending_dirty = True
            raise
        self._counts["rejected"] += len(rejected)
        self._counts["deferred"] += len(deferred)
        self._counts["held"] += len(held)
        return accepted

    async def _sync_deferred(self) -> None:
        """Learn when the folder's next deferred message is due (once per session)."""
        self._deferred_due = await self._store.next_deferred_at(self.account, self.folder)
        await self._wake_due()

    async def _wake_due(self) -> None:
        """Put deferred messages that are due back in line (the pending path admits them)."""
        if self._deferred_due is None or self._deferred_due > self._clock():
            return
        woken, self._deferred_due = await self._store.wake_deferred(
            self.account, self.folder, now=self._clock()
        )
        if woken:
            self._pending_dirty = True
            log_event(logging.INFO, "deferred messages are due", count=woken)

    def _deferred_wait(self, window: float) -> float:
        """``window`` cut short so the watcher is back when a deferred message is due."""
        if self._deferred_due is None:
            return window
        return max(min(window, self._deferred_due - self._clock()), 0.0)

    # -- the consumer's side -----------------------------------------------------------

    async def thread(self, message: Message) -> list[dict[str, object]]:
        """The earlier messages of ``message``'s thread that this channel saw or sent.

        Args:
            message: A message received from this channel.

        Returns:
            At most :data:`~prxmail.state.MAX_THREAD_HISTORY` entries, oldest first,
            as in the handler's JSON ``thread`` (see :func:`thread_payload`).
        """
        thread_id = message.thread_id or message_thread_id(message)
        entries = await self._store.thread_history(
            self.account, thread_id, exclude=message.message_id
        )
        return thread_payload(entries)

    async def release_thread(self, thread_id: str) -> int:
        """An operator's release of a held thread: its held messages are handed on again.

        The thread's loop evidence starts afresh (a loop that resumes is held again by
        the same rule).

        Args:
            thread_id: The thread, as the hold WARNING logged it.

        Returns:
            How many messages were released.
        """
        released = await self._store.release_thread(self.account, thread_id)
        self._activities.pop(thread_id, None)
        if released:
            self._pending_dirty = True
            if self._wake_scope is not None:
                self._wake_scope.cancel()
            log_event(logging.INFO, "thread released", thread_id=thread_id, count=released)
        return released

    def _noted_reply(self, thread_id: str) -> dict[str, Any]:
        activity = self._loop_guard.note_reply(self._activities.get(thread_id, ThreadActivity()))
        self._remember(thread_id, activity)
        return activity.to_state()

    def _outgoing_entry(
        self, message_id: str, thread_id: str, subject: str, body: str
    ) -> ThreadEntry:
        return ThreadEntry(
            message_id=message_id,
            thread_id=thread_id,
            direction=Direction.OUT,
            date=None,
            sender=self.config.from_address,
            subject=subject,
            text=body,
        )

    @staticmethod
    def _new_thread(message_id: str) -> str:
        return thread_id_from_root(message_id)
