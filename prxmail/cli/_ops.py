"""``prxmail status``, ``prxmail outbox ...`` and ``prxmail messages ...``: operating a service.

Theory of operation: these commands run next to a running ``prxmail serve`` (or
without one) and talk to it only through the state database: they read it (opened
read-only) or change it in one short transaction (opened ``shared``: no directory
lock, SQLite's WAL and busy timeout keep the two apart). The service's heartbeat row
says what it is doing; an operator's change bumps a counter the service reads every
``OPERATOR_POLL_SECONDS``, so a retry takes effect within seconds (see
:mod:`prxmail.state._operator`).

``--account`` takes an account's name (``"default"`` for the ``[channels_config.email]``
table unless it sets ``name``) or its key (``user@imap.host:port``). ``status`` shows
every account without it; the other commands act on one account, so with several
accounts they need it.

Exit status: 0 done; 1 the thing asked for failed or does not exist (no such item,
not in a state that allows it, no state database); 2 a configuration problem
(including an unknown ``--account``). ``--json`` prints one JSON object instead of
the table a person reads.
"""

from __future__ import annotations

import datetime
import email.header
import email.parser
import email.policy
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

from prxmail.channel._core import HEARTBEAT_SECONDS
from prxmail.cli._serve import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, one_line
from prxmail.config import Config, load_accounts
from prxmail.errors import ConfigError, LocalProtocolError, StateError
from prxmail.state import (
    DB_FILENAME,
    HEARTBEAT_STALE_FACTOR,
    AccountHeartbeat,
    MessageStatus,
    OperatorMessage,
    OutboxItem,
    StateStore,
    account_key,
    state_dir_in_use,
)

__all__ = [
    "MESSAGE_LIST_STATUSES",
    "run_messages",
    "run_outbox",
    "run_status",
]


#: What ``prxmail messages list --status`` accepts.
MESSAGE_LIST_STATUSES: Final = ("failed", "held", "deferred", "rejected")

# A table cell is cut to this many characters: a long SMTP error or subject would make
# every row wrap; --json has the full text.
MAX_CELL_CHARS: Final = 60

# Of a queued reply only its headers are read to show the subject; a header block is
# far smaller than this, and the cut keeps a listing of big replies cheap.
MAX_HEADER_BYTES: Final = 64 * 1024

_T = TypeVar("_T")


