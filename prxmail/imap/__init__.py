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
