"""Sender policy and loop guards: which received mail is handed on and answered.

Everything here is pure: functions and small classes over :class:`~prxmail.message.
Message`, no I/O, no trio. The channel calls :func:`evaluate` once per message
(without a rate limiter: it applies its own per-thread loop guard and per-sender
token bucket afterwards, which defer or hold but never refuse -- see
``prxmail.channel._conversations``) and acts on the :class:`Verdict`; a refused
message is logged with ``verdict.reason`` and marked rejected so it is not looked at
again. A *deferred* verdict
(:attr:`Verdict.retry_at` set: the volume limit) is not a refusal: the message is
kept and evaluated again at that time.

The checks, in the order :func:`evaluate` applies them (the first that fails names
the reason):

1. ``own-address`` -- From is one of our own addresses (our replies coming back).
2. ``loop`` -- the message's own Message-ID is one we sent (our own mail coming
   back). How many of our ids a thread's References name is *not* a test: a
   person's client keeps the whole chain, so that cut long conversations after
   about ten rounds. Automatons that answer each other without RFC 3834 headers
   are stopped per thread by :mod:`prxmail.conversation`'s loop guard instead.
3. ``bounce`` -- null Return-Path ``<>``, ``MAILER-DAEMON``/``postmaster`` senders,
   or a ``multipart/report`` (delivery and disposition reports).
4. ``auto-submitted`` -- ``Auto-Submitted`` other than ``no`` (RFC 3834).
5. ``bulk`` -- ``Precedence: bulk``, ``list`` or ``junk``.
6. ``list-mail`` -- ``List-Id`` or ``List-Unsubscribe`` present (RFC 2369/2919).
7. ``no-sender`` / ``ambiguous-sender`` -- no usable From, or several From mailboxes.
8. ``sender-not-allowed`` -- From does not match ``allowed_senders``.
9. ``auth-results-failed`` -- only when an authserv-id is configured: the receiving
   server's Authentication-Results do not show DMARC pass or an aligned DKIM/SPF pass.
10. ``rate-limited`` -- the sender is over its volume limit (a token bucket,
    :class:`ReplyRateLimiter`): a *deferral*, with :attr:`Verdict.retry_at`, never
    a rejection.

``allowed_senders`` entries are normalised by :func:`validate_sender_entry`:
``"*"`` allows everybody, ``"@example.com"`` allows every address *exactly* at
``example.com`` -- **not** its subdomains (``mail.example.com`` is not covered;
subdomains are often delegated to other parties, so list them explicitly) -- and
``"user@example.com"`` allows that one address. Matching is case-insensitive, and
internationalised domains match in either Unicode or ``xn--`` form. An empty list
allows nobody.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence

import attrs

from prxmail._validate import ALLOW_ALL, validate_sender_entry
from prxmail.conversation._limits import (
    DEFAULT_MAX_TRACKED_SENDERS,
    RateLimiterStatistics,
    SenderRateLimiter,
)
from prxmail.message import Address, Message

__all__ = [
    "ALLOW_ALL",
    "AuthResult",
    "AuthResultsHeader",
    "RateLimiterStatistics",
    "ReplyRateLimiter",
    "SenderPolicy",
    "Verdict",
    "check_authentication_results",
    "choose_reply_recipient",
    "domains_aligned",
    "evaluate",
    "loop_guard_reason",
    "parse_authentication_results",
    "sender_allowed",
    "validate_sender_entry",
]


# Authentication-Results values longer than this are not parsed: real ones are a
# few hundred bytes, and the parser is character by character.
MAX_AUTH_RESULTS_CHARS = 8192

_BOUNCE_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})


# -- addresses and allowed_senders ----------------------------------------------------


def _domain_key(domain: str) -> str:
    """A domain in one comparable form: lower-case, IDNA (``xn--``) when possible."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _address_key(addr: str) -> tuple[str, str] | None:
    """(local part, domain key) of an address, or None when it has no domain."""
    value = addr.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        return None
    return local.lower(), _domain_key(domain)


