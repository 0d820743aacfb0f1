"""The fence around mail-parser and the stdlib's private parts.

Theory of operation: every use of mail-parser (its classes, its private methods
and attributes, its exceptions) and of the stdlib's private ``Message._payload``
lives in this one module, so a new release that changes them breaks here and
nowhere else (pyproject.toml bounds mail-parser below its next major version).
The rest of the package sees plain data: :func:`read_mail` returns a
:class:`MailParts` or ``None`` -- an exception inside mail-parser never escapes,
it becomes the one stable defect ``body-unparsed`` in the caller -- and
:func:`parse_addresses` returns :class:`~prxmail.message.Address` values.

Two equivalences keep mail-parser fast without changing its answers, each
checked by tests/unit/test_message.py: the narrow address grammar
(:func:`_fast_address_pairs`) reads the common header shapes as mail-parser's
scanner reads them, and :class:`_MailParser` skips work ``parse_message`` never
reads.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import email.header
import email.message
import email.utils
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import mailparser  # type: ignore[import-untyped]
import mailparser.const  # type: ignore[import-untyped]
import mailparser.exceptions  # type: ignore[import-untyped]
import mailparser.utils  # type: ignore[import-untyped]

from prxmail.message._bounds import MAX_HEADER_TEXT_CHARS
from prxmail.message._headers import _UNFOLD, _clean_addr, _fix_raw_bytes, decode_header_text
from prxmail.message._model import Address

# -- the stdlib's stored payload -------------------------------------------------------


def stored_payload(part: email.message.Message) -> object:
    # get_payload() would decode 8-bit text; the parser stores it as read, and
    # set_payload(str) stores it back the same way.
    return vars(part).get("_payload")


def decoded_payload(part: email.message.Message) -> object:
    """``part.get_payload(decode=True)``, with less copying for base64.

    The stdlib splits base64 text into a list of lines and joins them (for a
    20 MB attachment, 260,000 objects and two more copies) before decoding. Its
    decoder (``email._encoded_words.decode_b``) returns ``a2b_base64`` of the
    joined text whenever the length is a multiple of four and that decodes; the
    same call on the text with its line ends deleted gives the same bytes. Other
    cases take the stdlib path. (Decoding defects it would note on the part are
    not noted here: they are read only before this runs, by mail-parser.)
    """
    payload = stored_payload(part)
    if (
        isinstance(payload, str)
        and payload.isascii()
        and str(part.get("content-transfer-encoding", "")).lower() == "base64"
    ):
        joined = payload.encode("ascii").translate(None, b"\r\n")
        if len(joined) % 4 == 0:
            try:
                return binascii.a2b_base64(joined)
            except binascii.Error:
                pass
    return part.get_payload(decode=True)


# -- addresses -------------------------------------------------------------------------

# mail-parser's address scanner is the authority on what an address header
# means: it resists display-name tricks such as '"alice@example.com" <evil@x>'
# and 'alice@example.com@evil' that decide the sender policy. It is also slow
# (about 60 us a header), and nearly every header is one of two plain shapes:
# a bare 'local@domain', or 'Plain Words <local@domain>'. Values that fully
# match the deliberately narrow grammar below -- dot-atoms only, one mailbox, no
# quotes, comments, backslashes, commas or extra '<', '>', '@' -- are read
# directly; the result is the one mail-parser gives (tests/unit/test_message.py
# checks this for generated values), and mail-parser reports no defect for them.
# Everything else goes to mail-parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_FAST_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*"
_FAST_BARE = re.compile(rf"[ \t]*({_FAST_ADDR_SPEC})[ \t]*")
# The phrase is then split into words, each checked on its own.
_FAST_NAMED = re.compile(rf"([A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.\t -]*)<({_FAST_ADDR_SPEC})>[ \t]*")
_FAST_ATOM = re.compile(rf"{_ATEXT}+")
# mail-parser decodes a word that this matches; the fast path accepts the
# narrower _FAST_ENCODED_WORD (no RFC 2231 language suffix, no characters the
# address scanner treats as structure) and leaves the others to mail-parser.
_ANY_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_FAST_ENCODED_WORD = re.compile(r"=\?[A-Za-z0-9_-]+\?[bBqQ]\?[A-Za-z0-9!#$%&'*+/=^_`{|}~.-]*\?=")
# RFC 2047 2: an encoded word is at most 75 characters; mail-parser reports a
# longer one as a defect, so such names take its path.
_MAX_ENCODED_WORD = 75


def _fast_word_text(word: str) -> str | None:
    """One encoded word decoded as mail-parser decodes it, or None to decline."""
    try:
        pieces = email.header.decode_header(word)
        decoded: list[str] = []
        for data, charset in pieces:
            if isinstance(data, bytes):
                codec = (charset or "ascii").split("*", 1)[0]
                decoded.append(data.decode("utf-8" if codec == "unknown-8bit" else codec))
            else:
                decoded.append(str(data))
    except Exception:
        return None
    text = "".join(decoded)
    if any((ch < " " and ch != "\t") or "\ud800" <= ch <= "\udfff" for ch in text):
        return None
    return text


def _fast_address_pairs(value: str) -> list[tuple[str, str]] | None:
    """The (name, addr) pairs of a value in the narrow grammar, else None.

    For such a value this equals ``mailparser.utils.get_addresses(value,
    decode_names=True)``, with no defects reported.
    """
    bare = _FAST_BARE.fullmatch(value)
    if bare:
        return [("", bare.group(1))]
    named = _FAST_NAMED.fullmatch(value)
    if named is None:
        return None
    phrase = named.group(1)
    pieces: list[str] = []
    run: list[str] | None = None  # decoded adjacent encoded words, joined
    for word in phrase.split():
        if _ANY_ENCODED_WORD.fullmatch(word):
            if len(word) > _MAX_ENCODED_WORD or not _FAST_ENCODED_WORD.fullmatch(word):
                return None
            text = _fast_word_text(word)
            if text is None:
                return None
            if run is None:
                run = []
                pieces.append("")
            run.append(text)
            pieces[-1] = "".join(run)
        elif _FAST_ATOM.fullmatch(word):
            run = None
            pieces.append(word)
        else:
            return None
    if run is not None and not phrase[-1:].isspace():
        # 'Name=?..?=<a@b>': mail-parser decodes a word only before white space.
        return None
    return [(" ".join(pieces), named.group(2))]


def parse_addresses(values: Iterable[str]) -> tuple[Address, ...]:
    """Parse the mailboxes of one or more address header values.

    Args:
        values: Raw header values (8-bit bytes as surrogates allowed).

    Returns:
        Every mailbox with a usable address, display names decoded. Groups are
        flattened; entries without an address are skipped.
    """
    found: list[Address] = []
    for raw in values:
        text = _fix_raw_bytes(_UNFOLD.sub("", raw[: MAX_HEADER_TEXT_CHARS * 8]))
        try:
            pairs = _fast_address_pairs(text)
            if pairs is None:
                pairs = mailparser.utils.get_addresses(text, decode_names=True)
        except Exception:
            # mail-parser's address scanner gave up: the stdlib's is cruder but
            # does not give up.
            try:
                pairs = email.utils.getaddresses([text])
            except Exception:
                pairs = []
        for name, addr in pairs:
            clean = _clean_addr(str(addr))
            if clean is None:
                continue
            found.append(Address(clean, decode_header_text(str(name))))
    return tuple(found)


# -- the MIME tree ------------------------------------------------------------------

# mail-parser exposes one header's addresses through these names; its _reset()
# runs the address scanner on every value of them.
_MAILPARSER_ADDRESS_HEADERS = frozenset(mailparser.const.ADDRESSES_HEADERS)


class _MailParser(mailparser.MailParser):  # type: ignore[misc]
    """``mailparser.MailParser`` without the work :func:`parse_message` never reads.

    Private methods of mail-parser are overridden (``_make_mail``,
    ``_build_header_index``, ``_reset``) and private attributes set
    (``_mail``, ``_header_index``, ``_address_headers``); results are unchanged,
    and tests/unit/test_message.py fails if a new mail-parser release stops
    calling them (the speed-up would be lost) or if results differ from the
    plain class.

    * ``parse()`` ends by building ``.mail`` and ``.mail_partial``, two dicts of
      every header with their addresses parsed again: about a sixth of a small
      message's parse. Here they are built when first read.
    * ``_reset()`` runs the address scanner on every value of every address
      header, for ``.mail`` and for its defect list. Values in the fast grammar
      (see :func:`_fast_address_pairs`) give the same pairs and no defect, so
      they are hidden from that loop and their pairs filled in after it.
    """

    _mail: dict[str, Any] | None
    _mail_partial: dict[str, Any] | None

    def _build_header_index(self) -> dict[str, list[Any]]:
        index: dict[str, list[Any]] = super()._build_header_index()
        self._fast_addresses: dict[str, tuple[list[Any], list[tuple[str, str]]]] = {}
        for header in _MAILPARSER_ADDRESS_HEADERS & index.keys():
            values = index[header]
            pairs = [_fast_address_pairs(v) if isinstance(v, str) else None for v in values]
            first = pairs[0]
            if first is not None and None not in pairs:
                self._fast_addresses[header] = (values, first)
                del index[header]
        return index

    def _reset(self) -> None:
        self._fast_addresses = {}
        super()._reset()
        for header, (values, first) in self._fast_addresses.items():
            self._header_index[header] = values
            self._address_headers[header] = first

    def _make_mail(self, complete: bool = True) -> None:
        return None  # built by the properties below when first read

    @property
    def mail(self) -> dict[str, Any]:
        """All headers and parts as a dict, as ``MailParser.mail``."""
        if self._mail is None:
            self._mail = mailparser.MailParser._make_mail(self)
        return self._mail

    @property
    def mail_partial(self) -> dict[str, Any]:
        """The main headers and parts as a dict, as ``MailParser.mail_partial``."""
        if self._mail_partial is None:
            self._mail_partial = mailparser.MailParser._make_mail(self, complete=False)
        return self._mail_partial


def mail_parser(build_tree: Callable[[], email.message.Message]) -> _MailParser:
    """What ``mailparser.MailParser.from_bytes`` gives, for the tree ``build_tree`` builds.

    Args:
        build_tree: Builds the ``email`` tree to read (called once, inside the
            same recursion guard mail-parser's own constructors use).

    Returns:
        The parser, with everything :func:`read_mail` reads.

    Raises:
        MailParserRecursionError: The MIME tree nests too deeply to build or walk
            (as mail-parser's own constructors raise it).
    """
    try:
        return _MailParser(build_tree())
    except RecursionError as exc:
        raise mailparser.exceptions.MailParserRecursionError(
            "Message nesting too deep to parse"
        ) from exc


@attrs.frozen
class MailParts:
    """What mail-parser made of a message, as plain data.

    Attributes:
        tree: The stdlib tree it walked.
        plain: The text/plain bodies, decoded.
        html: The text/html bodies, decoded.
        unmanaged: Text of parts it did not classify (a broken multipart's blob).
        defects: mail-parser's defect category names.
        date: The Date as mail-parser read it (it reads many broken formats the
            stdlib refuses), or ``None``.
    """

    tree: email.message.Message
    plain: tuple[str, ...]
    html: tuple[str, ...]
    unmanaged: tuple[str, ...]
    defects: frozenset[str]
    date: _dt.datetime | None


class _SimpleMailParser(_MailParser):
    """``_MailParser`` for the one-part trees of :mod:`prxmail.message._simple`.

    For a tree with one text/plain part, no file name, no Content-ID and no
    Content-Disposition, ``MailParser.parse()`` does two things whose results
    :func:`read_mail` reads: ``_reset()`` (the header index, the address, date and
    Received checks with their defects, the date) and, for that one part,
    ``_decode_body_payload()`` appended to ``text_plain`` when not empty. Its walk
    finds no other part, no stdlib defect on a tree built from the grammar, no
    MIME header defect in ASCII headers and no attachment; that walk (a view of
    the part's MIME headers, ten header lookups, a dozen debug strings) is what is
    skipped. tests/unit/test_message_simple.py checks the results are the ones
    of the full parse.
    """

    def parse(self) -> _SimpleMailParser:
        self._reset()
        root = self.message
        text = self._decode_body_payload(root, root.get_content_charset("utf-8"), 0)
        if text:
            self._text_plain.append(text)
        return self


def _parts(parsed: _MailParser) -> MailParts:
    date = parsed.date
    return MailParts(
        tree=parsed.message,
        plain=tuple(str(p) for p in parsed.text_plain),
        html=tuple(str(p) for p in parsed.text_html),
        unmanaged=tuple(str(p) for p in parsed.text_not_managed),
        defects=frozenset(str(d) for d in parsed.defects_categories),
        date=date if isinstance(date, _dt.datetime) else None,
    )


def read_simple_mail(root: email.message.Message) -> MailParts | None:
    """:func:`read_mail` for a tree from :func:`prxmail.message._simple.simple_tree`.

    Args:
        root: The one-part tree.

    Returns:
        The parts, or ``None`` when mail-parser raised (as :func:`read_mail`).

    Raises:
        MemoryError: Passed on, as by :func:`read_mail`.
    """
    return _read(lambda: _SimpleMailParser(root))


def read_mail(build_tree: Callable[[], email.message.Message]) -> MailParts | None:
    """Build a message's tree and read its bodies with mail-parser, never raising.

    Args:
        build_tree: Builds the ``email`` tree (see :func:`mail_parser`).

    Returns:
        The parts, or ``None`` when the tree could not be built or mail-parser
        raised anything at all (a nesting bomb raises MailParserRecursionError; a
        new release may raise something else): the caller keeps the headers and
        records ``body-unparsed``.

    Raises:
        MemoryError: Passed on: running out of memory is not a property of the
            message, and retrying it elsewhere may succeed.
    """
    return _read(lambda: mail_parser(build_tree))


def _read(parse: Callable[[], _MailParser]) -> MailParts | None:
    try:
        return _parts(parse())
    except MemoryError:
        raise
    except Exception:
        return None
