"""``python -m bench store [--messages 3000] [--group 50] [--reply-every 4] [--cpu-thread]
[--pipeline] [--combined] [--admission] [--sync] [--state-root DIR] [--json]``: how long the
store's calls block the event loop.

A catch-up-like load on one :class:`~prxmail.state.AsyncStateStore`, through its public
API only (so the same bench runs against any version of the store): groups of
``--group`` messages are claimed with ``claim_batch``, each message then goes through
``record_verdicts`` / ``begin_handling`` and ``mark_handled`` -- or ``record_reply``
for every ``--reply-every``-th one, while a sender task marks the queued replies sent in
batches as the real sender does (FULL commits that grow the WAL, so checkpoints happen).
``--pipeline`` splits the work as the channel does: a watcher task begins handling and
hands each message over an unbuffered channel to a consumer task that finishes it.
``--combined`` finishes each handled message together with the next one's begin
(``finish_and_begin``, one transaction: the channel's hand-over in a catch-up).
``--admission`` records each group's verdicts as the channel's admission does
(``record_admission``: a thread entry per message and a loop-guard state per thread,
ten senders' threads, instead of ``record_verdicts``).
``--sync`` instead times the catch-up's store calls on a plain ``StateStore`` in one
thread (claim_batch, record_admission, finish_and_begin per group; no hops, no GIL
contention): the SQLite work alone, in microseconds per message, median of five runs.
``--cpu-thread`` runs a pure-Python busy loop in another thread meanwhile, standing in
for the parse thread: it competes for the GIL as a real catch-up does.

Per call name it reports the *event-loop time*: the time the trio thread spent running
the calling task's steps between the call's start and its return (a
``trio.abc.Instrument`` adds up ``before_task_step``/``after_task_step`` per task),
which is what every other task on the loop waits through; and the *wall time* the caller
waited. Figures are p50, p99.9 and max in microseconds, and messages per second overall.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import tempfile
import threading
import time
from typing import Any

import trio
import trio.lowlevel

from prxmail.state import (
    Direction,
    MessageKey,
    MessageStatus,
    OutboxDraft,
    StateStore,
    ThreadEntry,
    account_key,
    open_state_store,
)

ACCOUNT = account_key("bench@example.test", "imap.example.test", 993)
FOLDER = "INBOX"


class _StepClock(trio.abc.Instrument):
    """Adds up, per task, how long the trio thread runs that task's steps."""

    def __init__(self) -> None:
        self.totals: dict[trio.lowlevel.Task, float] = {}
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.totals[task] = self.totals.get(task, 0.0) + time.perf_counter() - self._started

    def total(self) -> float:
        return self.totals.get(trio.lowlevel.current_task(), 0.0)


def _draft(uid: int) -> OutboxDraft:
    return OutboxDraft(
        message_id=f"bench-reply-{uid}@bot.example.test",
        envelope_from="bot@example.test",
        envelope_to=("alice@example.test",),
        raw=b"Subject: Re: x\r\n\r\n" + b"y" * 2000,
    )


# The channel bench's backlog rotates ten senders: ten threads' loop-guard states.
ADMISSION_THREADS = 10


def _entry(uid: int) -> ThreadEntry:
    return ThreadEntry(
        message_id=f"m{uid}@example.test",
        thread_id=f"t{uid % ADMISSION_THREADS}",
        direction=Direction.IN,
        date="2026-12-02T00:00:00+00:00",
        sender=f"sender{uid % ADMISSION_THREADS}@example.test",
        subject=f"backlog message {uid}",
    )


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {
        "n": len(ordered),
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(at(0.99), 1),
        "p99.9_us": round(at(0.999), 1),
        "max_us": round(ordered[-1] * 1e6, 1),
    }


def _spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