def sender_allowed(addr: str, allowed_senders: Iterable[str]) -> bool:
    """Whether an address matches the ``allowed_senders`` rules.

    Args:
        addr: The address to check (From, or a Reply-To candidate).
        allowed_senders: Entries as normalised by :func:`validate_sender_entry`.
            ``"@domain"`` matches that exact domain only, not its subdomains.

    Returns:
        True when an entry matches, case-insensitively. An address without a
        domain (or empty) never matches, not even ``"*"``; an empty list matches
        nothing.
    """
    key = _address_key(addr)
    if key is None:
        return False
    local, domain = key
    for raw_entry in allowed_senders:
        entry = raw_entry.strip().lower()
        if entry == ALLOW_ALL:
            return True
        entry_local, at, entry_domain = entry.rpartition("@")
        if not at or _domain_key(entry_domain) != domain:
            continue
        if not entry_local or entry_local == local:
            return True
    return False


def _is_own(addr: str, own_addresses: Iterable[str]) -> bool:
    key = _address_key(addr)
    return key is not None and any(key == _address_key(own) for own in own_addresses)


# -- Authentication-Results (RFC 8601) -------------------------------------------------


@attrs.frozen
class AuthResult:
    """One ``method=result`` clause of an Authentication-Results header.

    Attributes:
        method: Lower-cased method name without version (``"dkim"``).
        result: Lower-cased result (``"pass"``, ``"fail"``, ...).
        properties: ``(ptype.property, value)`` pairs, names lower-cased, values
            unquoted (``("header.d", "example.com")``).
    """

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The first value of property ``name`` (e.g. ``"header.d"``), or None."""
        for key, value in self.properties:
            if key == name:
                return value
        return None


@attrs.frozen
class AuthResultsHeader:
    """A parsed Authentication-Results header.

    Attributes:
        authserv_id: The id of the server that wrote it, as written.
        results: Its clauses in order; empty for ``none``.
    """

    authserv_id: str
    results: tuple[AuthResult, ...]


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (nested, with escapes), keeping quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            out.append(ch)
            if ch == '"':
                quoted = False
            continue
        if ch == "(":
            depth += 1
            continue
        if ch == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(" ")
            continue
        if depth:
            continue
        if ch == '"':
            quoted = True
        out.append(ch)
    return "".join(out)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|=|[^\s="]+')


def _unquote(token: str) -> str:
    if token.startswith('"'):
        inner = token[1:-1] if len(token) > 1 and token.endswith('"') else token[1:]
        return re.sub(r"\\(.)", r"\1", inner)
    return token


def _parse_resinfo(segment: str) -> AuthResult | None:
    tokens = _TOKEN.findall(segment)
    if len(tokens) < 3 or tokens[1] != "=" or tokens[0] == "=":
        return None
    method = tokens[0].split("/", 1)[0].strip().lower()
    result = _unquote(tokens[2]).lower()
    properties: list[tuple[str, str]] = []
    rest = tokens[3:]
    index = 0
    while index + 2 < len(rest):
        name, equals, value = rest[index : index + 3]
        if equals != "=" or "=" in (name, value):
            index += 1  # resynchronise on the next "name = value"
            continue
        properties.append((name.lower(), _unquote(value)))
        index += 3
    return AuthResult(method, result, tuple(properties))


def parse_authentication_results(value: str) -> AuthResultsHeader | None:
    """Parse one Authentication-Results value (RFC 8601 section 2.2).

    Comments in parentheses are ignored, quoted strings honoured, and clauses
    separated by ``;``. Unparseable clauses are skipped.

    Args:
        value: The header value, e.g.
            ``"mx.example.org; dkim=pass (good) header.d=x.org; spf=fail"``.

    Returns:
        The parsed header, or None when it is empty, too long
        (:data:`MAX_AUTH_RESULTS_CHARS`) or has no authserv-id.
    """
    if len(value) > MAX_AUTH_RESULTS_CHARS:
        return None
    segments = _split_outside_quotes(_strip_comments(value), ";")
    head = _TOKEN.findall(segments[0])
    if not head or head[0] == "=":
        return None
    authserv_id = _unquote(head[0])
    results: list[AuthResult] = []
    for segment in segments[1:]:
        if segment.strip().lower() == "none":
            continue
        parsed = _parse_resinfo(segment)
        if parsed is not None:
            results.append(parsed)
    return AuthResultsHeader(authserv_id, tuple(results))


def domains_aligned(domain: str, from_domain: str) -> bool:
    """Relaxed identifier alignment, approximated without the Public Suffix List.

    Two domains align when they are equal or one is a subdomain of the other
    (``mail.example.com`` and ``example.com``); for the subdomain case the shorter
    one must have at least two labels, so a bare TLD never aligns with anything. Without the PSL
    this treats e.g. ``co.uk`` as an organisation; only a registry could sign as
    such a name, so the approximation errs on the side of rejecting siblings
    (``a.example.com`` vs ``b.example.com`` do not align here, although DMARC
    relaxed mode would accept them).

    Args:
        domain: The authenticated domain (DKIM ``d=``, SPF MAIL FROM domain).
        from_domain: The domain of the From address.

    Returns:
        True when aligned.
    """
    a = _domain_key(domain)
    b = _domain_key(from_domain)
    if not a or not b:
        return False
    if a == b:
        return True
    shorter, longer = (a, b) if len(a) < len(b) else (b, a)
    return shorter.count(".") >= 1 and longer.endswith("." + shorter)


def _domain_of(value: str | None) -> str:
    if not value:
        return ""
    return value.rpartition("@")[2].strip().strip("<>").lower()


def check_authentication_results(message: Message, authserv_id: str) -> tuple[bool, str]:
    """Whether our receiving server authenticated the From domain.

    Only Authentication-Results headers written by ``authserv_id`` count, and of
    those only the topmost (the one our server added last; anything below it may
    have been written by the sender). Accepted when it shows ``dmarc=pass`` (with
    ``header.from``, when given, equal to the From domain), ``dkim=pass`` with
    ``header.d`` (or the domain of ``header.i``) aligned with the From domain, or
    ``spf=pass`` with the ``smtp.mailfrom`` domain aligned (see
    :func:`domains_aligned`).

    This is only meaningful when the receiving server removes or renames
    Authentication-Results headers with its own authserv-id that arrive from
    outside, as RFC 8601 section 5 requires and Postfix/Dovecot/Gmail setups do.

    Args:
        message: The message.
        authserv_id: The authserv-id the receiving server writes (case-insensitive).

    Returns:
        ``(accepted, detail)`` where ``detail`` says which result decided, for the
        log.
    """
    wanted = authserv_id.strip().lower()
    header: AuthResultsHeader | None = None
    for raw in message.authentication_results:
        parsed = parse_authentication_results(raw)
        if parsed is not None and parsed.authserv_id.lower() == wanted:
            header = parsed
            break
    if header is None:
        return False, f"no Authentication-Results from {authserv_id}"
    from_domain = message.from_.domain
    if not from_domain:
        return False, "no From domain to align with"
    seen: list[str] = []
    for result in header.results:
        seen.append(f"{result.method}={result.result}")
        if result.result != "pass":
            continue
        if result.method == "dmarc":
            header_from = result.get("header.from")
            if header_from is None or _domain_key(_domain_of(header_from)) == _domain_key(
                from_domain
            ):
                return True, "dmarc=pass"
        elif result.method == "dkim":
            signer = result.get("header.d") or _domain_of(result.get("header.i"))
            if signer and domains_aligned(signer, from_domain):
                return True, f"dkim=pass header.d={signer}"
            seen[-1] += " (unaligned)"
        elif result.method == "spf":
            mail_from = _domain_of(result.get("smtp.mailfrom"))
            if mail_from and domains_aligned(mail_from, from_domain):
                return True, f"spf=pass smtp.mailfrom={mail_from}"
            seen[-1] += " (unaligned)"
    return False, " ".join(seen) or "no results"


# -- loop guards (RFC 3834) -------------------------------------------------------------


def _first_word(value: str) -> str:
    cleaned = _strip_comments(value).replace(";", " ").split()
    return cleaned[0].lower() if cleaned else ""


def _local_part(addr: str | None) -> str:
    if not addr:
        return ""
    return addr.strip().strip("<>").rpartition("@")[0].lower() or addr.strip().lower()


def loop_guard_reason(
    message: Message,
    *,
    own_addresses: Sequence[str],
    is_our_message_id: Callable[[str], bool],
) -> str | None:
    """The reason a message must never be answered, or None.

    A reply to our mail is never refused for naming our Message-IDs in
    In-Reply-To/References, however many: that is what a long conversation looks
    like. Only a message whose *own* Message-ID is ours is a loop here.

    Args:
        message: The message.
        own_addresses: Our addresses (``from_address``, the login, aliases).
        is_our_message_id: Tells whether a Message-ID (``"<...>"``) is one we sent.

    Returns:
        ``"own-address"``, ``"loop"``, ``"bounce"``, ``"auto-submitted"``,
        ``"bulk"`` or ``"list-mail"``; None when no guard applies.
    """
    if any(_is_own(a.addr, own_addresses) for a in message.from_all):
        return "own-address"
    if is_our_message_id(message.message_id):
        return "loop"
    if message.return_path == "" or message.content_type == "multipart/report":
        return "bounce"
    senders = [a.addr for a in message.from_all] + [message.sender or "", message.return_path or ""]
    if any(_local_part(addr) in _BOUNCE_LOCAL_PARTS for addr in senders):
        return "bounce"
    if message.auto_submitted is not None and _first_word(message.auto_submitted) != "no":
        return "auto-submitted"
    if message.precedence is not None and _first_word(message.precedence) in _BULK_PRECEDENCE:
        return "bulk"
    if message.list_id is not None or message.list_unsubscribe is not None:
        return "list-mail"
    return None


# -- rate limit -----------------------------------------------------------------------


class ReplyRateLimiter(SenderRateLimiter):
    """The per-sender volume limit under its configuration names: a token bucket.

    :class:`prxmail.conversation.SenderRateLimiter` with ``max_replies`` as the
    sustained rate per ``window_secs`` and, unless ``burst`` is given, a bucket of
    ``max_replies`` (a whole window's allowance at once, as the sliding window it
    replaces allowed). Over the limit :meth:`admit` returns when to try again: the
    message is deferred, never rejected.
    """

    def __init__(
        self,
        max_replies: int,
        window_secs: float,
        *,
        burst: int | None = None,
        max_senders: int = DEFAULT_MAX_TRACKED_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a limiter.

        Args:
            max_replies: Messages per sender per window, sustained (>= 1).
            window_secs: The window length in seconds (> 0).
            burst: Messages a sender may have at once; None means ``max_replies``.
            max_senders: How many senders are remembered at most (>= 1).
            clock: Monotonic seconds; inject ``trio.current_time`` or a fake in
                tests.

        Raises:
            ValueError: A bound is out of range.
        """
        super().__init__(
            max_replies, window_secs, burst=burst, max_senders=max_senders, clock=clock
        )


