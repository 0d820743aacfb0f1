"""Loop detection per thread: two automatons answering each other are held.

Theory of operation. The RFC 3834 guards (:func:`prxmail.policy.loop_guard_reason`)
stop every automaton that says what it is. This module stops the ones that do not:
a bot that answers each of our replies, instantly, without Auto-Submitted. It
looks at one thread at a time (``thread_id``, see :mod:`._thread`), so a held
thread never affects the sender's other threads, and it never drops anything: its
decision is :class:`Proceed`, :class:`Defer` (hand the message on later) or
:class:`Hold` (keep it until an operator releases the thread).

The evidence is kept in a :class:`ThreadActivity` per thread, plain data the state
store persists (:meth:`ThreadActivity.to_state`):

* how many replies we sent in the thread, and when (the last
  :data:`MAX_REPLIES_PER_WINDOW`);
* for each incoming message that answered one of our replies, how long after our
  reply it arrived (the answer delay).

People are slow: between our reply being sent and their answer arriving there is
delivery to their mailbox, their client noticing it, reading, typing and sending.
Under :data:`FAST_ANSWER_SECS` that is what a program does. The rule, checked in
this order whenever a message of the thread is about to be handed on:

1. A held thread stays held (until :meth:`LoopGuard.release`).
2. **Hold** when :data:`FAST_STREAK_TO_HOLD` answers in a row each came within
   :data:`FAST_ANSWER_SECS` of our reply: strong evidence, about 8 rounds of an
   instant ping-pong.
3. **Hold** when we already sent :data:`MAX_REPLIES_PER_WINDOW` (50) replies in
   the thread within :data:`REPLY_WINDOW_SECS` (24 h): the cap for an automaton
   that waits just long enough to look human. A person who keeps one thread going
   for 50 rounds in a day is rarer than such a bot, and loses nothing: the thread
   is held (logged at WARNING) for an operator, not dropped.
4. **Defer** until :data:`SLOW_DOWN_SECS` after our last reply when the last
   :data:`FAST_STREAK_TO_SLOW` answers were each fast: a suspected loop then costs
   one reply per 30 s instead of one per round trip, while the evidence for rule 2
   builds up; a person never answers that fast that often, and if one did, the
   cost is a 30 s wait.
5. Otherwise **proceed**.

A person answering each reply for 25 rounds within an hour (about 2.4 minutes a
round) matches none of these: answers take far longer than 15 s, and 25 < 50.

Times are seconds of an injected clock. The state is persisted, so the clock
must be a wall clock (the default, :func:`time.time`); a clock that goes back
only makes delays look longer (never a hold by itself) and reply times older.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import attrs

__all__ = [
    "FAST_ANSWER_SECS",
    "FAST_STREAK_TO_HOLD",
    "FAST_STREAK_TO_SLOW",
    "MAX_REPLIES_PER_WINDOW",
    "REPLY_WINDOW_SECS",
    "SLOW_DOWN_SECS",
    "Defer",
    "Hold",
    "LoopDecision",
    "LoopGuard",
    "Proceed",
    "ThreadActivity",
]

# An answer arriving within this many seconds of our reply counts as machine-fast.
# Loopback delivery plus two IDLE pushes plus an instant handler is 1-3 s; a real
# MTA hop a few more. A person needs to notice, read and type: well over 15 s,
# even for "ok".
FAST_ANSWER_SECS: Final = 15.0

# Fast answers in a row that hold the thread. One or two quick "thanks!" happen;
# eight in a row, each within 15 s of our reply, is a program.
FAST_STREAK_TO_HOLD: Final = 8

# Fast answers in a row after which the thread is slowed down (rule 4).
FAST_STREAK_TO_SLOW: Final = 3

# The slowed-down pace: at most one reply per this many seconds in a suspected
# loop, so the rule-2 evidence costs minutes, not a burst of mail.
SLOW_DOWN_SECS: Final = 30.0

# Our replies per thread within REPLY_WINDOW_SECS that hold the thread: issue 12
# requires a loop to stop after at most 50 of our replies, and a person's long
# thread (25 rounds in an hour is the case to serve) stays well below it.
MAX_REPLIES_PER_WINDOW: Final = 50

# The window of that cap: a day, so an automaton answering every few minutes is
# caught as well as an instant one (50 rounds at 20 minutes each is 17 hours).
REPLY_WINDOW_SECS: Final = 24 * 3600.0

# Answer delays remembered per thread, for the hold reason and for doctor; the
# decision itself only needs the streak.
_RECENT_DELAYS: Final = 10

_STATE_VERSION: Final = 1


@attrs.frozen
class Proceed:
    """Hand the message on now."""


@attrs.frozen
class Defer:
    """Keep the message and hand it on at ``until`` (clock seconds).

    Attributes:
        until: When to decide again.
        reason: Why, for the log.
    """

    until: float
    reason: str


@attrs.frozen
class Hold:
    """Keep the message until an operator releases the thread.

    Attributes:
        reason: Why, for the WARNING log line and doctor.
    """

    reason: str


LoopDecision: TypeAlias = Proceed | Defer | Hold


def _malformed(detail: str) -> ValueError:
    # Malformed persisted state is a value problem of the whole record, whatever
    # field's type is off: one exception type for the store to catch.
    return ValueError(f"malformed thread activity: {detail}")


def _count(state: Mapping[str, Any], name: str) -> int:
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _malformed(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _floats(values: object, limit: int) -> tuple[float, ...]:
    if not isinstance(values, list | tuple):
        raise _malformed("expected a list of numbers")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _malformed(f"expected a number, got {value!r}")
        out.append(float(value))
    return tuple(out[-limit:])


@attrs.frozen
class ThreadActivity:
    """What one thread has shown so far; immutable, updated by :class:`LoopGuard`.

    Attributes:
        replies: Our replies in the thread, ever.
        reply_times: When the last (at most :data:`MAX_REPLIES_PER_WINDOW`) were
            sent, oldest first.
        awaiting_answer: True after our reply until the next incoming message of
            the thread (only that one is an answer whose delay counts).
        fast_streak: Answers in a row that came within :data:`FAST_ANSWER_SECS`.
        answer_delays: The last few answer delays, seconds, oldest first.
        held: The hold reason while the thread is held, else None.
    """

    replies: int = 0
    reply_times: tuple[float, ...] = ()
    awaiting_answer: bool = False
    fast_streak: int = 0
    answer_delays: tuple[float, ...] = ()
    held: str | None = None

    def to_state(self) -> dict[str, Any]:
        """This record as JSON-serialisable plain data (for the state store).

        Returns:
            A dict of numbers, lists, booleans and strings.
        """
        return {
            "v": _STATE_VERSION,
            "replies": self.replies,
            "reply_times": list(self.reply_times),
            "awaiting_answer": self.awaiting_answer,
            "fast_streak": self.fast_streak,
            "answer_delays": list(self.answer_delays),
            "held": self.held,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ThreadActivity:
        """Rebuild a record from :meth:`to_state` output.

        Args:
            state: The plain data.

        Returns:
            The record; lists are cut to their bounds.

        Raises:
            ValueError: The data is not such a record (wrong version, types).
        """
        if state.get("v") != _STATE_VERSION:
            raise _malformed(f"unknown version {state.get('v')!r}")
        held, awaiting = state.get("held"), state.get("awaiting_answer")
        if held is not None and not isinstance(held, str):
            raise _malformed("held must be a string or null")
        if not isinstance(awaiting, bool):
            raise _malformed("awaiting_answer must be a boolean")
        return cls(
            replies=_count(state, "replies"),
            reply_times=_floats(state.get("reply_times"), MAX_REPLIES_PER_WINDOW),
            awaiting_answer=awaiting,
            fast_streak=_count(state, "fast_streak"),
            answer_delays=_floats(state.get("answer_delays"), _RECENT_DELAYS),
            held=held,
        )


class LoopGuard:
    """The per-thread loop rule (see the module documentation), over an injected clock.

    Stateless itself: every method takes a :class:`ThreadActivity` and returns
    the decision or the updated record, which the caller stores per thread.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        fast_answer_secs: float = FAST_ANSWER_SECS,
        slow_down_secs: float = SLOW_DOWN_SECS,
    ) -> None:
        """Create the guard.

        Args:
            clock: Wall-clock seconds (the records are persisted); inject a fake
                in tests.
            fast_answer_secs: Replaces :data:`FAST_ANSWER_SECS` (configuration,
                tests with a fast "person").
            slow_down_secs: Replaces :data:`SLOW_DOWN_SECS`.
        """
        self._clock = clock
        self._fast_answer_secs = float(fast_answer_secs)
        self._slow_down_secs = float(slow_down_secs)

    def note_incoming(self, activity: ThreadActivity) -> ThreadActivity:
        """Record an incoming message of the thread (call once per message, on arrival).

        Args:
            activity: The thread's record.

        Returns:
            The updated record: when it is the first message since our last reply,
            its delay is recorded and the fast streak updated.
        """
        if not activity.awaiting_answer or not activity.reply_times:
            return activity
        delay = max(self._clock() - activity.reply_times[-1], 0.0)
        fast = delay <= self._fast_answer_secs
        return attrs.evolve(
            activity,
            awaiting_answer=False,
            fast_streak=activity.fast_streak + 1 if fast else 0,
            answer_delays=(*activity.answer_delays, delay)[-_RECENT_DELAYS:],
        )

    def note_reply(self, activity: ThreadActivity) -> ThreadActivity:
        """Record that we sent (or queued) a reply in the thread.

        Args:
            activity: The thread's record.

        Returns:
            The updated record.
        """
        return attrs.evolve(
            activity,
            replies=activity.replies + 1,
            reply_times=(*activity.reply_times, self._clock())[-MAX_REPLIES_PER_WINDOW:],
            awaiting_answer=True,
        )

    def decide(self, activity: ThreadActivity) -> LoopDecision:
        """Whether a message of the thread may be handed on (and so answered) now.

        Args:
            activity: The thread's record, with the message already noted by
                :meth:`note_incoming`.

        Returns:
            :class:`Proceed`, :class:`Defer` or :class:`Hold`; never a refusal.
        """
        if activity.held is not None:
            return Hold(activity.held)
        delays = ", ".join(f"{delay:.1f}s" for delay in activity.answer_delays[-5:])
        if activity.fast_streak >= FAST_STREAK_TO_HOLD:
            return Hold(
                f"loop suspected: {activity.fast_streak} answers in a row each within "
                f"{self._fast_answer_secs:g}s of our reply (last: {delays}); "
                f"{activity.replies} replies sent in this thread"
            )
        now = self._clock()
        recent = [stamp for stamp in activity.reply_times if now - stamp < REPLY_WINDOW_SECS]
        if len(recent) >= MAX_REPLIES_PER_WINDOW:
            return Hold(
                f"loop suspected: {len(recent)} replies in this thread within "
                f"{REPLY_WINDOW_SECS / 3600:g}h (at most {MAX_REPLIES_PER_WINDOW})"
            )
        if activity.fast_streak >= FAST_STREAK_TO_SLOW and activity.reply_times:
            until = activity.reply_times[-1] + self._slow_down_secs
            if until > now:
                return Defer(
                    until,
                    f"{activity.fast_streak} fast answers in a row (last: {delays}); "
                    f"one reply per {self._slow_down_secs:g}s in this thread",
                )
        return Proceed()

    def check(self, activity: ThreadActivity) -> tuple[LoopDecision, ThreadActivity]:
        """:meth:`note_incoming`, :meth:`decide` and, on a hold, :meth:`hold` in one.

        The usual call for a message about to be handed on; safe to repeat for a
        deferred message (its answer delay is only recorded once).

        Args:
            activity: The thread's record.

        Returns:
            The decision and the record to store.
        """
        activity = self.note_incoming(activity)
        decision = self.decide(activity)
        if isinstance(decision, Hold) and activity.held is None:
            activity = self.hold(activity, decision.reason)
        return decision, activity

    def hold(self, activity: ThreadActivity, reason: str) -> ThreadActivity:
        """Mark the thread held (after :meth:`decide` returned :class:`Hold`).

        Args:
            activity: The thread's record.
            reason: The hold reason.

        Returns:
            The updated record.
        """
        return attrs.evolve(activity, held=reason)

    def release(self, activity: ThreadActivity) -> ThreadActivity:
        """An operator's release: the thread is no longer held and starts afresh.

        The evidence is cleared too, or the next message would be held again at
        once; a loop that resumes is caught again by the same rule.

        Args:
            activity: The thread's record.

        Returns:
            The record with no hold, no streak and no recent reply times (the total
            reply count is kept for the record).
        """
        return ThreadActivity(replies=activity.replies)