async def _run(args: argparse.Namespace, state_dir: pathlib.Path) -> dict[str, Any]:
    clock = _StepClock()
    trio.lowlevel.add_instrument(clock)
    loop_time: dict[str, list[float]] = {}
    wall_time: dict[str, list[float]] = {}

    async def timed(name: str, call: Any) -> Any:
        before, t0 = clock.total(), time.perf_counter()
        result = await call
        wall_time.setdefault(name, []).append(time.perf_counter() - t0)
        loop_time.setdefault(name, []).append(clock.total() - before)
        return result

    stop_cpu = threading.Event()
    cpu = threading.Thread(target=_spin, args=(stop_cpu,), daemon=True)
    if args.cpu_thread:
        cpu.start()
    try:
        async with open_state_store(state_dir) as store:
            await store.sync_mailbox(ACCOUNT, FOLDER, 1)
            queued: list[int] = []
            done = trio.Event()

            async def sender() -> None:
                while not (done.is_set() and not queued):
                    if queued:
                        batch, queued[:] = list(queued), []
                        await store.mark_sent_many(batch)
                    await trio.sleep(0.005)

            started, cpu_started = time.perf_counter(), time.process_time()
            # The channel's shape: the watcher begins handling a message and hands it
            # over an unbuffered channel; the consumer marks it handled (or replies).
            hand_send, hand_receive = trio.open_memory_channel[MessageKey](0)

            async def consumer() -> None:
                async for key in hand_receive:
                    if key.uid % args.reply_every == 0:
                        item = await timed("record_reply", store.record_reply(key, _draft(key.uid)))
                        queued.append(item.id)
                    else:
                        await timed("mark_handled", store.mark_handled(key))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                if args.pipeline:
                    nursery.start_soon(consumer)
                uid = 0
                while uid < args.messages:
                    group = range(uid + 1, min(uid + args.group, args.messages) + 1)
                    uid = group[-1]
                    items = [
                        (MessageKey(ACCOUNT, FOLDER, 1, u), f"m{u}@example.test") for u in group
                    ]
                    await timed(
                        "claim_batch",
                        store.claim_batch(items, message_ids=[mid for _, mid in items]),
                    )
                    first = True
                    # --combined: a handled message's outcome waits for the next begin.
                    unfinished: MessageKey | None = None
                    for index, (key, _mid) in enumerate(items):
                        if first and args.admission:
                            await timed(
                                "record_admission",
                                store.record_admission(
                                    ACCOUNT,
                                    accepted=key,
                                    entries=[_entry(u) for u in group],
                                    threads={
                                        f"t{u % ADMISSION_THREADS}": {"answers": [float(u)]}
                                        for u in group
                                    },
                                ),
                            )
                            first = False
                        elif first:
                            await timed("record_verdicts", store.record_verdicts((), key))
                            first = False
                        elif unfinished is not None:
                            await timed(
                                "finish_and_begin",
                                store.finish_and_begin(unfinished, MessageStatus.HANDLED, key),
                            )
                            unfinished = None
                        else:
                            await timed("begin_handling", store.begin_handling(key))
                        if args.pipeline:
                            await hand_send.send(key)
                        elif key.uid % args.reply_every == 0:
                            item = await timed(
                                "record_reply", store.record_reply(key, _draft(key.uid))
                            )
                            queued.append(item.id)
                        elif args.combined and index < len(items) - 1:
                            unfinished = key
                        else:
                            await timed("mark_handled", store.mark_handled(key))
                        # The handler hand-off and the channel's other work.
                        await trio.lowlevel.checkpoint()
                await hand_send.aclose()
                done.set()
            elapsed = time.perf_counter() - started
            cpu_used = time.process_time() - cpu_started
    finally:
        stop_cpu.set()
        if args.cpu_thread:
            cpu.join()
    return {
        "messages": args.messages,
        "group": args.group,
        "cpu_thread": args.cpu_thread,
        "messages_per_s": round(args.messages / elapsed, 1),
        # Process CPU per message: less at the mercy of other load than the rate.
        "cpu_us_per_message": round(cpu_used / args.messages * 1e6, 1),
        "event_loop": {name: _quantiles(v) for name, v in sorted(loop_time.items())},
        "wall": {name: _quantiles(v) for name, v in sorted(wall_time.items())},
    }