# -- the entry point -------------------------------------------------------------------


def _normalise_entries(entries: Iterable[str]) -> tuple[str, ...]:
    return tuple(validate_sender_entry(entry) for entry in entries)


def _normalise_own(entries: Iterable[str]) -> tuple[str, ...]:
    return tuple(entry.strip().lower() for entry in entries if entry.strip())


@attrs.frozen
class SenderPolicy:
    """What :func:`evaluate` checks.

    Attributes:
        allowed_senders: Entries, validated and normalised on construction by
            :func:`validate_sender_entry` (``ValueError`` for bad ones). Empty
            allows nobody; ``"*"`` everybody.
        own_addresses: Our own addresses; mail from them is never answered.
        authserv_id: When set, require an authenticated From (see
            :func:`check_authentication_results`); off (None) by default.
    """

    allowed_senders: tuple[str, ...] = attrs.field(default=(), converter=_normalise_entries)
    own_addresses: tuple[str, ...] = attrs.field(default=(), converter=_normalise_own)
    authserv_id: str | None = None


@attrs.frozen
class Verdict:
    """The outcome of :func:`evaluate`.

    Attributes:
        accepted: True when the message is to be handed on (and may be answered).
        reason: ``"accepted"`` or a short machine-friendly reason (see the module
            documentation for the list).
        detail: Human-readable context for the log (never secret); may be empty.
        retry_at: Set (rate-limiter clock seconds) when the message is only
            *deferred*: keep it, unseen, and evaluate it again then. None for an
            acceptance or a refusal.
    """

    accepted: bool
    reason: str
    detail: str = ""
    retry_at: float | None = None

    @property
    def deferred(self) -> bool:
        """True when the message is to be kept and looked at again, not refused."""
        return self.retry_at is not None


