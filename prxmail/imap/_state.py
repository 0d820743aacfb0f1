# Theory of operation
# -------------------
#
# The IMAP connection states of RFC 3501 section 3 (plus IDLING, RFC 2177) and every
# way of moving between them live in the two tables below and nowhere else (h11's
# _state.py is the model). The protocol core consults ALLOWED before it serialises a
# command and TRANSITIONS when a command completes; the trio layer never decides a
# state on its own.
#
# Outcomes are the tagged status ("OK", "NO", "BAD") or "+" for an accepted
# continuation (IDLE goes to IDLING on the server's "+", not on its completion).
# Events outside any command (greeting PREAUTH, BYE, end of stream, a protocol error)
# are in UNSOLICITED.
#
# ERROR is terminal, like trio's SSLStream BROKEN: once the server has broken the
# protocol nothing it sends can be trusted to mean what it says (the next tagged OK
# may answer a command we never sent), so the core refuses every later call instead
# of going on as if nothing happened. No event leads out of it; BYE and end of
# stream do not turn a broken connection into a cleanly closed one.

from __future__ import annotations

import enum

from prxmail.errors import LocalProtocolError

__all__ = ["ALLOWED", "TRANSITIONS", "UNSOLICITED", "ConnectionState", "check_allowed"]


class ConnectionState(enum.Enum):
    """Where an IMAP connection is in its life."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    IDLING = "idling"
    LOGOUT = "logout"
    ERROR = "error"


NA = ConnectionState.NOT_AUTHENTICATED
AU = ConnectionState.AUTHENTICATED
SE = ConnectionState.SELECTED
ID = ConnectionState.IDLING
LO = ConnectionState.LOGOUT
ER = ConnectionState.ERROR
_LIVE = tuple(state for state in ConnectionState if state is not ER)

_ANY_STATE = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
_AUTHENTICATED = _ANY_STATE | {
    "SELECT",
    "EXAMINE",
    "ENABLE",
    "LIST",
    "LSUB",
    "STATUS",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "APPEND",
    "NAMESPACE",
}

# Which commands each state accepts.
ALLOWED: dict[ConnectionState, frozenset[str]] = {
    NA: _ANY_STATE | {"STARTTLS", "LOGIN", "AUTHENTICATE"},
    AU: _AUTHENTICATED,
    SE: _AUTHENTICATED
    | {
        "CHECK",
        "CLOSE",
        "UNSELECT",
        "EXPUNGE",
        "SEARCH",
        "FETCH",
        "STORE",
        "COPY",
        "MOVE",
        "UID",
        "IDLE",
    },
    ID: frozenset(),  # only DONE, which is not a command
    LO: frozenset(),
    ER: frozenset(),
}

# (state, command, outcome) -> new state. Anything not listed leaves the state alone.
TRANSITIONS: dict[tuple[ConnectionState, str, str], ConnectionState] = {
    (NA, "LOGIN", "OK"): AU,
    (NA, "AUTHENTICATE", "OK"): AU,
    (AU, "SELECT", "OK"): SE,
    (AU, "EXAMINE", "OK"): SE,
    (SE, "SELECT", "OK"): SE,
    (SE, "EXAMINE", "OK"): SE,
    # RFC 3501 6.3.1: a failed SELECT/EXAMINE leaves no mailbox selected.
    (SE, "SELECT", "NO"): AU,
    (SE, "EXAMINE", "NO"): AU,
    (SE, "CLOSE", "OK"): AU,
    (SE, "UNSELECT", "OK"): AU,
    (SE, "IDLE", "+"): ID,
    (SE, "IDLE", "NO"): SE,
    (ID, "IDLE", "OK"): SE,
    (ID, "IDLE", "NO"): SE,
    (ID, "IDLE", "BAD"): SE,
    **{(state, "LOGOUT", outcome): LO for state in (NA, AU, SE) for outcome in ("OK", "NO", "BAD")},
}

# Events outside the command flow.
UNSOLICITED: dict[tuple[ConnectionState, str], ConnectionState] = {
    (NA, "PREAUTH"): AU,
    **{(state, "BYE"): LO for state in _LIVE},
    **{(state, "EOF"): LO for state in _LIVE},
    # The server broke the protocol (a RemoteProtocolError): from any state.
    **{(state, "PROTOCOL_ERROR"): ER for state in ConnectionState},
}


def check_allowed(state: ConnectionState, command: str) -> None:
    """Raise unless ``command`` may be sent in ``state``.

    Raises:
        LocalProtocolError: the command is not valid in this state.
    """
    if command not in ALLOWED[state]:
        raise LocalProtocolError(f"{command} is not allowed in the {state.value} state")
