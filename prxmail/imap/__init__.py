"""IMAP4rev1 client: a sans-I/O protocol core and a trio connection on top.

Most programs need only :func:`open_imap_connection`::

    async with open_imap_connection(host, 993, ssl_context=ctx) as imap:
        await imap.login(user, password)
        box = await imap.select("INBOX")
        uids = await imap.uid_search("UID", SequenceSet(((last_uid + 1, None),)))
        async for msg in imap.uid_fetch(uids[:100], ["BODY.PEEK[]", "RFC822.SIZE"]):
            ...
        await imap.uid_store(uids[:100], "+FLAGS", ["\\\\Seen"])
        async with imap.idle() as idle:
            async for push in idle:
                ...

The sans-I/O core (:class:`IMAPProtocol`, :class:`Framer`, :func:`parse_response`)
is usable with any I/O: bytes in, events out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prxmail._lazy import lazy_exports

if TYPE_CHECKING:
    from prxmail._tls import Security as Security
    from prxmail.imap._connection import FetchStream as FetchStream
    from prxmail.imap._connection import IdleSession as IdleSession
    from prxmail.imap._connection import IMAPConnection as IMAPConnection
    from prxmail.imap._connection import MailboxState as MailboxState
    from prxmail.imap._connection import open_imap_connection as open_imap_connection
    from prxmail.imap._connection import open_imap_stream as open_imap_stream
    from prxmail.imap._encoder import Raw as Raw
    from prxmail.imap._encoder import String as String
    from prxmail.imap._encoder import decode_mailbox as decode_mailbox
    from prxmail.imap._encoder import encode_command as encode_command
    from prxmail.imap._encoder import encode_mailbox as encode_mailbox
    from prxmail.imap._events import Address as Address
    from prxmail.imap._events import BodyPart as BodyPart
    from prxmail.imap._events import BodyStructure as BodyStructure
    from prxmail.imap._events import CapabilityData as CapabilityData
    from prxmail.imap._events import ConnectionClosed as ConnectionClosed
    from prxmail.imap._events import ContinuationRequest as ContinuationRequest
    from prxmail.imap._events import EnabledData as EnabledData
    from prxmail.imap._events import Envelope as Envelope
    from prxmail.imap._events import ESearchData as ESearchData
    from prxmail.imap._events import Event as Event
    from prxmail.imap._events import Exists as Exists
    from prxmail.imap._events import Expunge as Expunge
    from prxmail.imap._events import FetchData as FetchData
    from prxmail.imap._events import FlagsData as FlagsData
    from prxmail.imap._events import IdData as IdData
    from prxmail.imap._events import ListData as ListData
    from prxmail.imap._events import MultipartBody as MultipartBody
    from prxmail.imap._events import Recent as Recent
    from prxmail.imap._events import ResponseCode as ResponseCode
    from prxmail.imap._events import SearchData as SearchData
    from prxmail.imap._events import SequenceSet as SequenceSet
    from prxmail.imap._events import StatusResponse as StatusResponse
    from prxmail.imap._events import TaggedResponse as TaggedResponse
    from prxmail.imap._events import UnknownResponse as UnknownResponse
    from prxmail.imap._framer import DEFAULT_MAX_LINE_LENGTH as DEFAULT_MAX_LINE_LENGTH
    from prxmail.imap._framer import DEFAULT_MAX_LITERAL_SIZE as DEFAULT_MAX_LITERAL_SIZE
    from prxmail.imap._framer import DEFAULT_MAX_RESPONSE_SIZE as DEFAULT_MAX_RESPONSE_SIZE
    from prxmail.imap._framer import Frame as Frame
    from prxmail.imap._framer import Framer as Framer
    from prxmail.imap._parser import parse_response as parse_response
    from prxmail.imap._protocol import NEED_DATA as NEED_DATA
    from prxmail.imap._protocol import IMAPProtocol as IMAPProtocol
    from prxmail.imap._state import ConnectionState as ConnectionState

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_LITERAL_SIZE",
    "DEFAULT_MAX_RESPONSE_SIZE",
    "NEED_DATA",
    "Address",
    "BodyPart",
    "BodyStructure",
    "CapabilityData",
    "ConnectionClosed",
    "ConnectionState",
    "ContinuationRequest",
    "ESearchData",
    "EnabledData",
    "Envelope",
    "Event",
    "Exists",
    "Expunge",
    "FetchData",
    "FetchStream",
    "FlagsData",
    "Frame",
    "Framer",
    "IMAPConnection",
    "IMAPProtocol",
    "IdData",
    "IdleSession",
    "ListData",
    "MailboxState",
    "MultipartBody",
    "Raw",
    "Recent",
    "ResponseCode",
    "SearchData",
    "Security",
    "SequenceSet",
    "StatusResponse",
    "String",
    "TaggedResponse",
    "UnknownResponse",
    "decode_mailbox",
    "encode_command",
    "encode_mailbox",
    "open_imap_connection",
    "open_imap_stream",
    "parse_response",
]

# Where each public name lives. Importing the package loads none of them: a
# program that needs only a sans-I/O core (or the CLI's --version) does not pay for
# trio, mail-parser or the state store, and the core stays free of them.
_LOCATIONS: dict[str, str] = {
    "Security": "prxmail._tls",
    "FetchStream": "prxmail.imap._connection",
    "IdleSession": "prxmail.imap._connection",
    "IMAPConnection": "prxmail.imap._connection",
    "MailboxState": "prxmail.imap._connection",
    "open_imap_connection": "prxmail.imap._connection",
    "open_imap_stream": "prxmail.imap._connection",
    "Raw": "prxmail.imap._encoder",
    "String": "prxmail.imap._encoder",
    "decode_mailbox": "prxmail.imap._encoder",
    "encode_command": "prxmail.imap._encoder",
    "encode_mailbox": "prxmail.imap._encoder",
    "Address": "prxmail.imap._events",
    "BodyPart": "prxmail.imap._events",
    "BodyStructure": "prxmail.imap._events",
    "CapabilityData": "prxmail.imap._events",
    "ConnectionClosed": "prxmail.imap._events",
    "ContinuationRequest": "prxmail.imap._events",
    "EnabledData": "prxmail.imap._events",
    "Envelope": "prxmail.imap._events",
    "ESearchData": "prxmail.imap._events",
    "Event": "prxmail.imap._events",
    "Exists": "prxmail.imap._events",
    "Expunge": "prxmail.imap._events",
    "FetchData": "prxmail.imap._events",
    "FlagsData": "prxmail.imap._events",
    "IdData": "prxmail.imap._events",
    "ListData": "prxmail.imap._events",
    "MultipartBody": "prxmail.imap._events",
    "Recent": "prxmail.imap._events",
    "ResponseCode": "prxmail.imap._events",
    "SearchData": "prxmail.imap._events",
    "SequenceSet": "prxmail.imap._events",
    "StatusResponse": "prxmail.imap._events",
    "TaggedResponse": "prxmail.imap._events",
    "UnknownResponse": "prxmail.imap._events",
    "DEFAULT_MAX_LINE_LENGTH": "prxmail.imap._framer",
    "DEFAULT_MAX_LITERAL_SIZE": "prxmail.imap._framer",
    "DEFAULT_MAX_RESPONSE_SIZE": "prxmail.imap._framer",
    "Frame": "prxmail.imap._framer",
    "Framer": "prxmail.imap._framer",
    "parse_response": "prxmail.imap._parser",
    "NEED_DATA": "prxmail.imap._protocol",
    "IMAPProtocol": "prxmail.imap._protocol",
    "ConnectionState": "prxmail.imap._state",
}


__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS, __all__)