# Runs of the --sync measurement: the median of five steadies one-off disk stalls.
SYNC_RUNS = 5


def _sync_once(args: argparse.Namespace, state_dir: pathlib.Path) -> dict[str, float]:
    spent = {"claim_batch": 0.0, "record_admission": 0.0, "finish_and_begin": 0.0}
    store = StateStore(state_dir)
    try:
        store.sync_mailbox(ACCOUNT, FOLDER, 1)
        for start in range(1, args.messages + 1, args.group):
            group = range(start, min(start + args.group, args.messages + 1))
            items = [(MessageKey(ACCOUNT, FOLDER, 1, u), f"m{u}@example.test") for u in group]
            t0 = time.perf_counter()
            store.claim_batch(items, message_ids=[mid for _, mid in items])
            t1 = time.perf_counter()
            store.record_admission(
                ACCOUNT,
                accepted=items[0][0],
                entries=[_entry(u) for u in group],
                threads={f"t{u % ADMISSION_THREADS}": {"answers": [float(u)]} for u in group},
            )
            t2 = time.perf_counter()
            for (done, _), (following, _) in itertools.pairwise(items):
                store.finish_and_begin(done, MessageStatus.HANDLED, following)
            store.mark_handled(items[-1][0])
            t3 = time.perf_counter()
            spent["claim_batch"] += t1 - t0
            spent["record_admission"] += t2 - t1
            spent["finish_and_begin"] += t3 - t2
    finally:
        store.close()
    return {name: total / args.messages * 1e6 for name, total in spent.items()}


def _sync(args: argparse.Namespace, root: pathlib.Path) -> dict[str, Any]:
    runs = [_sync_once(args, root / f"sync-{n}") for n in range(SYNC_RUNS)]
    return {
        name: {
            "median_us": round(statistics.median(r[name] for r in runs), 1),
            "runs_us": [round(r[name], 1) for r in runs],
        }
        for name in runs[0]
    }


def main(argv: list[str]) -> int:
    """Run the bench and print its figures.

    Args:
        argv: Command-line arguments (see the module docstring).

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(prog="python -m bench store")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--group", type=int, default=50)
    parser.add_argument("--reply-every", type=int, default=4)
    parser.add_argument("--cpu-thread", action="store_true")
    parser.add_argument(
        "--pipeline", action="store_true", help="a watcher and a consumer task, as the channel"
    )
    parser.add_argument(
        "--combined",
        action="store_true",
        help="finish a handled message with the next one's begin (finish_and_begin)",
    )
    parser.add_argument(
        "--admission",
        action="store_true",
        help="record each group's verdicts with record_admission (thread entries)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="time the catch-up's store calls synchronously, in one thread (us per message)",
    )
    parser.add_argument("--state-root", type=pathlib.Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.sync:
        with tempfile.TemporaryDirectory(dir=args.state_root, prefix="store-bench-") as tmp:
            calls = _sync(args, pathlib.Path(tmp))
        if args.json:
            print(json.dumps(calls))
            return 0
        print(f"{args.messages} messages, groups of {args.group}, synchronous, us per message:")
        for name, figures in calls.items():
            print(f"  {name:18} median {figures['median_us']:7}  runs {figures['runs_us']}")
        return 0
    with tempfile.TemporaryDirectory(dir=args.state_root, prefix="store-bench-") as tmp:
        result = trio.run(_run, args, pathlib.Path(tmp) / "state")
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['messages']} messages, groups of {result['group']},"
        f" cpu thread: {result['cpu_thread']}: {result['messages_per_s']} msg/s,"
        f" {result['cpu_us_per_message']} us CPU per message"
    )
    for kind in ("event_loop", "wall"):
        print(f"  {kind} time per call (us):")
        for name, q in result[kind].items():
            print(
                f"    {name:16} n={q['n']:5} p50={q['p50_us']:8} p99={q['p99_us']:8}"
                f" p99.9={q['p99.9_us']:8} max={q['max_us']:8}"
            )
    return 0
