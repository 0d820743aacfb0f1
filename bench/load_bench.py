"""Push latency while another account of the same process catches up (issue 16, target 5).

``python -m bench load [--backlog 5000] [--samples 20] [--max-rounds N] [--diagnose]
[--switch-interval S] [--json FILE]``

What is measured
----------------
One child process runs the real multi-account path: ``open_mail_channels`` with the
two accounts of one TOML (the email table is account ``bulk``, the table
``[channels_config.email.accounts.chat]`` account ``chat``, one shared state
directory). ``bulk`` starts with a backlog of ``--backlog`` 4 KB text messages in its
Maildir, indexed by Dovecot once before the child starts (as ``bench channel``'s
backlog catch-up prepares it); ``chat`` starts with an empty INBOX. One task drains
``bulk`` (reads ``message.text``, ``mark_handled``); once it has taken
:data:`LOAD_AFTER` messages, pushes go to ``chat`` one at a time (an APPEND on a second
connection, ``bench.channel_bench.Injector``) and the clock runs from just before the
APPEND to ``chat.receive()`` returning the message, as in ``bench channel``'s section 1.
The first push of a round is a warm-up and not counted; a push that arrives after
``bulk`` took its last message is not counted as "under load" either (the bench says how
many landed during the catch-up). A 5,000-message catch-up lasts a few seconds and a
push takes about 0.6 s (Dovecot's half-second included), so the bench runs rounds, each
a fresh child with fresh users and a fresh backlog, until it has ``--samples``.

In the first round, once ``bulk`` is done and idling, the same pushes go to ``chat``
again: the latency without load, same process, same run. The best peer's idle latency
(aioimaplib, imapclient, as in ``bench channel``) is measured in the same run too;
prxmail's *own share* is its latency minus the best peer's at the same percentile
(Dovecot adds a hard-coded 500 ms to every push, which the peers pay as well).

``--diagnose`` instruments the child (not the timed figures' business: compare its
rounds with each other only): the event loop's lag (a task asking for a 1 ms sleep and
measuring how late it wakes), the loop's longest task steps by task, and the state
store calls per account, split into the wait for the queue and thread and the time
inside SQLite. ``--switch-interval`` sets the child's ``sys.setswitchinterval`` (how
long a thread waits for the GIL before it asks the holder to drop it; 5 ms by default).

Everything runs on loopback against the private servers of ``tests/mailservers.py``;
every loop is bounded in count and time; the child is waited for with a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from bench._kit import Stats, add_sample, run_child, timed_store_calls
from bench.channel_bench import (
    BACKLOG_TIMEOUT,
    PUSH_TIMEOUT,
    Injector,
    Sample,
    _channel_toml,
    _Endpoint,
    _hook_exists,
    _latency_aioimaplib,
    _latency_imapclient,
    _machine,
    _pct,
    _push_message,
    _text_message,
    _touch,
    _warm,
)
from tests.mailservers import MailServers, User, mail_servers

# Pushes start once bulk has handed out this many messages: its catch-up is under way
# (sessions open, the first groups parsed and claimed), not starting.
LOAD_AFTER = 200
# Each message of the backlog, as in bench channel's 4 KB backlog.
MESSAGE_BYTES = 4096
# One round's child must finish within this (catch-up, pushes, start and stop).
ROUND_TIMEOUT = BACKLOG_TIMEOUT + 120
# How long the child waits for bulk to be idle again after its catch-up.
SETTLE_TIMEOUT = 60.0
# --diagnose: the loop-lag probe's sleep, and the task steps it reports (the longest).
LAG_PROBE_SECONDS = 0.001
LONG_STEP_SECONDS = 0.002

PEERS: dict[str, Callable[[MailServers, User, Injector, int, str], list[Sample]]] = {
    "aioimaplib": _latency_aioimaplib,
    "imapclient": _latency_imapclient,
}


def _two_accounts_toml(
    servers: MailServers, bulk: User, chat: User, state_dir: pathlib.Path
) -> str:
    """One TOML: the email table is account ``bulk``, one more table is ``chat``."""
    text = _channel_toml(servers, bulk, state_dir)
    # _channel_toml ends inside [channels_config.email]: keys added here belong to it.
    text += 'name = "bulk"\n'
    text += (
        "\n[channels_config.email.accounts.chat]\n"
        f"username = {json.dumps(chat.address)}\n"
        f"password = {json.dumps(chat.password)}\n"
        f"from_address = {json.dumps(chat.address)}\n"
    )
    return text


class _PeerUnderLoad:
    """The best kind of peer (imapclient: one blocking session, no event loop) watching
    a third user's INBOX from the parent process while the child runs: pushes to it,
    one at a time, land under the same Dovecot and machine load as chat's, without
    prxmail's process. Only those inside the child's loaded window count."""

    def __init__(self, servers: MailServers) -> None:
        self._servers = servers
        self._user = servers.add_user(f"ll-peer-load-{os.getpid()}-{time.monotonic_ns()}")
        self._injector = Injector(servers)
        self._injector.prepare(self._user)
        self.samples: list[tuple[float, float]] = []  # (sent_at, total seconds)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-under-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + ROUND_TIMEOUT
        i = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                [sample] = _latency_imapclient(
                    self._servers, self._user, self._injector, 1, f"peer-load-{i}"
                )
                got = time.perf_counter()
                self.samples.append((got - sample.total, sample.total))
                i += 1
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(PUSH_TIMEOUT * 2)
        self._injector.close()
        if self.error is not None:
            raise self.error


# -- the child ----------------------------------------------------------------------------


class _Diagnosis:
    """``--diagnose``: where the loop's and the store's time goes while chat waits."""

    def __init__(self) -> None:
        self.lag: list[float] = []
        self.steps: dict[str, list[float]] = {}  # task name -> [count, total, max]
        self.store: Stats = {}  # "account method" -> [calls, wall, inside]
        self.chat_store_wall = 0.0
        self.chat_store_inside = 0.0
        self.chat_store_calls = 0
        self.recording = False
        self.tracing = False
        self.trace: list[tuple[Any, ...]] = []

    @contextlib.contextmanager
    def store_timing(self) -> Iterator[None]:
        with timed_store_calls(self._store_call):
            yield

    def _store_call(self, name: str, wall: float, inside: float) -> None:
        from prxmail._log import current_account

        account = current_account() or "?"
        if self.recording:
            add_sample(self.store, f"{account} {name}", wall, inside)
        if account == "chat":
            self.chat_store_calls += 1
            self.chat_store_wall += wall
            self.chat_store_inside += inside

    def instrument(self) -> trio.abc.Instrument:
        from prxmail._log import _ACCOUNT

        diag = self

        class Steps(trio.abc.Instrument):
            """Every task step's wall and thread CPU time (the difference is time the
            loop's thread did not run: mostly waiting for the GIL); for chat's watcher
            also how long it waited in the run queue."""

            def __init__(self) -> None:
                self._started = self._cpu = 0.0

            def task_scheduled(self, task: trio.lowlevel.Task) -> None:
                if (
                    diag.tracing
                    and task.name.endswith("_run_watcher")
                    and task.context.get(_ACCOUNT) == "chat"
                ):
                    diag.trace.append(("scheduled", time.perf_counter(), 0.0))

            def before_task_step(self, task: trio.lowlevel.Task) -> None:
                self._started = time.perf_counter()
                self._cpu = time.thread_time()

            def after_task_step(self, task: trio.lowlevel.Task) -> None:
                now = time.perf_counter()
                spent = now - self._started
                cpu = time.thread_time() - self._cpu
                account = task.context.get(_ACCOUNT) or "-"
                if diag.tracing and account == "chat" and task.name.endswith("_run_watcher"):
                    diag.trace.append(("step", self._started, now, cpu))
                if diag.recording and spent >= LONG_STEP_SECONDS:
                    name = f"{account} {task.name.rsplit('.', 1)[-1]}"
                    entry = diag.steps.setdefault(name, [0, 0.0, 0.0, 0.0])
                    entry[0] += 1
                    entry[1] += spent
                    entry[2] += cpu
                    entry[3] = max(entry[3], spent)

        return Steps()

    def split(self, since: float, until: float) -> dict[str, float]:
        """Chat's watcher between ``since`` (EXISTS seen) and ``until`` (message in the
        consumer's hands): ms in the run queue, ms running (and of that, ms of thread
        CPU), the rest blocked on I/O or a thread."""
        queued = running = cpu = 0.0
        scheduled: float | None = None
        # A task is often rescheduled during its own step (a checkpoint): order the
        # events by when they happened, steps by their start.
        for event in sorted(self.trace, key=lambda e: e[1]):
            if event[0] == "scheduled":
                scheduled = event[1]
                continue
            start, end = event[1], event[2]
            if start >= since and end <= until:
                if scheduled is not None and scheduled >= since:
                    queued += start - scheduled
                running += end - start
                cpu += event[3]
            scheduled = None
        total = until - since
        return {
            "queued_ms": queued * 1000,
            "running_ms": running * 1000,
            "running_cpu_ms": cpu * 1000,
            "blocked_ms": (total - queued - running) * 1000,
        }

    async def probe_lag(self) -> None:
        while True:
            t = time.perf_counter()
            await trio.sleep(LAG_PROBE_SECONDS)
            if self.recording:
                self.lag.append(time.perf_counter() - t - LAG_PROBE_SECONDS)

    def report(self) -> dict[str, Any]:
        return {
            "lag_p50_ms": _pct(self.lag, 50) * 1000 if self.lag else None,
            "lag_p95_ms": _pct(self.lag, 95) * 1000 if self.lag else None,
            "lag_max_ms": max(self.lag) * 1000 if self.lag else None,
            "steps": self.steps,
            "store": self.store,
        }


def _load_child(spec: dict[str, Any]) -> dict[str, Any]:
    from prxmail.channel import MailChannel, open_mail_channels
    from prxmail.config import parse_accounts

    configs = parse_accounts(spec["toml"])
    if spec.get("switch_interval"):
        sys.setswitchinterval(spec["switch_interval"])
    chat_user = User(spec["chat"][0], spec["chat"][1])
    n, loaded_wanted, quiet_wanted = spec["backlog"], spec["loaded"], spec["quiet"]
    injector = Injector(_Endpoint(spec["host"], spec["port"], spec["ca_file"]))
    injector.prepare(chat_user)
    exists_at = _hook_exists()
    diag = _Diagnosis() if spec.get("diagnose") else None
    out: dict[str, Any] = {"loaded": [], "quiet": [], "warm": None}

    async def push(chat: MailChannel, tag: str, i: int) -> dict[str, float]:
        with trio.fail_after(PUSH_TIMEOUT):
            await chat.status.wait_value(lambda s: s.imap == "idle")
            exists_at.clear()
            if diag is not None:
                diag.chat_store_calls = 0
                diag.chat_store_wall = diag.chat_store_inside = 0.0
                diag.trace.clear()
                diag.tracing = True
            injector.fire(chat_user, _push_message(tag, i))
            message = await chat.receive()
            got = time.perf_counter()
            if injector.error is not None:
                raise injector.error
            if not message.subject.endswith(f"{tag} {i}"):
                raise RuntimeError(f"chat: expected push {tag} {i}, got {message.subject!r}")
            if not exists_at:
                raise RuntimeError("chat: the message came without an EXISTS push")
            sample = {
                "sent_at": injector.sent_at,
                "exists_at": exists_at[0],
                "total_ms": (got - injector.sent_at) * 1000,
                "after_exists_ms": (got - exists_at[0]) * 1000,
                "bulk_at_fire": progress["fired_count"],
                "bulk_at_got": progress["count"],
            }
            if diag is not None:
                diag.tracing = False
                sample |= diag.split(exists_at[0], got)
                sample["chat_store_calls"] = diag.chat_store_calls
                sample["chat_store_wall_ms"] = diag.chat_store_wall * 1000
                sample["chat_store_inside_ms"] = diag.chat_store_inside * 1000
            await chat.mark_handled(message)
            return sample

    progress: dict[str, Any] = {"count": 0, "fired_count": 0, "first": None, "last": None}

    async def main() -> None:
        async with open_mail_channels(configs) as channels, trio.open_nursery() as nursery:
            bulk, chat = channels["bulk"], channels["chat"]
            if diag is not None:
                nursery.start_soon(diag.probe_lag)
            started = trio.Event()
            finished = trio.Event()

            async def drain() -> None:
                with trio.fail_after(BACKLOG_TIMEOUT):
                    async for message in bulk:
                        _touch(message.text)
                        await bulk.mark_handled(message)
                        progress["count"] += 1
                        now = time.perf_counter()
                        if progress["first"] is None:
                            progress["first"] = now
                        progress["last"] = now
                        if progress["count"] == LOAD_AFTER:
                            started.set()
                        if progress["count"] == n:
                            finished.set()
                            return

            nursery.start_soon(drain)
            with trio.fail_after(BACKLOG_TIMEOUT):
                await started.wait()
            if diag is not None:
                diag.recording = True
            window: list[float] = []
            for i in range(loaded_wanted + 1):  # the first one is the warm-up
                if finished.is_set():
                    break
                progress["fired_count"] = progress["count"]
                window.append(time.perf_counter())
                sample = await push(chat, "load", i)
                window.append(time.perf_counter())
                if i == 0:
                    out["warm"] = sample
                else:
                    out["loaded"].append(sample)
            if diag is not None:
                diag.recording = False
                out["diagnosis_loaded"] = diag.report()
                diag.__init__()  # type: ignore[misc]
            out["window"] = [window[0] - progress["first"], window[-1] - progress["first"]]
            # The loaded window on the shared clock, ended by bulk's last message.
            out["window_abs"] = [window[0], progress["last"] or window[-1]]
            out["bulk_count_window"] = [
                out["warm"]["bulk_at_fire"] if out["warm"] else 0,
                progress["count"],
            ]
            with trio.fail_after(BACKLOG_TIMEOUT):
                await finished.wait()
            out["bulk_elapsed"] = progress["last"] - progress["first"]
            out["bulk_msg_s"] = (n - 1) / out["bulk_elapsed"]
            if quiet_wanted:
                with trio.fail_after(SETTLE_TIMEOUT):
                    await bulk.status.wait_value(lambda s: s.imap == "idle")
                if diag is not None:
                    diag.recording = True
                for i in range(quiet_wanted):
                    out["quiet"].append(await push(chat, "quiet", i))
                if diag is not None:
                    diag.recording = False
                    out["diagnosis_quiet"] = diag.report()
            nursery.cancel_scope.cancel()

    try:
        with diag.store_timing() if diag is not None else contextlib.nullcontext():
            trio.run(main, instruments=[diag.instrument()] if diag is not None else [])
    finally:
        injector.close()
    return out


# -- the parent ---------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": _pct(values, 50), "p95": _pct(values, 95), "max": max(values), "n": len(values)}


def _peers(servers: MailServers, samples: int) -> dict[str, dict[str, float]]:
    injector = Injector(servers)
    table: dict[str, dict[str, float]] = {}
    try:
        for name, run in PEERS.items():
            user = servers.add_user(f"ll-{name}-{os.getpid()}")
            injector.prepare(user)
            run(servers, user, injector, 1, f"{name}-warm")  # first login/index not counted
            values = run(servers, user, injector, samples, name)
            table[name] = _stats([s.total * 1000 for s in values])
            ex = _stats([s.after_exists * 1000 for s in values])
            table[name] |= {"ex_p50": ex["p50"], "ex_p95": ex["p95"]}
    finally:
        injector.close()
    return table


def _round(
    servers: MailServers,
    index: int,
    backlog: list[bytes],
    *,
    loaded: int,
    quiet: int,
    diagnose: bool,
    switch_interval: float | None,
    peer_under_load: bool,
) -> dict[str, Any]:
    tag = f"{os.getpid()}-{index}"
    bulk = servers.add_user(f"ll-bulk-{tag}")
    chat = servers.add_user(f"ll-chat-{tag}")
    servers.deliver_to_maildir(bulk, backlog)
    _warm(servers, bulk)
    spec = {
        "host": servers.host,
        "port": servers.imap_tls_port,
        "ca_file": str(servers.ca_file),
        "chat": [chat.address, chat.password],
        "backlog": len(backlog),
        "loaded": loaded,
        "quiet": quiet,
        "diagnose": diagnose,
        "switch_interval": switch_interval,
        "toml": _two_accounts_toml(servers, bulk, chat, servers.workdir / f"state-ll-{tag}"),
    }
    peer = _PeerUnderLoad(servers) if peer_under_load else None
    try:
        result = run_child("bench.load_bench", "_load", spec, timeout=ROUND_TIMEOUT)
    finally:
        if peer is not None:
            peer.close()
    if peer is not None:
        start, end = result["window_abs"]
        result["peer_loaded_ms"] = [t * 1000 for sent, t in peer.samples if start <= sent <= end]
    result["load"] = os.getloadavg()
    return result


def _print_diagnosis(label: str, diag: dict[str, Any]) -> None:
    if diag.get("lag_p50_ms") is None:
        return
    print(
        f"    {label}: loop lag p50 {diag['lag_p50_ms']:.2f} ms, p95 {diag['lag_p95_ms']:.2f},"
        f" max {diag['lag_max_ms']:.2f}; task steps >= {LONG_STEP_SECONDS * 1000:.0f} ms:"
    )
    steps = sorted(diag["steps"].items(), key=lambda kv: -kv[1][1])
    for name, (count, total, cpu, longest) in steps[:6]:
        print(
            f"      {name[-40:]:<40} {count:5.0f} x, {total * 1000:7.1f} ms wall"
            f" ({cpu * 1000:6.1f} ms thread CPU), max {longest * 1000:.1f}"
        )
    print(f"      {'store call':<40} {'calls':>6} {'wall ms/call':>13} {'inside ms/call':>15}")
    for name, (calls, wall, inside) in sorted(diag["store"].items(), key=lambda kv: -kv[1][1])[:10]:
        print(
            f"      {name:<40} {calls:6.0f} {wall / calls * 1000:13.2f}"
            f" {inside / calls * 1000:15.3f}"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench load", description=__doc__)
    parser.add_argument("--backlog", type=int, default=5000, help="bulk's backlog (5000)")
    parser.add_argument("--samples", type=int, default=20, help="pushes under load (20)")
    parser.add_argument(
        "--max-rounds", type=int, default=None, help="rounds at most (default: samples)"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="instrument the child: loop lag, store calls"
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the child's sys.setswitchinterval (seconds; a diagnosis, default 0.005)",
    )
    parser.add_argument(
        "--no-peer-under-load",
        action="store_true",
        help="no imapclient pushes beside chat's during the catch-up (from the parent)",
    )
    parser.add_argument("--json", type=argparse.FileType("w"), default=None)
    args = parser.parse_args(argv)
    if args.backlog < LOAD_AFTER + 100:
        parser.error(f"--backlog must be at least {LOAD_AFTER + 100}")
    samples = max(1, min(200, args.samples))
    max_rounds = max(1, args.max_rounds or samples)
    report: dict[str, Any] = {"machine_start": _machine(), "argv": argv}
    print(f"machine: {report['machine_start']}")
    backlog = [_text_message(i, MESSAGE_BYTES, "ll") for i in range(args.backlog)]
    rounds: list[dict[str, Any]] = []
    with mail_servers() as servers:
        peers = _peers(servers, samples)
        report["peers"] = peers
        report["peers_load"] = os.getloadavg()
        loaded: list[dict[str, float]] = []
        quiet: list[dict[str, float]] = []
        late = 0
        for index in range(max_rounds):
            if len(loaded) >= samples:
                break
            result = _round(
                servers,
                index,
                backlog,
                loaded=samples - len(loaded),
                quiet=samples if index == 0 else 0,
                diagnose=args.diagnose,
                switch_interval=args.switch_interval,
                peer_under_load=not args.no_peer_under_load,
            )
            landed = [s for s in result["loaded"] if s["bulk_at_got"] < args.backlog]
            late += len(result["loaded"]) - len(landed)
            loaded += landed
            quiet += result["quiet"]
            rounds.append(result)
            print(
                f"  round {index + 1}: bulk {result['bulk_msg_s']:,.0f} msg/s"
                f" ({result['bulk_elapsed']:.1f} s); {len(landed)} pushes landed during"
                f" the catch-up (bulk at {result['bulk_count_window'][0]}->"
                f"{result['bulk_count_window'][1]} of {args.backlog}),"
                f" {len(result['loaded']) - len(landed)} after; load"
                f" {' '.join(f'{x:.2f}' for x in result['load'])}"
            )
            if args.diagnose:
                _print_diagnosis("under load", result.get("diagnosis_loaded", {}))
                _print_diagnosis("no load", result.get("diagnosis_quiet", {}))
    if not loaded:
        raise SystemExit("no push landed during a catch-up: raise --backlog")
    report["machine_end"] = _machine()
    report["rounds"] = rounds
    table = {
        "under load": _stats([s["total_ms"] for s in loaded]),
        "no load": _stats([s["total_ms"] for s in quiet]),
    }
    exists = {
        "under load": _stats([s["after_exists_ms"] for s in loaded]),
        "no load": _stats([s["after_exists_ms"] for s in quiet]),
    }
    before_exists = {
        "under load": _stats([s["total_ms"] - s["after_exists_ms"] for s in loaded]),
        "no load": _stats([s["total_ms"] - s["after_exists_ms"] for s in quiet]),
    }
    best = min(peers, key=lambda name: peers[name]["p50"])
    if args.diagnose:
        print("\n  chat's watcher from the EXISTS push to the hand-over, median ms (--diagnose):")
        keys = ("queued_ms", "running_ms", "running_cpu_ms", "blocked_ms")
        keys += ("chat_store_calls", "chat_store_wall_ms", "chat_store_inside_ms")
        print("  " + " ".join(f"{k.removesuffix('_ms'):>13}" for k in ("", *keys)))
        for label, chosen in (("under load", loaded), ("no load", quiet)):
            row = [_pct([s[k] for s in chosen], 50) for k in keys]
            print(f"  {label:>13} " + " ".join(f"{v:13.2f}" for v in row))
    print(
        f"\n6. push latency while another account catches up: {args.backlog} x 4 KB backlog,"
        f" {len(loaded)} pushes under load ({late} landed after the catch-up, not counted),"
        f" {len(quiet)} without"
    )
    print(
        f"  {'ms':<22} {'p50':>8} {'p95':>8} {'max':>8}   {'EXISTS->msg p50':>15} {'p95':>7}"
        f"   {'APPEND->EXISTS p50':>18} {'p95':>7}"
    )
    for name, row in table.items():
        ex, pre = exists[name], before_exists[name]
        print(
            f"  prxmail {name:<14} {row['p50']:8.1f} {row['p95']:8.1f} {row['max']:8.1f}"
            f"   {ex['p50']:15.2f} {ex['p95']:7.2f}   {pre['p50']:18.1f} {pre['p95']:7.1f}"
        )
    for name, row in peers.items():
        print(
            f"  {name + ' (idle)':<22} {row['p50']:8.1f} {row['p95']:8.1f} {row['max']:8.1f}"
            f"   {row['ex_p50']:15.2f} {row['ex_p95']:7.2f}"
            f"   {row['p50'] - row['ex_p50']:18.1f}"
        )
    own = {
        name: {p: row[p] - peers[best][p] for p in ("p50", "p95")} for name, row in table.items()
    }
    print(
        f"  own share under load (vs {best}): p50 {own['under load']['p50']:+.1f} ms"
        f" (target < 10)   p95 {own['under load']['p95']:+.1f} ms"
    )
    print(
        f"  own share without load:          p50 {own['no load']['p50']:+.1f} ms"
        f"   p95 {own['no load']['p95']:+.1f} ms"
    )
    peer_loaded = [t for r in rounds for t in r.get("peer_loaded_ms", [])]
    if peer_loaded:
        row = report["peer_under_load"] = _stats(peer_loaded)
        print(
            f"  {'imapclient (same load)':<22} {row['p50']:8.1f} {row['p95']:8.1f}"
            f" {row['max']:8.1f}"
            f"   ({row['n']:.0f} pushes to a third user from the parent during the catch-ups)"
        )
        print(
            f"  prxmail under load minus imapclient under the same load: p50"
            f" {table['under load']['p50'] - row['p50']:+.1f} ms"
            f"   p95 {table['under load']['p95'] - row['p95']:+.1f} ms"
        )
    rates = [r["bulk_msg_s"] for r in rounds]
    print(f"  bulk catch-up: {min(rates):,.0f}-{max(rates):,.0f} msg/s over {len(rounds)} rounds")
    print(f"machine at end: {report['machine_end']}")
    report |= {"table": table, "exists": exists, "append_to_exists": before_exists}
    report |= {"own": own, "best_peer": best}
    if args.json is not None:
        json.dump(report, args.json, indent=2, default=str)
        args.json.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_load"]:
        print(json.dumps(_load_child(json.loads(sys.stdin.read()))))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
