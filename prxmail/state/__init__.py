"""Durable state: what was seen, claimed, handled and answered, and the outbox.

Theory of operation
-------------------
Everything prxmail must not forget lives in one SQLite database, ``state.sqlite3``,
inside ``state_dir``. The guarantee it exists for is *nothing lost, nothing answered
twice*, across a SIGKILL at any instant. Three mechanisms give it:

1. **Every change is one transaction.** A crash either happened before ``COMMIT``
   (the change never existed) or after (it is on disk). Changes that must go together
   are made in the same transaction; the important one is :meth:`StateStore.record_reply`,
   which inserts the reply into the outbox, remembers its Message-ID as ours and moves
   the parent message to ``replied`` at once. There is therefore no instant at which
   a reply exists without its parent being marked, or the other way round.

2. **Messages move through a state table** (:data:`TRANSITIONS`)::

       (new) --claim--> claimed --begin_handling--> handling --> handled
                           |                           |     \\-> replied (+ outbox row)
                           |                           |      \\-> failed(reason)
                           \\--> rejected(reason)       \\--(crash; recover_interrupted)
                                                              --> claimed, or failed
                                                                  after max_attempts

   Two more statuses park a claimed message without finishing it (issue 12: volume
   and loop limits never drop mail): ``deferred`` (with a ``due_at``; back to
   ``claimed`` by :meth:`StateStore.wake_deferred` when due) and ``held`` (back to
   ``claimed`` only by an operator's :meth:`StateStore.release_thread`). Both
   survive restarts; see ``_conversations``.

   A message is *claimed* (recorded, with its Message-ID) before anything is done with
   it, and claiming also advances the folder's high-water mark (the last UID that will
   never be fetched again) in the same transaction: a message is either above the mark
   (it will be fetched again) or has a row (it will be found by :meth:`pending`), never
   neither. ``begin_handling`` counts an attempt *before* the handler runs, so a message
   whose handler crashes the whole process on every try ends up ``failed`` after
   ``max_attempts`` restarts instead of looping forever. The flip side: a crash after
   the handler finished but before its outcome was committed runs the handler again
   -- handlers are executed *at least once*, their replies are recorded at most once.

3. **The outbox is the only way out.** A reply is stored before it is sent and marked
   sent after the server accepted it. A crash between the server's acceptance and our
   ``COMMIT`` makes the same bytes -- with the same Message-ID -- go out once more on
   restart: SMTP offers no idempotent submission, so that window cannot be closed, but
   the reply is never *composed* twice and receivers' clients collapse the copy by its
   Message-ID.

Durability settings: ``journal_mode=WAL``, and the commit mode chosen per transaction.
WAL lets the read-mostly statistics not block the writer and makes each commit one
append to the WAL file. A commit that returned is in that file in the OS page cache, so
it survives a *process* crash (SIGKILL) in either mode. What differs is *power loss or a
kernel crash*:

* ``synchronous=FULL`` (an fsync per commit) for every change whose loss could answer
  twice or lose mail: the outbox (``record_reply``, ``enqueue``, ``mark_sent``, retries),
  our own Message-IDs, the mailbox's UIDVALIDITY and first-start marker.
* ``synchronous=NORMAL`` (no fsync) for the steps of a message's life before its
  outcome -- ``claim``, ``begin_handling``, ``mark_handled``, ``mark_rejected``,
  ``mark_failed``, ``release``, crash recovery, the high-water mark. WAL frames are
  appended in order and a FULL commit syncs every frame before it, so power loss can
  only roll back a *suffix* of such steps after the last durable change. Each of them
  rolled back leaves the message above the high-water mark or unfinished, so it is
  fetched or handed out again: at least once, which is the contract. None can make a
  reply go out twice, because a reply exists only through a FULL commit
  (``record_reply``) that also makes everything before it durable.

Measured on an ext4 VM disk: FULL manages about 800-1000 commits/s, NORMAL about 4000;
a message's way to its handler used to cost three fsyncs, it now costs none.

Threads: a :class:`StateStore` and its connection belong to the thread that created it
(``check_same_thread=True`` by default, so misuse fails loudly instead of corrupting).
:func:`open_state_store` gives trio code an :class:`AsyncStateStore` whose every call
runs in ``trio.to_thread.run_sync`` under the store's own ``CapacityLimiter(1)``: one
call at a time, in the order they were made, and no SQLite statement -- no commit, no
fsync, no checkpoint -- on the event loop (see ``prxmail.state._async``). WAL
checkpoints are run deliberately between calls, not by SQLite inside a commit.

Only one process may use a state directory at a time: the store takes an exclusive
``flock`` on ``state_dir/lock`` and raises :class:`~prxmail.errors.StateError` when
another process holds it (two instances would both answer every message). The kernel
drops the lock when the process dies, even by SIGKILL. ``read_only=True`` opens the
database for inspection without the lock (``prxmail doctor`` next to a running
``serve``); WAL gives such a reader a consistent snapshot.

UIDVALIDITY policy
------------------
When the server reports a different UIDVALIDITY for a folder, every UID we stored for it
is meaningless. :meth:`StateStore.sync_mailbox` then records the new value, resets the
high-water mark to 0 and clears the ``initialized`` marker, so the service treats the
folder as new and applies its first-start policy again. The old per-message records are
*kept*: claiming a message whose Message-ID already has a record in the same account
yields :attr:`ClaimOutcome.DUPLICATE` (the new row is stored as ``rejected`` with reason
``duplicate-message-id``), which is what prevents re-answering the whole mailbox.

Package layout
--------------
``_model`` values and the state tables; ``_schema`` tables, migrations and rows as
values; ``_db`` opening, the directory lock and transactions; ``_mailboxes`` the
high-water mark; ``_messages`` a message's life; ``_outbox`` the outbox;
``_housekeeping`` our Message-IDs, pruning, statistics; ``_conversations`` parked
messages, thread history and the limits' state; ``_operator`` the heartbeat and
operators' actions; ``_store`` the class made of those; ``_async`` the trio facade.
"""