class _Problem(Exception):
    """A failure to report in one line with an exit status."""

    def __init__(self, text: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(text)
        self.status = status


def _accounts(path: Path, wanted: str | None) -> list[tuple[Config, str, str]]:
    """The configuration's accounts as (config, name, key), or just ``wanted`` (a name
    or an account key)."""
    try:
        configs = load_accounts(path)
    except ConfigError as exc:
        raise _Problem(one_line(exc), EXIT_CONFIG) from None
    found = [
        (config, config.name, account_key(config.username, config.imap_host, config.imap_port))
        for config in configs
    ]
    if wanted is None:
        return found
    chosen = [entry for entry in found if wanted in (entry[1], entry[2])]
    if not chosen:
        names = ", ".join(f"{name!r} ({key})" for _, name, key in found)
        raise _Problem(f"no account {wanted!r} in the configuration (it has {names})", EXIT_CONFIG)
    return chosen


def _load(path: Path, wanted: str | None) -> tuple[Config, str, str]:
    """The one account a command acts on: ``wanted``, or the only one there is."""
    found = _accounts(path, wanted)
    if len(found) > 1:
        names = ", ".join(name for _, name, _ in found)
        raise _Problem(
            f"the configuration has several accounts ({names}): choose one with --account",
            EXIT_CONFIG,
        )
    return found[0]


def _with_store(config: Config, work: Callable[[StateStore], _T], *, write: bool) -> _T:
    if not (config.state_dir / DB_FILENAME).is_file():
        raise _Problem(
            f"no state database in {config.state_dir}: prxmail serve has not run there yet"
        )
    try:
        with StateStore(config.state_dir, read_only=not write, shared=write) as store:
            return work(store)
    except StateError as exc:
        raise _Problem(f"cannot use the state database: {exc}") from None


def _when(at: float | None) -> str | None:
    if at is None:
        return None
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else " ".join(str(value).split())
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    for line in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _finish(
    prog: str, as_json: bool, out: TextIO, err: TextIO, run: Callable[[], dict[str, Any]]
) -> int:
    """Run one command body; print its JSON document, or a failure in one line."""
    try:
        document = run()
    except _Problem as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": str(exc)}), file=out)
        print(f"prxmail {prog}: {exc}", file=err)
        return exc.status
    if as_json:
        print(json.dumps({"ok": True, **document}, indent=2), file=out)
    return EXIT_OK


# -- status ----------------------------------------------------------------------------


def _service_state(beat: AccountHeartbeat | None, locked: bool, now: float) -> tuple[str, str]:
    """``(state, sentence)``: running / not-running / not-responding, and why."""
    stale_after = HEARTBEAT_STALE_FACTOR * HEARTBEAT_SECONDS
    if not locked:
        return "not-running", "not running (the state directory's lock is free)"
    if beat is None:
        return "not-responding", "the state directory is locked, but no heartbeat was written"
    age = now - beat.updated_at
    if beat.stopped_at is not None or age > stale_after:
        return "not-responding", (
            f"the state directory is locked, but the last heartbeat is {age:.0f} s old"
            f" (expected every {HEARTBEAT_SECONDS:g} s)"
        )
    return "running", f"running (pid {beat.pid}, heartbeat {age:.0f} s ago)"


def _status_document(
    config: Config, name: str, key: str, store: StateStore, *, now: float
) -> dict[str, Any]:
    beat = store.heartbeat(key)
    summary = store.account_summary(key)
    state, sentence = _service_state(beat, state_dir_in_use(config.state_dir), now)
    counts = summary.messages_by_status
    return {
        "account": name,
        "account_key": key,
        "service": state,
        "service_detail": sentence,
        "pid": None if beat is None else beat.pid,
        "heartbeat_at": None if beat is None else _when(beat.updated_at),
        # What the service last reported; when it is not running, "stopped".
        "imap": beat.imap if beat is not None and state == "running" else "stopped",
        "last_connected_at": None if beat is None else _when(beat.last_connected_at),
        "imap_error": None if beat is None else beat.imap_error,
        "imap_error_at": None if beat is None else _when(beat.imap_error_at),
        "smtp_error": None if beat is None else beat.smtp_error,
        "smtp_error_at": None if beat is None else _when(beat.smtp_error_at),
        "reconnects": 0 if beat is None else beat.reconnects,
        "messages": {
            "pending": counts[MessageStatus.CLAIMED] + counts[MessageStatus.HANDLING],
            "deferred": counts[MessageStatus.DEFERRED],
            "held": counts[MessageStatus.HELD],
            "failed": counts[MessageStatus.FAILED],
        },
        "outbox": {"queued": summary.outbox_queued, "failed": summary.outbox_failed},
        "last_handled_message_id": summary.last_handled_message_id,
        "last_handled_at": _when(summary.last_handled_at),
    }


def _print_status(doc: dict[str, Any], out: TextIO) -> None:
    messages, outbox = doc["messages"], doc["outbox"]

    def error(kind: str) -> str:
        text = doc[f"{kind}_error"]
        return "-" if text is None else f"{doc[f'{kind}_error_at']}  {_cell(text)}"

    print(f"account {doc['account']} ({doc['account_key']})", file=out)
    rows = (
        ("service", doc["service_detail"]),
        ("imap", doc["imap"]),
        ("last connected", doc["last_connected_at"] or "never"),
        ("last imap error", error("imap")),
        ("last smtp error", error("smtp")),
        ("messages", ", ".join(f"{k} {v}" for k, v in messages.items())),
        ("outbox", ", ".join(f"{k} {v}" for k, v in outbox.items())),
        (
            "last handled",
            "-"
            if doc["last_handled_at"] is None
            else f"{doc['last_handled_at']}  {doc['last_handled_message_id']}",
        ),
    )
    for label, value in rows:
        print(f"  {label:<16} {value}", file=out)


def run_status(path: Path, *, account: str | None, as_json: bool, out: TextIO, err: TextIO) -> int:
    """Run ``prxmail status``.

    Args:
        path: The configuration file.
        account: ``--account``: a name or account key; ``None`` for every account.
        as_json: Print JSON instead of text.
        out: Where the report goes.
        err: Where a failure is reported, in one line.

    Returns:
        0 when the status was reported (whatever it says), 1 when there is no
        readable state database, 2 for a configuration problem.
    """

    def run() -> dict[str, Any]:
        docs = []
        for config, name, key in _accounts(path, account):
            document = functools.partial(_status_document, config, name, key, now=time.time())
            doc = _with_store(config, document, write=False)
            if not as_json:
                _print_status(doc, out)
            docs.append(doc)
        return {"accounts": docs}

    return _finish("status", as_json, out, err, run)


# -- outbox ----------------------------------------------------------------------------


def _subject(raw: bytes) -> str:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    header = parser.parsebytes(raw[:MAX_HEADER_BYTES]).get("Subject")
    if header is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(header))))
    except (ValueError, LookupError):  # a charset Python does not know: show it raw
        return str(header)