def evaluate(
    message: Message,
    policy: SenderPolicy,
    *,
    is_our_message_id: Callable[[str], bool],
    rate_limiter: SenderRateLimiter | None = None,
) -> Verdict:
    """Decide whether a received message is handed on and answered.

    The checks run in the order listed in the module documentation; the first
    failing one is the verdict. The rate limiter is consulted last and a message
    is counted against the sender only when everything else accepted; over the
    limit the verdict is a deferral (:attr:`Verdict.deferred`), not a refusal.

    Args:
        message: The parsed message.
        policy: The rules.
        is_our_message_id: Whether a Message-ID is one we sent (from the state
            store).
        rate_limiter: Per-sender volume limit, or None for no limit.

    Returns:
        The verdict.
    """
    guard = loop_guard_reason(
        message,
        own_addresses=policy.own_addresses,
        is_our_message_id=is_our_message_id,
    )
    if guard is not None:
        return Verdict(False, guard)
    if not message.from_all or _address_key(message.from_.addr) is None:
        return Verdict(False, "no-sender")
    if len(message.from_all) > 1:
        return Verdict(False, "ambiguous-sender", f"{len(message.from_all)} From mailboxes")
    if not sender_allowed(message.from_.addr, policy.allowed_senders):
        return Verdict(False, "sender-not-allowed")
    if policy.authserv_id is not None:
        passed, detail = check_authentication_results(message, policy.authserv_id)
        if not passed:
            return Verdict(False, "auth-results-failed", detail)
    if rate_limiter is not None:
        retry_at = rate_limiter.admit(message.from_.addr)
        if retry_at is not None:
            return Verdict(
                False,
                "rate-limited",
                f"over {rate_limiter.burst} at once; deferred, not refused",
                retry_at=retry_at,
            )
    return Verdict(True, "accepted")


def choose_reply_recipient(message: Message, policy: SenderPolicy) -> Address:
    """Whom a reply to ``message`` goes to.

    Reply-To is honoured only when that address is itself allowed by
    ``policy.allowed_senders`` (and is not our own): otherwise anyone allowed
    could make us mail arbitrary third parties.

    Args:
        message: The message being answered.
        policy: The rules.

    Returns:
        The first allowed Reply-To mailbox, else the From mailbox.
    """
    for candidate in message.reply_to:
        if sender_allowed(candidate.addr, policy.allowed_senders) and not _is_own(
            candidate.addr, policy.own_addresses
        ):
            return candidate
    return message.from_
