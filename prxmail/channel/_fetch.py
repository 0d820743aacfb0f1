"""The fetch pipeline: UIDs in, parsed, claimed and admitted messages out.

Theory of operation: new UIDs are fetched in bounded groups (sizes first, then
bodies, at most ``max_message_bytes`` per command; a single new message comes with
its size in one round trip). In a catch-up three tasks share the work: one fetches
the groups and starts their parse; one admits them in UID order -- it *claims* a
group in the state store in one transaction (which advances the high-water mark)
and runs the sender policy; one hands the accepted messages on one by one. So the
next groups' round trips and claims overlap the consumer's work on this one, and
about three groups are in memory at once (one handed on, one admitted, one fetched).

Parsing is CPU work: it runs in a worker thread (``trio.to_thread.run_sync``) under
a limiter of its own (:func:`parse_limiter`), except for a message small and plain
enough that the thread hop would cost more than the parse (:func:`parse_inline`).

Messages over ``max_message_bytes`` are delivered without loading them whole: the
pipeline fetches their BODYSTRUCTURE, their header section and only the body parts
that carry readable text (``text/plain`` and ``text/html`` parts that are not
attachments, each cut at the limit). :func:`text_sections` picks those parts and
their IMAP section numbers; :func:`build_substitute` glues header and parts into a
small, well-formed ``multipart/mixed`` message that the ordinary parser reads;
:func:`describe_attachments` lists every other part by name, type and estimated
size from the BODYSTRUCTURE alone.

Poison mail: whatever a fetch command is fetching is noted (``_fetching``), so a
session that ends in a failure caused by what the server sent for those messages
(a refused response, a NO/BAD, a timeout -- not a dropped link) can be pinned on
them: a failed group is then fetched one message at a time, and a single message
that fails :data:`POISON_ATTEMPTS` times in a row the same way is recorded failed
with the reason, so the folder moves on. The connection's literal limit is
``max_message_bytes`` and a body longer than its RFC822.SIZE is cut to it and
marked truncated, so no server can hand the consumer more than it was asked for.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

import attrs
import trio

from prxmail._log import log_event
from prxmail.channel._conversations import _Conversations
from prxmail.channel._core import (
    _COMMAND_TIMEOUT,
    _describe,
    _message_fields,
    _time_limit,
    collapse_exception_group,
)
from prxmail.errors import ConnectionBrokenError, IMAPCommandError, RemoteProtocolError
from prxmail.imap import BodyPart, BodyStructure, IMAPConnection, MultipartBody
from prxmail.message import (
    MAX_MIME_PARTS,
    Attachment,
    Message,
    missing_message_id,
    parse_message,
    sanitize_filename,
)
from prxmail.state import ClaimOutcome, MessageKey, MessageStatus, own_id_predicate

# A catch-up fetches messages in groups of at most this many bytes (a larger message is a
# group of its own, up to max_message_bytes). While one group is parsed the next is
# fetched and the previous one handed on, so about three groups are in memory at once:
# 2 MiB keeps that near 6 MiB of raw mail while each FETCH is still large enough that
# the round trips do not show (measured: 1 MiB was slower, 4 MiB no faster and bigger).
GROUP_BYTES: Final = 2 * 1024 * 1024

# A single new message is fetched together with its size, up to this many bytes: all of
# most mail in one round trip. A larger one costs a second fetch (of the whole message,
# or of its text parts when over max_message_bytes); the bound keeps what a guess can
# waste on an oversized message small.
FIRST_FETCH_BYTES: Final = 1024 * 1024

# A message whose fetch fails the same way this many times in a row (each time on a
# fresh connection) is recorded as failed and the folder moves on. One failure can be
# a glitch and two a coincidence (a server restart hitting the same message); a third
# identical one is the message itself, and every retry costs a reconnect, so waiting
# longer only delays the mail behind it.
POISON_ATTEMPTS: Final = 3


# -- where a parse runs -----------------------------------------------------------------
#
# A parse holds the event loop for as long as it takes, and its time depends on the
# message's shape far more than on its size: hostile messages of a few KiB (a few
# hundred nested multiparts, a thousand tiny parts, hundreds of address or Received
# fields, hundreds of encoded words) take 10-400 ms (bench/hostile_parse.py). So a
# group is parsed on the loop only when it is small *and* each structure that makes
# parsing slow is rare in it; everything else goes to a worker thread (the hop costs
# about 100-200 us). The bounds come from the per-item costs measured there (best of
# five on a 2-core machine): a nesting level or tiny part up to 160 us, an address
# or address field about 115 us, a Received field 130 us, an encoded word 45 us, a
# parameter 25 us, a header line 10 us, an HTML tag or a quote/comment/escape in an
# address 5 us, an HTML character reference 1 us. Within all of them at once a parse
# stays under about 3 ms. Typical mail from a small MTA passes; a message with a long
# header (DKIM, ARC, many Received), many parts or much HTML takes the thread.

# Total raw bytes of a group parsed on the loop. Shapes with none of the structures
# below still cost up to about 0.35 us a byte (an HTML body of white space or
# character references), so 8 KiB stays under 3 ms; plain text costs a tenth of that.
INLINE_PARSE_BYTES: Final = 8 * 1024
# Boundary-like lines ("\n--"): each can open a part or a nesting level.
INLINE_MAX_BOUNDARY_LINES: Final = 8
# Lines of the top-level header section (fields and their folds).
INLINE_MAX_HEADER_LINES: Final = 24
# "@" anywhere: every address costs a scan, in headers and in part headers.
INLINE_MAX_AT_SIGNS: Final = 16
# RFC 2047 encoded-word openers ("=?").
INLINE_MAX_ENCODED_WORDS: Final = 16
# ";" anywhere: header parameters (and Received fields' dates).
INLINE_MAX_SEMICOLONS: Final = 32
# "<" anywhere: HTML tags, bracketed addresses and Message-IDs.
INLINE_MAX_ANGLE_BRACKETS: Final = 64
# '"', "(" and "\\" anywhere: quoted strings, comments and escapes, which send an
# address to mail-parser's slow scanner.
INLINE_MAX_QUOTES: Final = 32

# Parse threads running at once, for every channel in this trio run together. The
# parse is pure Python and holds the GIL, so more threads add no throughput, only
# memory (each holds a group of up to GROUP_BYTES raw plus its decoded copies); two
# let one channel's large group not hold up every other channel's. The limiter is
# separate from trio's default one, so parses never wait behind (or crowd out) other
# worker-thread jobs.
PARSE_THREADS: Final = 2

_PARSE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "prxmail_parse_limiter"
)


def parse_limiter() -> trio.CapacityLimiter:
    """The parse limiter of the current trio run (created on first use).

    Returns:
        A limiter of :data:`PARSE_THREADS` tokens shared by every channel in the run.
    """
    try:
        return _PARSE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(PARSE_THREADS)
        _PARSE_LIMITER.set(limiter)
        return limiter


def _header_lines(raw: bytes) -> int:
    crlf = raw.find(b"\n\r\n", 0, INLINE_PARSE_BYTES)
    lf = raw.find(b"\n\n", 0, INLINE_PARSE_BYTES if crlf < 0 else crlf)
    ends = [i for i in (crlf, lf) if i >= 0]
    return raw.count(b"\n", 0, min(ends) if ends else len(raw)) + 1


def parse_inline(raws: Sequence[bytes]) -> bool:
    """Whether a group is cheap enough to parse on the event loop (see above).

    Args:
        raws: The raw messages of one group.

    Returns:
        True when their total size and, summed over them, every costly structure
        are within the ``INLINE_*`` bounds. The test counts bytes in C and costs a
        few microseconds for the largest group it accepts.
    """
    if sum(len(raw) for raw in raws) > INLINE_PARSE_BYTES:
        return False
    return (
        sum(raw.count(b"\n--") for raw in raws) <= INLINE_MAX_BOUNDARY_LINES
        and sum(_header_lines(raw) for raw in raws) <= INLINE_MAX_HEADER_LINES
        and sum(raw.count(b"@") for raw in raws) <= INLINE_MAX_AT_SIGNS
        and sum(raw.count(b"=?") for raw in raws) <= INLINE_MAX_ENCODED_WORDS
        and sum(raw.count(b";") for raw in raws) <= INLINE_MAX_SEMICOLONS
        and sum(raw.count(b"<") for raw in raws) <= INLINE_MAX_ANGLE_BRACKETS
        and sum(raw.count(b'"') + raw.count(b"(") + raw.count(b"\\") for raw in raws)
        <= INLINE_MAX_QUOTES
    )


_Parsed = list[tuple[int, Message | Exception]]
# A group's accepted messages in UID order, the first already begun.
_Admitted = list[tuple[MessageKey, Message]]


def _parse_all(
    uidvalidity: int, raws: list[tuple[int, bytes]], max_attachment_bytes: int
) -> _Parsed:
    """Parse a group; a message that cannot be parsed comes back as its exception.

    It is recorded as failed when the group is claimed, because one poison message
    must not stall the folder (it would be fetched and fail again on every
    reconnect). ``raws`` is emptied as it goes, so each raw message is freed once it
    is parsed.
    """
    parsed: _Parsed = []
    raws.reverse()
    while raws:
        uid, raw = raws.pop()
        try:
            item: Message | Exception = parse_message(
                raw, uid=uid, uidvalidity=uidvalidity, max_attachment_bytes=max_attachment_bytes
            )
        except Exception as exc:
            item = exc
        del raw
        parsed.append((uid, item))
    return parsed


# -- messages over max_message_bytes ----------------------------------------------------

OVERSIZE_DEFECT = "too-large"

# Text parts fetched per oversized message: a mail with more readable parts than this is
# not correspondence; the bound keeps the number of FETCH sections small.
MAX_TEXT_SECTIONS = 8

# Header fields of the original that describe its (not loaded) body; they are replaced
# by our own multipart/mixed framing in the substitute.
_BODY_FIELDS = re.compile(rb"(?i)^(content-type|content-transfer-encoding|mime-version)\s*:")
_SAFE_PARAM = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


@attrs.frozen
class TextSection:
    """A readable text part of an oversized message.

    Attributes:
        section: The IMAP section number, e.g. ``"1"`` or ``"2.1"``.
        subtype: ``"plain"`` or ``"html"``.
        charset: The declared charset, when it is a plain token.
        encoding: The Content-Transfer-Encoding, lower-cased.
        size: The encoded size the server reported.
    """

    section: str
    subtype: str
    charset: str | None
    encoding: str
    size: int


def _walk(node: BodyStructure, prefix: str, depth: int = 0) -> Iterator[tuple[str, BodyPart]]:
    if depth > 32:  # as message.MAX_MIME_DEPTH: deeper trees are hostile
        return
    if isinstance(node, MultipartBody):
        for index, child in enumerate(node.parts, start=1):
            number = f"{prefix}.{index}" if prefix else str(index)
            yield from _walk(child, number, depth + 1)
        return
    yield (prefix or "1"), node


def _is_attachment(part: BodyPart) -> bool:
    return part.disposition is not None and part.disposition[0].lower() == "attachment"


def text_sections(structure: BodyStructure) -> list[TextSection]:
    """The readable text parts of a message, in MIME order.

    Args:
        structure: The message's BODYSTRUCTURE.

    Returns:
        At most :data:`MAX_TEXT_SECTIONS` ``text/plain`` or ``text/html`` parts that
        are not marked as attachments.
    """
    found: list[TextSection] = []
    for number, part in _walk(structure, ""):
        if part.type != "text" or part.subtype not in ("plain", "html") or _is_attachment(part):
            continue
        charset = part.params.get("charset")
        found.append(
            TextSection(
                section=number,
                subtype=part.subtype,
                charset=charset if charset and _SAFE_PARAM.match(charset) else None,
                encoding=(part.encoding or "7bit").lower(),
                size=part.size,
            )
        )
        if len(found) >= MAX_TEXT_SECTIONS:
            break
    return found


def _decoded_size(part: BodyPart) -> int:
    if (part.encoding or "").lower() == "base64":
        # MIME base64 is written in 76-character lines plus CRLF: 57 bytes per 78.
        return part.size * 57 // 78
    return part.size


def describe_attachments(structure: BodyStructure) -> tuple[Attachment, ...]:
    """Every part that is not readable text, by name, type and estimated size.

    The content is never loaded (``content`` is ``None``); the size is the decoded size
    estimated from the encoded size the server reported.

    Args:
        structure: The message's BODYSTRUCTURE.

    Returns:
        The attachments, in MIME order, at most :data:`MAX_MIME_PARTS`.
    """
    found: list[Attachment] = []
    for number, part in _walk(structure, ""):
        readable = part.type == "text" and part.subtype in ("plain", "html")
        if readable and not _is_attachment(part):
            continue
        content_type = f"{part.type}/{part.subtype}".lower()
        name = None
        if part.disposition is not None:
            name = part.disposition[1].get("filename")
        name = name or part.params.get("name")
        found.append(
            Attachment(
                filename=sanitize_filename(name, index=len(found) + 1, content_type=content_type),
                content_type=content_type,
                size=_decoded_size(part),
                content=None,
            )
        )
        if number and len(found) >= MAX_MIME_PARTS:
            break
    return tuple(found)


def _strip_body_fields(header: bytes) -> bytes:
    kept: list[bytes] = []
    skipping = False
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.strip():
            continue
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = bool(_BODY_FIELDS.match(line))
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)


def build_substitute(
    header: bytes, parts: list[tuple[TextSection, bytes]], *, note: str = ""
) -> bytes:
    """A small well-formed message standing in for an oversized one.

    Args:
        header: The original header section (``BODY.PEEK[HEADER]``).
        parts: Each readable text section with its (possibly cut) encoded body.
        note: Optional text appended as a last ``text/plain`` part, e.g. what was left
            out; empty for none.

    Returns:
        The substitute message: the original header fields except the body-describing
        ones, then a ``multipart/mixed`` body holding the parts with their original
        type, charset and transfer encoding.
    """
    boundary = "prxmail-oversize-" + secrets.token_hex(12)
    out = [_strip_body_fields(header)]
    out.append(b"MIME-Version: 1.0")
    out.append(f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode("ascii"))
    out.append(b"")
    for section, body in parts:
        out.append(f"--{boundary}".encode("ascii"))
        charset = f"; charset={section.charset}" if section.charset else ""
        out.append(f"Content-Type: text/{section.subtype}{charset}".encode("ascii"))
        encoding = section.encoding if _SAFE_PARAM.match(section.encoding) else "8bit"
        out.append(f"Content-Transfer-Encoding: {encoding}".encode("ascii"))
        out.append(b"")
        out.append(body.replace(f"--{boundary}".encode("ascii"), b"- -"))
    if note:
        out.append(f"--{boundary}".encode("ascii"))
        out.append(b"Content-Type: text/plain; charset=utf-8")
        out.append(b"Content-Transfer-Encoding: 8bit")
        out.append(b"")
        out.append(note.encode("utf-8"))
    out.append(f"--{boundary}--".encode("ascii"))
    out.append(b"")
    return b"\r\n".join(out)


# -- the pipeline ---------------------------------------------------------------------


class _ParseJob:
    """A group's parse, already done or running in a worker thread.

    :meth:`_FetchPipeline._process_uids` starts one in its nursery and goes on
    fetching; :meth:`result` waits for it. A job whose pipeline gave up (cancelled,
    or the connection broke) is dropped at once: its thread is abandoned to finish
    its bounded work (holding its parse-limiter token until then) and the result is
    freed. Nothing was claimed, so the messages are fetched again.
    """

    def __init__(self, parsed: _Parsed | None = None) -> None:
        self._finished = trio.Event()
        self._parsed: _Parsed = []
        if parsed is not None:
            self._parsed = parsed
            self._finished.set()

    @classmethod
    def in_thread(cls, nursery: trio.Nursery, work: Callable[[], _Parsed]) -> _ParseJob:
        job = cls()
        nursery.start_soon(job._run, work, name="prxmail-parse")
        return job

    async def _run(self, work: Callable[[], _Parsed]) -> None:
        self._parsed = await trio.to_thread.run_sync(
            work, limiter=parse_limiter(), abandon_on_cancel=True
        )
        self._finished.set()

    async def result(self) -> _Parsed:
        """Wait for the parse; every message comes back parsed or as its exception."""
        await self._finished.wait()
        return self._parsed


class _FetchPipeline(_Conversations):
    """The fetch pipeline of a channel's watcher (see the module comment)."""

    async def _process_pending(self, conn: IMAPConnection, uidvalidity: int) -> None:
        if not self._pending_dirty:
            return
        self._pending_dirty = False
        pending = await self._store.pending(self.account, self.folder)
        current: list[int] = []
        for record in pending:
            if record.key in self._in_flight:
                continue
            if record.key.uidvalidity != uidvalidity:
                await self._store.mark_failed(
                    record.key, "uidvalidity changed before it was handled"
                )
                log_event(
                    logging.ERROR,
                    "message lost its UID (UIDVALIDITY changed) before it"
                    " was handled; recorded as failed",
                    uid=record.key.uid,
                    message_id=record.message_id,
                )
                continue
            current.append(record.key.uid)
        if current:
            await self._process_uids(conn, uidvalidity, current)

    async def _process_uids(
        self, conn: IMAPConnection, uidvalidity: int, uids: Sequence[int]
    ) -> None:
        ordered = sorted(set(uids))
        if self._given_up:
            ordered = [u for u in ordered if self._keys(uidvalidity, [u])[0] not in self._given_up]
            if not ordered:
                return
        if len(ordered) == 1 or not self._isolate.isdisjoint(self._keys(uidvalidity, ordered)):
            # One by one, in UID order: a claim raises the high-water mark, so a message
            # is only ever failed after everything below it was claimed.
            for uid in ordered:
                await self._process_one(conn, uidvalidity, uid)
                self._isolate.discard(MessageKey(self.account, self.folder, uidvalidity, uid))
            return
        # Groups are fetched and parsed in this task while two others admit them and
        # hand them on (see _pipeline): at most about three groups are in memory at
        # once, and groups are still claimed strictly in UID order, since a claim raises
        # the high-water mark. Those tasks and the parse threads run in this nursery, so
        # none outlives the catch-up; what the body raises leaves it unwrapped (as the
        # watcher expects).
        collapsed: BaseException
        try:
            async with trio.open_nursery() as nursery:
                await self._pipeline(conn, uidvalidity, ordered, nursery)
        except BaseExceptionGroup as group:
            collapsed = collapse_exception_group(group)
        else:
            return
        # Raised outside the except block so the group does not become its __context__.
        raise collapsed

    async def _pipeline(
        self, conn: IMAPConnection, uidvalidity: int, ordered: list[int], nursery: trio.Nursery
    ) -> None:
        """Fetch groups in this task while a second claims and admits them and a third
        hands them on (:meth:`_admit_in_order`, :meth:`_hand_on_in_order`).

        The three meet at channels of capacity 0: a fetched group (its parse started)
        waits until the one before it is admitted, an admitted group until the one
        before it is handed on completely. So the next groups' round trips (sizes,
        bodies, the \\Seen flags) and their claims overlap the consumer's work on the
        current one, and about three groups are in memory at once: one being handed
        on, one admitted, one fetched. Where the high-water mark must not pass an
        unclaimed message (an oversized message, UIDs the server no longer has), this
        task first waits until everything before is handed on (``drain``).
        """
        config = self.config
        timeout = config.command_timeout_secs
        group_limit = min(config.max_message_bytes, GROUP_BYTES)
        send_job, receive_job = trio.open_memory_channel[_ParseJob | trio.Event](0)
        send_admitted, receive_admitted = trio.open_memory_channel[_Admitted | trio.Event](0)
        nursery.start_soon(
            self._admit_in_order, uidvalidity, receive_job, send_admitted, name="prxmail-admit"
        )
        nursery.start_soon(self._hand_on_in_order, receive_admitted, name="prxmail-hand-on")

        async def flagging(wait: Callable[[], Awaitable[None]]) -> None:
            # While this task waits, the consumer goes on finishing messages: their
            # \\Seen flags are stored whenever half of SEEN_BUFFER is waiting, so none
            # is dropped. A cancelled send sends nothing; an event wait is repeatable.
            while True:
                with trio.CancelScope() as wake:
                    self._seen_wake = wake
                    try:
                        await wait()
                    finally:
                        self._seen_wake = None
                if not wake.cancelled_caught:
                    return
                await self._flag_seen(conn, uidvalidity)

        async def drain() -> None:
            admitted = trio.Event()
            await flagging(functools.partial(send_job.send, admitted))
            await flagging(admitted.wait)

        async def fetch_group(uids: list[int]) -> None:
            if not uids:
                return
            raws = await self._fetch_bodies(conn, uidvalidity, uids, sizes)
            await flagging(
                functools.partial(send_job.send, self._start_parse(uidvalidity, raws, nursery))
            )

        async with send_job:  # closing it ends the admitting task once it is done
            for start in range(0, len(ordered), config.fetch_batch_size):
                batch = ordered[start : start + config.fetch_batch_size]
                sizes: dict[int, int] = {}
                self._fetching = self._keys(uidvalidity, batch)
                with _time_limit(timeout, "IMAP UID FETCH (sizes)", _COMMAND_TIMEOUT):
                    async for data in conn.uid_fetch(batch, ["RFC822.SIZE"]):
                        if data.uid is not None:
                            sizes[data.uid] = data.rfc822_size or 0
                self._fetching = ()
                group: list[int] = []
                group_bytes = 0
                for uid in batch:
                    if uid not in sizes:
                        continue  # expunged meanwhile
                    size = sizes[uid]
                    if size > config.max_message_bytes:
                        await fetch_group(group)
                        group, group_bytes = [], 0
                        await drain()
                        await self._process_oversized(conn, uidvalidity, uid, size)
                        continue
                    if group and group_bytes + size > group_limit:
                        await fetch_group(group)
                        group, group_bytes = [], 0
                    group.append(uid)
                    group_bytes += size
                await fetch_group(group)
                missing = [uid for uid in batch if uid not in sizes]
                if missing:
                    log_event(
                        logging.INFO,
                        "messages listed by SEARCH but not returned by FETCH: treated as"
                        " expunged, skipped",
                        uids=",".join(map(str, missing[:20])),
                        count=len(missing),
                    )
                    await drain()  # the mark must not pass an unclaimed message
                    await self._advance_past(uidvalidity, max(missing))
                # A long catch-up finishes messages faster than the end of the catch-up
                # comes: flag them as it goes, so SEEN_BUFFER never overflows.
                await self._flag_seen(conn, uidvalidity)
            await drain()  # flagging while the last groups are handed on

    async def _admit_in_order(
        self,
        uidvalidity: int,
        jobs: trio.MemoryReceiveChannel[_ParseJob | trio.Event],
        admitted: trio.MemorySendChannel[_Admitted | trio.Event],
    ) -> None:
        """Claim and admit the fetched groups in the order they come, which is UID
        order (a claim raises the high-water mark), and pass them on to be handed on."""
        async with jobs, admitted:
            async for job in jobs:
                if isinstance(job, trio.Event):
                    await admitted.send(job)
                    continue
                accepted = await self._claim_and_admit(uidvalidity, await job.result())
                if not accepted:
                    continue
                try:
                    await admitted.send(accepted)
                except BaseException:
                    # Admitted, never handed on: the rest stays claimed, for the next
                    # round's pending(); the first one is begun, and is released with
                    # the other in-flight messages, as when its hand-over is cut.
                    key, message = accepted[0]
                    self._in_flight[key] = message
                    self._pending_dirty = True
                    raise

    async def _hand_on_in_order(
        self, admitted: trio.MemoryReceiveChannel[_Admitted | trio.Event]
    ) -> None:
        """Hand the admitted groups on in order; an event is set once everything before
        it is handed on."""
        async with admitted:
            async for item in admitted:
                if isinstance(item, trio.Event):
                    item.set()
                else:
                    await self._hand_on(item)

    async def _advance_past(self, uidvalidity: int, uid: int) -> None:
        """Move the high-water mark past UIDs the server listed but no longer has."""
        self._high_water = await self._store.advance_high_water_mark(
            self.account, self.folder, uidvalidity, uid
        )

    async def _process_one(self, conn: IMAPConnection, uidvalidity: int, uid: int) -> None:
        """The usual push: one new message. Its size and its first
        :data:`FIRST_FETCH_BYTES` come in one round trip, which is all of most mail;
        a larger message is then fetched whole, or as text parts when oversized."""
        limit = self.config.max_message_bytes
        first = min(limit, FIRST_FETCH_BYTES)
        size: int | None = None
        body: bytes | None = None
        self._fetching = self._keys(uidvalidity, [uid])
        with _time_limit(self.config.command_timeout_secs, "IMAP UID FETCH", _COMMAND_TIMEOUT):
            async for data in conn.uid_fetch([uid], ["RFC822.SIZE", f"BODY.PEEK[]<0.{first}>"]):
                if data.uid == uid:
                    size = data.rfc822_size
                    value = data.sections.get("<0>")
                    body = None if value is None else bytes(value)
        if size is None:
            log_event(
                logging.INFO,
                "message listed by SEARCH but not returned by FETCH: treated as expunged, skipped",
                uid=uid,
            )
            self._fetching = ()
            await self._advance_past(uidvalidity, uid)  # expunged meanwhile
            return
        if body is None:
            raise RemoteProtocolError(f"the server did not return message UID {uid}")
        self._fetching = ()
        # A server whose RFC822.SIZE is off could make a cut-off message look whole: a
        # body that fills the partial fetch completely is only trusted with a matching size.
        if size > first or (len(body) >= first and len(body) != size):
            del body
            if size > limit:
                await self._process_oversized(conn, uidvalidity, uid, size)
            else:
                raws = await self._fetch_bodies(conn, uidvalidity, [uid], {uid: size})
                await self._parse_and_admit(uidvalidity, raws)
            return
        await self._parse_and_admit(
            uidvalidity, [(uid, self._within_size(uidvalidity, uid, body, size))]
        )

    async def _parse_and_admit(self, uidvalidity: int, raws: list[tuple[int, bytes]]) -> None:
        await self._admit(uidvalidity, await self._parse(uidvalidity, raws))

    async def _fetch_bodies(
        self, conn: IMAPConnection, uidvalidity: int, uids: list[int], sizes: dict[int, int]
    ) -> list[tuple[int, bytes]]:
        """Fetch whole messages whose RFC822.SIZE (``sizes``) is within max_message_bytes.

        A body longer than its RFC822.SIZE is cut to that size and the message marked
        truncated (:data:`OVERSIZE_DEFECT`): the size decided that it fits in memory
        and in the handler's input, so the server may not change it afterwards. (The
        connection's literal limit is max_message_bytes, so nothing larger than that
        is ever received.)
        """
        bodies: dict[int, bytes] = {}
        self._fetching = self._keys(uidvalidity, uids)
        with _time_limit(self.config.command_timeout_secs, "IMAP UID FETCH", _COMMAND_TIMEOUT):
            async for data in conn.uid_fetch(uids, ["BODY.PEEK[]"]):
                if data.uid is not None and data.body is not None:
                    bodies[data.uid] = bytes(data.body)
        raws: list[tuple[int, bytes]] = []
        for uid in uids:
            raw = bodies.pop(uid, None)
            if raw is None:
                # Expunged since the size probe, or a server fault. Going on would claim
                # a higher UID and move the high-water mark past this one, losing it:
                # reconnect instead (a vanished message is not listed next time).
                raise RemoteProtocolError(f"the server did not return message UID {uid}")
            raws.append((uid, self._within_size(uidvalidity, uid, raw, sizes.get(uid))))
        self._fetching = ()
        return raws

    def _within_size(self, uidvalidity: int, uid: int, raw: bytes, size: int | None) -> bytes:
        """``raw`` cut to the RFC822.SIZE the server reported, marked when it was cut."""
        if size is None or len(raw) <= size:
            return raw
        log_event(
            logging.WARNING,
            "server sent a message longer than its RFC822.SIZE: cut to that size,"
            " delivered as truncated",
            uid=uid,
            size=size,
            received=len(raw),
        )
        self._cut.add(MessageKey(self.account, self.folder, uidvalidity, uid))
        return raw[:size]

    def _keys(self, uidvalidity: int, uids: Sequence[int]) -> tuple[MessageKey, ...]:
        return tuple(MessageKey(self.account, self.folder, uidvalidity, uid) for uid in uids)

    async def _fetch_failed(self, exc: BaseException) -> None:
        """Pin the failure that ended a session on the message being fetched, if any.

        Only failures that come from what the server sent for those messages count: a
        response the parser refused, a NO/BAD to the FETCH, a fetch that timed out. A
        dropped connection is the link's fault, not the message's. A failed group is
        fetched one message at a time from then on, so the culprit shows; a single
        message that fails :data:`POISON_ATTEMPTS` times in a row the same way is
        recorded failed with the reason, and the folder moves on.
        """
        keys, self._fetching = self._fetching, ()
        if not keys or isinstance(exc, ConnectionBrokenError):
            return
        if not isinstance(exc, RemoteProtocolError | IMAPCommandError | trio.TooSlowError):
            return
        if len(keys) > 1:
            self._isolate.update(keys)
            return
        [key] = keys
        reason = _describe(exc)
        previous, count = self._strikes.get(key, ("", 0))
        count = count + 1 if previous == reason else 1
        if count < POISON_ATTEMPTS:
            self._strikes[key] = (reason, count)
            return
        self._strikes.pop(key, None)
        self._isolate.discard(key)
        # Not fetched again in this run even where a search lists it once more (the
        # first start's UNSEEN search does until the folder is initialised).
        self._given_up.add(key)
        stored = f"fetch failed {count} times: {reason}"
        record = await self._store.get_message(key)
        if record is None:
            await self._store.claim_batch(
                [(key, missing_message_id(key.uid, key.uidvalidity))],
                failed={key: stored},
                message_ids=(),
            )
            self._high_water = max(self._high_water, key.uid)
        elif not record.status.terminal:
            await self._store.mark_failed(key, stored)
        # else finished before (a restart searched it again): nothing to record.
        log_event(
            logging.WARNING,
            "message failed: its fetch failed the same way every time; recorded as"
            " failed, the folder moves on",
            uid=key.uid,
            attempts=count,
            error=reason,
        )

    async def _process_oversized(
        self, conn: IMAPConnection, uidvalidity: int, uid: int, size: int
    ) -> None:
        limit = self.config.max_message_bytes
        timeout = self.config.command_timeout_secs
        structure: BodyStructure | None = None
        self._fetching = self._keys(uidvalidity, [uid])
        with _time_limit(timeout, "IMAP UID FETCH (BODYSTRUCTURE)", _COMMAND_TIMEOUT):
            async for data in conn.uid_fetch([uid], ["BODYSTRUCTURE"]):
                if data.uid == uid:
                    structure = data.bodystructure
        sections = text_sections(structure) if structure is not None else []
        items = ["BODY.PEEK[HEADER]"] + [f"BODY.PEEK[{s.section}]<0.{limit}>" for s in sections]
        header = b""
        found: dict[str, bytes] = {}
        with _time_limit(timeout, "IMAP UID FETCH (text parts)", _COMMAND_TIMEOUT):
            async for data in conn.uid_fetch([uid], items):
                for name, value in data.sections.items():
                    if value is None:
                        continue
                    if name.upper() == "HEADER":
                        header = bytes(value)
                    else:
                        found[name.split("<", 1)[0]] = bytes(value)
        if not header:
            raise RemoteProtocolError(f"the server did not return the header of UID {uid}")
        self._fetching = ()
        parts = [(s, found.get(s.section, b"")) for s in sections]
        raw = build_substitute(header, parts)
        [(_, parsed)] = await self._parse(uidvalidity, [(uid, raw)])
        if isinstance(parsed, Message):
            parsed = attrs.evolve(
                parsed,
                attachments=describe_attachments(structure) if structure is not None else (),
                size=size,
                defects=tuple(sorted({*parsed.defects, OVERSIZE_DEFECT})),
            )
            log_event(
                logging.INFO,
                "message over max_message_bytes: text parts only",
                uid=uid,
                size=size,
                limit=limit,
            )
        await self._admit(uidvalidity, [(uid, parsed)])

    def _mark_cut(self, uidvalidity: int, uid: int, message: Message) -> Message:
        key = MessageKey(self.account, self.folder, uidvalidity, uid)
        if key not in self._cut:
            return message
        self._cut.discard(key)
        return attrs.evolve(message, defects=tuple(sorted({*message.defects, OVERSIZE_DEFECT})))

    def _start_parse(
        self, uidvalidity: int, raws: list[tuple[int, bytes]], nursery: trio.Nursery
    ) -> _ParseJob:
        """Start parsing a fetched group: on the loop when :func:`parse_inline` says it
        is cheap, else in one worker-thread call (one hop, not one per message)."""
        work = functools.partial(_parse_all, uidvalidity, raws, self.config.max_attachment_bytes)
        if parse_inline([raw for _, raw in raws]):
            return _ParseJob(work())
        return _ParseJob.in_thread(nursery, work)

    async def _parse(self, uidvalidity: int, raws: list[tuple[int, bytes]]) -> _Parsed:
        """Parse a fetched group and wait for it (see :meth:`_start_parse`)."""
        work = functools.partial(_parse_all, uidvalidity, raws, self.config.max_attachment_bytes)
        if parse_inline([raw for _, raw in raws]):
            return work()
        return await trio.to_thread.run_sync(work, limiter=parse_limiter(), abandon_on_cancel=True)

    async def _admit(
        self, uidvalidity: int, parsed: Sequence[tuple[int, Message | Exception]]
    ) -> None:
        """Claim a fetched group in one transaction, apply the sender policy to it, and
        hand the accepted messages on in UID order."""
        await self._hand_on(await self._claim_and_admit(uidvalidity, parsed))

    async def _claim_and_admit(
        self, uidvalidity: int, parsed: Sequence[tuple[int, Message | Exception]]
    ) -> list[tuple[MessageKey, Message]]:
        """Claim a fetched group in one transaction and decide on it (sender policy,
        threads, limits): the accepted messages in UID order, the first already
        ``handling``."""
        if not parsed:
            return []
        pairs: list[tuple[MessageKey, str]] = []
        failed: dict[MessageKey, str] = {}
        if self._cut:
            parsed = [
                (uid, self._mark_cut(uidvalidity, uid, item) if isinstance(item, Message) else item)
                for uid, item in parsed
            ]
        for uid, item in parsed:
            key = MessageKey(self.account, self.folder, uidvalidity, uid)
            self._strikes.pop(key, None)
            if isinstance(item, Message):
                pairs.append((key, item.message_id))
            else:
                pairs.append((key, missing_message_id(uid, uidvalidity)))
                failed[key] = f"cannot parse: {_describe(item)}"
        batch = await self._store.claim_batch(
            pairs,
            failed=failed,
            message_ids=(
                ident
                for _, item in parsed
                if isinstance(item, Message)
                for ident in (
                    item.message_id,
                    *([item.in_reply_to] if item.in_reply_to else []),
                    *item.references,
                )
            ),
        )
        self._high_water = max(self._high_water, *(uid for uid, _ in parsed))
        candidates: list[tuple[MessageKey, Message]] = []
        for (uid, item), (key, _), result in zip(parsed, pairs, batch.results, strict=True):
            if not isinstance(item, Message):
                log_event(
                    logging.ERROR, "message failed: cannot parse", uid=uid, error=_describe(item)
                )
                continue
            if result.outcome is ClaimOutcome.DUPLICATE:
                log_event(
                    logging.INFO,
                    "message skipped: already processed (same Message-ID)",
                    **_message_fields(item),
                )
                self._counts["duplicates"] += 1
                continue
            if result.record.status is MessageStatus.CLAIMED and key not in self._in_flight:
                candidates.append((key, item))
        if not candidates:
            return []
        return await self._admit_candidates(candidates, own_id_predicate(batch.ours))

    async def _hand_on(self, accepted: list[tuple[MessageKey, Message]]) -> None:
        """Hand admitted messages on one by one, as the consumer asks for them."""
        try:
            for index, (key, message) in enumerate(accepted):
                self._in_flight[key] = message
                if index:
                    # Begun on the consumer's side, with the previous outcome (_api).
                    self._unbegun.add(key)
                try:
                    await self._message_send.send(message)
                except BaseException:
                    if key in self._unbegun:  # not handed over: still claimed, pending
                        self._unbegun.discard(key)
                        self._in_flight.pop(key, None)
                    raise
                self._progressed = True
        except BaseException:
            # Interrupted half-way: the rest of the group stays claimed, for the next
            # round's pending() to find.
            self._pending_dirty = True
            raise