def _outbox_row(item: OutboxItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "status": item.status.value,
        "to": list(item.envelope_to),
        "subject": _subject(item.raw),
        "attempts": item.attempts,
        "next_attempt_at": _when(item.next_attempt_at)
        if item.status is item.status.QUEUED
        else None,
        "last_error": item.last_error,
        "message_id": item.message_id,
        "created_at": _when(item.created_at),
    }


def _print_outbox(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        print("the outbox is empty (nothing queued, nothing failed)", file=out)
        return
    _table(
        ("ID", "STATUS", "TO", "SUBJECT", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"),
        [
            (
                r["id"],
                r["status"],
                ",".join(r["to"]),
                r["subject"],
                r["attempts"],
                r["next_attempt_at"],
                r["last_error"],
            )
            for r in rows
        ],
        out,
    )


def run_outbox(
    path: Path,
    *,
    action: str,
    item_id: int | None,
    every: bool,
    reason: str | None,
    account: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run ``prxmail outbox list|retry|drop``.

    Args:
        path: The configuration file.
        action: ``"list"``, ``"retry"`` or ``"drop"``.
        item_id: The outbox item (retry, drop).
        every: ``--all`` (retry every queued and failed item).
        reason: Why an item is dropped (stored with the drop).
        account: ``--account``.
        as_json: Print JSON instead of text.
        out: Where the result goes.
        err: Where a failure is reported, in one line.

    Returns:
        0 done; 1 no such item or nothing to act on; 2 configuration or usage problem.
    """

    def run() -> dict[str, Any]:
        config, name, key = _load(path, account)
        if action == "list":
            if item_id is not None or every:
                raise _Problem("outbox list takes no ID and no --all", EXIT_CONFIG)
            rows = _with_store(
                config, lambda s: [_outbox_row(i) for i in s.operator_outbox(key)], write=False
            )
            if not as_json:
                _print_outbox(rows, out)
            return {"account": name, "items": rows}
        if action == "retry":
            if (item_id is None) == (not every):
                raise _Problem("outbox retry takes an ID or --all", EXIT_CONFIG)
            done = _act(config, lambda s: s.retry_outbox(key, item_id))
            if not done and not every:
                raise _Problem(f"no queued or failed outbox item {item_id}")
            if not as_json:
                print(
                    f"{len(done)} outbox item(s) due now"
                    + (f": {', '.join(str(i.id) for i in done)}" if done else "")
                    + (f"; {_when_acted(config, 'sends them')}" if done else ""),
                    file=out,
                )
            return {"account": name, "retried": [i.id for i in done]}
        if item_id is None or every:
            raise _Problem("outbox drop takes one ID", EXIT_CONFIG)
        why = reason or "dropped by an operator"
        dropped = _act(config, lambda s: s.drop_outbox(key, item_id, why))
        if not as_json:
            print(f"outbox item {dropped.id} dropped ({why}); it will not be sent", file=out)
        return {"account": name, "dropped": dropped.id, "reason": why}

    return _finish(f"outbox {action}", as_json, out, err, run)


def _when_acted(config: Config, does: str) -> str:
    if state_dir_in_use(config.state_dir):
        return f"the running service {does} within seconds"
    return f"prxmail serve is not running; it {does} when it starts"


def _act(config: Config, work: Callable[[StateStore], _T]) -> _T:
    def guarded(store: StateStore) -> _T:
        try:
            return work(store)
        except LocalProtocolError as exc:
            raise _Problem(str(exc)) from None

    return _with_store(config, guarded, write=True)


# -- messages --------------------------------------------------------------------------


def _message_row(message: OperatorMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "status": message.status.value,
        "from": message.sender,
        "subject": message.subject,
        "folder": message.folder,
        "uid": message.uid,
        "message_id": message.message_id,
        "attempts": message.attempts,
        "updated_at": _when(message.updated_at),
        "due_at": _when(message.due_at),
        "thread_id": message.thread_id,
        "reason": message.reason,
    }


def _print_messages(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        print("no failed, held, deferred or rejected messages", file=out)
        return
    _table(
        ("ID", "STATUS", "FROM", "SUBJECT", "ATTEMPTS", "UPDATED", "REASON"),
        [
            (
                r["id"],
                r["status"],
                r["from"],
                r["subject"],
                r["attempts"],
                r["updated_at"],
                r["reason"],
            )
            for r in rows
        ],
        out,
    )


def run_messages(
    path: Path,
    *,
    action: str,
    item_id: int | None,
    status: str | None,
    account: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run ``prxmail messages list|retry|release``.

    Args:
        path: The configuration file.
        action: ``"list"``, ``"retry"`` or ``"release"``.
        item_id: The message id ``list`` shows (retry, release).
        status: ``--status`` for list: one of :data:`MESSAGE_LIST_STATUSES`.
        account: ``--account``.
        as_json: Print JSON instead of text.
        out: Where the result goes.
        err: Where a failure is reported, in one line.

    Returns:
        0 done; 1 no such message or not in a state that allows it; 2 configuration
        or usage problem.
    """

    def run() -> dict[str, Any]:
        config, name, key = _load(path, account)
        if action == "list":
            if item_id is not None:
                raise _Problem("messages list takes no ID", EXIT_CONFIG)
            wanted = None if status is None else MessageStatus(status)
            rows = _with_store(
                config,
                lambda s: [_message_row(m) for m in s.operator_messages(key, wanted)],
                write=False,
            )
            if not as_json:
                _print_messages(rows, out)
            return {"account": name, "messages": rows}
        if item_id is None or status is not None:
            raise _Problem(f"messages {action} takes one ID (and no --status)", EXIT_CONFIG)
        if action == "retry":
            before = _act(config, lambda s: s.retry_message(key, item_id))
            if not as_json:
                print(
                    f"message {before.id} (UID {before.uid}) goes to the handler again;"
                    f" {_when_acted(config, 'hands it on')}",
                    file=out,
                )
            return {"account": name, "retried": before.id}
        released = _act(config, lambda s: s.release_message(key, item_id))
        if not as_json:
            print(f"thread of message {item_id} released: {released} message(s) go on", file=out)
        return {"account": name, "released": released}

    return _finish(f"messages {action}", as_json, out, err, run)
