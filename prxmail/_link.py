"""The state of a Trio protocol connection, shared by the IMAP and SMTP clients.

Each connection (``IMAPConnection``, ``SMTPConnection``) has one :class:`Link` value,
read by one checking method and changed by one transition method against
:data:`LINK_TRANSITIONS` (trio's ``_ssl.py`` ``_State`` is the model). The protocol's own
state (authenticated, selected, in a mail transaction...) belongs to the sans-I/O core;
this is the connection's: whether an operation may start. Transport failures become
``ConnectionBrokenError`` in one place, :func:`transport_failures`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Mapping

import trio

from prxmail._tls import transport_errors


class Link(enum.Enum):
    """Whether a connection can be used."""

    READY = "ready"  # no operation in progress
    BUSY = "busy"  # an operation runs; interrupting it breaks the link
    BROKEN = "broken"  # unusable; every call raises ConnectionBrokenError with the cause
    CLOSED = "closed"  # aclose() ran; the transport is closed


# Every change of Link, in one place. BROKEN and CLOSED are sticky: the first cause of
# breaking is kept, and the end of an operation on a broken connection changes nothing.
LINK_TRANSITIONS: Mapping[Link, frozenset[Link]] = {
    Link.READY: frozenset({Link.BUSY, Link.BROKEN, Link.CLOSED}),
    Link.BUSY: frozenset({Link.READY, Link.BROKEN, Link.CLOSED}),
    Link.BROKEN: frozenset({Link.CLOSED}),
    Link.CLOSED: frozenset(),
}

# What a failing transport raises: trio's stream errors (TLS failures arrive as
# BrokenResourceError with the ssl error as cause) and OSError from connecting.
TRANSPORT_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def transport_failures(what: str) -> contextlib.AbstractContextManager[None]:
    """The one place where transport failures become ``ConnectionBrokenError``.

    Args:
        what: What was being done, for the error text (e.g. "cannot connect to h:993").

    Returns:
        A context manager translating :data:`TRANSPORT_FAILURES`.
    """
    return transport_errors(what, TRANSPORT_FAILURES)
