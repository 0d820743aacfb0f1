"""Opening the database, the directory lock, transactions and migrations.

Theory of operation: :class:`Database` owns the one :class:`sqlite3.Connection` and
everything about it that is not a query: the owner-only directory and file, the
exclusive ``flock`` that keeps a second prxmail process out, WAL mode, the commit mode
chosen per transaction (``synchronous`` FULL or NORMAL, see "Durability settings" in
:mod:`prxmail.state`) and the migrations. Every query runs inside
:meth:`Database._transaction`; nested use joins the outer transaction, so a method
composed of others commits once.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Self

from prxmail.errors import LocalProtocolError, StateError, StateSchemaError
from prxmail.state._model import RetryPolicy
from prxmail.state._schema import _MIGRATIONS, SCHEMA_VERSION

if sys.platform != "win32":
    import fcntl


DB_FILENAME: Final = "state.sqlite3"
LOCK_FILENAME: Final = "lock"

# How long a statement waits for a lock held by another connection before failing. The
# directory lock keeps other prxmail processes out, so this only covers an operator's
# sqlite3 shell reading the file; a few seconds is plenty and still fails visibly.
BUSY_TIMEOUT_SECONDS: Final = 5.0

# Committed writes between two explicit WAL checkpoints (SQLite's own automatic one is
# off: it would run inside whichever commit crossed its threshold). A message's way
# through the store is about three commits of a few pages each, so 200 commits keep
# the WAL near SQLite's default of 1000 pages (4 MB): each checkpoint copies a few
# megabytes at most, and readers never scan a long WAL.
CHECKPOINT_EVERY_COMMITS: Final = 200

# SQLite's page cache per connection, in KiB (SQLite's default is 2,000). It fills up
# to the size of the database, so a long catch-up made it the service's largest
# growing allocation: 2.4 MB of SQLite memory after 3,000 messages. The pages a
# message's calls touch (the B-tree interior and the newest leaves) fit in far less;
# a page that is not cached is read again from the OS page cache, not from the disk.
# Durability does not depend on it: every commit still reaches the WAL file.
CACHE_KIB: Final = 512


def _create_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; the state holds mail, so be explicit.
        path.chmod(0o700)
    elif not path.is_dir():
        raise StateError(f"state_dir {str(path)!r} exists and is not a directory")


def _create_private_file(path: Path) -> None:
    # SQLite creates the database (and gives its -wal/-shm files the same mode) with
    # the umask's permissions; create it first so it starts out owner-only.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def _not_writable(state_dir: Path, exc: OSError) -> StateError:
    return StateError(
        f"state_dir {str(state_dir)!r} is not writable ({exc.strerror or exc}): prxmail"
        " keeps its durable state there; make the directory writable for the user"
        " running prxmail, or point state_dir at a writable directory"
    )


def _empty_database(db_path: Path) -> StateError:
    return StateError(
        f"the state database {str(db_path)!r} is empty (0 bytes): it was truncated or"
        " damaged. prxmail will not start it over, because that would apply the"
        " first-start policy again and answer old mail a second time. Restore the file"
        " from a backup; or, to start afresh deliberately, delete it together with its"
        " -wal and -shm files"
    )


def _create_database(db_path: Path) -> None:
    """Create a new, empty WAL database at ``db_path`` without a 0-byte moment.

    The file is built under a temporary name and renamed when SQLite has written its
    header, so a file of 0 bytes under the real name is always damage (see
    ``_empty_database``), never a first start that crashed half-way.
    """
    building = db_path.with_name(db_path.name + ".new")
    for leftover in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
        leftover.unlink(missing_ok=True)
    _create_private_file(building)
    conn = sqlite3.connect(building, isolation_level=None)
    try:
        # Persistent in the header, which this writes: the file is no longer empty.
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        conn.close()
    if str(mode).lower() != "wal":
        raise StateError(f"cannot switch {db_path} to WAL mode (got {mode!r})")
    os.replace(building, db_path)
    # The rename is durable before any commit can depend on it.
    dir_fd = os.open(db_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# An operator command's probe (state_dir_in_use) holds a shared lock for microseconds;
# a service starting at that instant must not fail for it, so taking the lock is tried
# again for this long before the directory counts as in use by another process.
LOCK_PROBE_GRACE_SECONDS: Final = 0.2
_LOCK_RETRY_SECONDS: Final = 0.01


def _flock_exclusive(fd: int) -> None:
    deadline = time.monotonic() + LOCK_PROBE_GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_LOCK_RETRY_SECONDS)
        else:
            return


def state_dir_in_use(state_dir: str | os.PathLike[str]) -> bool:
    """Whether a process holds the directory lock of a state directory (a running
    ``prxmail serve``). Creates nothing and takes no lock that outlives the call.

    Args:
        state_dir: The state directory.

    Returns:
        True when the lock is held; False when it is free or there is no lock file.
    """
    if sys.platform == "win32":  # pragma: no cover - no flock
        return False
    try:
        fd = os.open(Path(state_dir) / LOCK_FILENAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        # A shared lock conflicts with the service's exclusive one, and only with it.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops our shared lock, if we got it
    return False


class Database:
    """The connection and its transactions; the base of every store mixin."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        check_same_thread: bool = True,
        shared: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._check_same_thread = check_same_thread
        self.read_only = read_only
        self.shared = shared
        self.retry_policy = retry_policy or RetryPolicy()
        # Not cryptographic: only spreads retry times.
        self._rng = rng or random.Random()  # noqa: S311
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # The connection's current PRAGMA synchronous (FULL or NORMAL), so that
        # switching it costs a statement only when it changes.
        self._synchronous = "FULL"
        self._in_transaction = False
        # Committed write transactions since the last checkpoint (see checkpoint()).
        self._commits_since_checkpoint = 0
        db_path = self.state_dir / DB_FILENAME
        if read_only or shared:
            self._open_read_only(db_path, writable=shared)
            return
        try:
            _create_private_dir(self.state_dir)
            self._acquire_dir_lock()
        except OSError as exc:
            raise _not_writable(self.state_dir, exc) from exc
        try:
            try:
                if not db_path.exists():
                    _create_database(db_path)
                elif db_path.is_file() and db_path.stat().st_size == 0:
                    raise _empty_database(db_path)
            except OSError as exc:
                raise _not_writable(self.state_dir, exc) from exc
            except sqlite3.Error as exc:
                raise StateError(f"cannot create state database {db_path}: {exc}") from exc
            try:
                self._conn = sqlite3.connect(
                    db_path,
                    timeout=BUSY_TIMEOUT_SECONDS,
                    # We issue BEGIN/COMMIT ourselves: every write is explicit.
                    isolation_level=None,
                    check_same_thread=check_same_thread,
                )
                # Rows are read by column name (see _schema).
                self._conn.row_factory = sqlite3.Row
                self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StateError(f"cannot switch {db_path} to WAL mode (got {mode!r})")
                self._conn.execute("PRAGMA synchronous=FULL")
                # Checkpoints are run deliberately by checkpoint(), not inside a commit.
                self._conn.execute("PRAGMA wal_autocheckpoint=0")
            except sqlite3.Error as exc:
                raise StateError(f"cannot open state database {db_path}: {exc}") from exc
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _open_read_only(self, db_path: Path, *, writable: bool = False) -> None:
        # writable: an operator command next to a running service (``shared``). No
        # directory lock, nothing created or migrated; SQLite's own locks (WAL, the
        # busy timeout, BEGIN IMMEDIATE) keep its short transactions apart from the
        # service's.
        if not db_path.is_file():
            raise StateError(f"no state database at {db_path} (prxmail has not run there yet)")
        if db_path.stat().st_size == 0:
            raise _empty_database(db_path)
        try:
            self._conn = sqlite3.connect(
                f"{db_path.resolve().as_uri()}?mode={'rw' if writable else 'ro'}",
                uri=True,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=self._check_same_thread,
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise StateError(f"cannot read state database {db_path}: {exc}") from exc
        version = row[0] or 0
        if version != SCHEMA_VERSION:
            self.close()
            raise StateSchemaError(
                f"the state database has schema version {version}, this prxmail reads"
                f" {SCHEMA_VERSION}; "
                + ("upgrade prxmail" if version > SCHEMA_VERSION else "run prxmail serve once"),
                found=version,
                supported=SCHEMA_VERSION,
            )

    # -- lifecycle -----------------------------------------------------------------

    def _acquire_dir_lock(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - no flock; single instance unchecked
            return
        fd = os.open(self.state_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock_exclusive(fd)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip()
            os.close(fd)
            shown = f" (pid {holder})" if holder.isdigit() else ""
            raise StateError(
                f"state_dir {str(self.state_dir)!r} is in use by another prxmail process{shown}"
            ) from exc
        # The holder's pid, for the error message above; informational only.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    def close(self) -> None:
        """Close the database and release the directory lock. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._conn is None

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable=False`` commits without an fsync (see the package
        docstring, "Durability settings": only for changes whose loss on power failure
        hands a message out again and can never answer twice)."""
        conn = self._conn
        if conn is None:
            raise LocalProtocolError("the state store is closed")
        level = "FULL" if durable else "NORMAL"
        if self._in_transaction:
            # Nested (a method composed of others): part of the enclosing transaction,
            # committed with it and in its mode.
            yield conn
            return
        if level != self._synchronous and not self.read_only:
            try:
                # Allowed between transactions only; it applies to the next COMMIT.
                conn.execute(f"PRAGMA synchronous={level}")
            except sqlite3.Error as exc:
                raise StateError(f"cannot set the commit mode: {exc}") from exc
            self._synchronous = level
        try:
            # IMMEDIATE takes the write lock up front, so a transaction never fails
            # half-way through for lack of it. A reader only needs a snapshot.
            conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"cannot start a state transaction: {exc}") from exc
        self._in_transaction = True
        changes_before = conn.total_changes
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"state database error: {exc}") from exc
            raise
        finally:
            self._in_transaction = False
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StateError(f"cannot commit state change: {exc}") from exc
        if conn.total_changes != changes_before:
            self._commits_since_checkpoint += 1

    @property
    def checkpoint_due(self) -> bool:
        """True when enough writes were committed that :meth:`checkpoint` should run."""
        return self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file (a PASSIVE checkpoint).

        PASSIVE waits for nobody: pages a reader (``prxmail doctor``) still needs stay
        in the WAL for the next checkpoint. The connection would also checkpoint when
        it closes.

        Raises:
            StateError: SQLite failed.
        """
        conn = self._conn
        if conn is None or self.read_only:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"cannot checkpoint the state database: {exc}") from exc
        self._commits_since_checkpoint = 0

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER NOT NULL, migrated_at REAL NOT NULL)"
            )
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"the state database has schema version {current}, this prxmail"
                    f" only knows up to {SCHEMA_VERSION}; upgrade prxmail"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, migrated_at) VALUES (?, ?)",
                    (version, self._clock()),
                )

    def schema_version(self) -> int:
        """Returns: the schema version of the open database."""
        with self._transaction() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
