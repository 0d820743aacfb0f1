"""The synchronous store: one class composed of one mixin per concern.

Theory of operation: :class:`StateStore` is :class:`~prxmail.state._db.Database`
(opening, the directory lock, transactions, migrations, checkpoints) plus a mixin per
concern, each in its own module: folders and the high-water mark (``_mailboxes``), a
message's life (``_messages``), the outbox (``_outbox``), our own Message-IDs, pruning
and statistics (``_housekeeping``), parked messages, threads and the limits' state
(``_conversations``), what operators see and ask for (``_operator``). Every public
method is one transaction; a method composed of others runs inside the outer one (see
``Database._transaction``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from prxmail.state._conversations import ConversationMixin
from prxmail.state._housekeeping import HousekeepingMixin
from prxmail.state._model import RetryPolicy
from prxmail.state._operator import OperatorMixin


class StateStore(OperatorMixin, ConversationMixin, HousekeepingMixin):
    """Synchronous access to the state database (one thread at a time; see :mod:`prxmail.state`).

    Use :func:`open_state_store` from trio code. This class is for tests, tools and
    the worker threads behind :class:`AsyncStateStore`.

    Args:
        state_dir: Directory holding the database; created with mode 0700 if missing.
        retry_policy: Backoff for :meth:`mark_transient_failure`.
        rng: Random source for the backoff jitter (inject a seeded one in tests).
        clock: Wall-clock time source (``time.time``); stored times use it.
        prune_on_open: Run :meth:`prune` once when opening, so the database stays
            bounded even if nobody calls it.
        read_only: Open for inspection only (``prxmail doctor`` while ``serve``
            runs): no directory lock, nothing created, migrated or pruned, every
            write fails with :class:`~prxmail.errors.StateError`. WAL lets this
            reader see a consistent snapshot while the service writes.
        shared: Open an existing database for an operator command (``prxmail
            outbox retry``) while ``serve`` may run: writes allowed, but no directory
            lock, nothing created, migrated or pruned; the schema must be current.
        check_same_thread: ``False`` lets threads other than the creating one use the
            store; the caller must then make sure no two use it at the same time
            (:class:`AsyncStateStore` does).

    Raises:
        StateError: another process uses ``state_dir`` (not for ``read_only``), the
            database comes from a newer prxmail (or, read-only, does not exist or
            needs a migration), or SQLite cannot open it.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        prune_on_open: bool = True,
        read_only: bool = False,
        check_same_thread: bool = True,
        shared: bool = False,
    ) -> None:
        super().__init__(
            state_dir,
            retry_policy=retry_policy,
            rng=rng,
            clock=clock,
            read_only=read_only,
            check_same_thread=check_same_thread,
            shared=shared,
        )
        if prune_on_open and not read_only and not shared:
            try:
                self.prune()
                self.prune_conversations()
                self.prune_operator_log()
            except BaseException:
                self.close()
                raise