from prxmail.state._async import AsyncStateStore as AsyncStateStore
from prxmail.state._async import open_state_store as open_state_store
from prxmail.state._db import DB_FILENAME as DB_FILENAME
from prxmail.state._db import state_dir_in_use as state_dir_in_use
from prxmail.state._model import MAX_REASON_CHARS as MAX_REASON_CHARS
from prxmail.state._model import MAX_THREAD_HISTORY as MAX_THREAD_HISTORY
from prxmail.state._model import MAX_THREAD_TEXT_CHARS as MAX_THREAD_TEXT_CHARS
from prxmail.state._model import OPERATOR_MOVES as OPERATOR_MOVES
from prxmail.state._model import OUTBOX_TRANSITIONS as OUTBOX_TRANSITIONS
from prxmail.state._model import TRANSITIONS as TRANSITIONS
from prxmail.state._model import AccountHeartbeat as AccountHeartbeat
from prxmail.state._model import AccountSummary as AccountSummary
from prxmail.state._model import ClaimBatch as ClaimBatch
from prxmail.state._model import ClaimOutcome as ClaimOutcome
from prxmail.state._model import ClaimResult as ClaimResult
from prxmail.state._model import Direction as Direction
from prxmail.state._model import MailboxState as MailboxState
from prxmail.state._model import MessageKey as MessageKey
from prxmail.state._model import MessageRecord as MessageRecord
from prxmail.state._model import MessageStatus as MessageStatus
from prxmail.state._model import OperatorMessage as OperatorMessage
from prxmail.state._model import OutboxDraft as OutboxDraft
from prxmail.state._model import OutboxItem as OutboxItem
from prxmail.state._model import OutboxStatus as OutboxStatus
from prxmail.state._model import ParkedMessage as ParkedMessage
from prxmail.state._model import PruneReport as PruneReport
from prxmail.state._model import RecoveryReport as RecoveryReport
from prxmail.state._model import RetryPolicy as RetryPolicy
from prxmail.state._model import StateStatistics as StateStatistics
from prxmail.state._model import ThreadEntry as ThreadEntry
from prxmail.state._model import account_key as account_key
from prxmail.state._model import normalize_message_id as normalize_message_id
from prxmail.state._model import own_id_predicate as own_id_predicate
from prxmail.state._operator import HEARTBEAT_STALE_FACTOR as HEARTBEAT_STALE_FACTOR
from prxmail.state._schema import SCHEMA_VERSION as SCHEMA_VERSION
from prxmail.state._store import StateStore as StateStore

__all__ = [
    "DB_FILENAME",
    "HEARTBEAT_STALE_FACTOR",
    "MAX_THREAD_HISTORY",
    "MAX_THREAD_TEXT_CHARS",
    "OPERATOR_MOVES",
    "OUTBOX_TRANSITIONS",
    "SCHEMA_VERSION",
    "TRANSITIONS",
    "AccountHeartbeat",
    "AccountSummary",
    "AsyncStateStore",
    "ClaimBatch",
    "ClaimOutcome",
    "ClaimResult",
    "Direction",
    "MailboxState",
    "MessageKey",
    "MessageRecord",
    "MessageStatus",
    "OperatorMessage",
    "OutboxDraft",
    "OutboxItem",
    "OutboxStatus",
    "ParkedMessage",
    "PruneReport",
    "RecoveryReport",
    "RetryPolicy",
    "StateStatistics",
    "StateStore",
    "ThreadEntry",
    "account_key",
    "normalize_message_id",
    "open_state_store",
    "own_id_predicate",
    "state_dir_in_use",
]
