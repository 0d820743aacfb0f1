"""The message model: one received mail as a frozen value, parsed from raw bytes.

:func:`parse_message` turns the bytes fetched over IMAP into a :class:`Message` that
handlers, the sender policy and reply composition all read; malformed input never
raises (what went wrong is listed in :attr:`Message.defects`).

The package, by module: ``_model`` (the frozen values), ``_bounds`` (every limit
and the byte-level passes that cut hostile input down first), ``_headers`` (header
text, Message-IDs), ``_filenames`` and ``_attachments`` (the bounded MIME walk),
``_speed`` (the stdlib tree without its line-by-line loop), ``_mailparser`` (the one
module that touches mail-parser and the stdlib's private payload) and ``_parse``
(:func:`parse_message`, which assembles the rest).
"""

from prxmail.message._bounds import ELIDE_FLOOR_BYTES as ELIDE_FLOOR_BYTES
from prxmail.message._bounds import MAX_AUTH_RESULTS as MAX_AUTH_RESULTS
from prxmail.message._bounds import MAX_BOUNDARY_LINES as MAX_BOUNDARY_LINES
from prxmail.message._bounds import MAX_FAST_HEADER_SECTION as MAX_FAST_HEADER_SECTION
from prxmail.message._bounds import MAX_FILENAME_BYTES as MAX_FILENAME_BYTES
from prxmail.message._bounds import MAX_HEADER_TEXT_CHARS as MAX_HEADER_TEXT_CHARS
from prxmail.message._bounds import MAX_MESSAGE_ID_CHARS as MAX_MESSAGE_ID_CHARS
from prxmail.message._bounds import MAX_MIME_DEPTH as MAX_MIME_DEPTH
from prxmail.message._bounds import MAX_MIME_PARTS as MAX_MIME_PARTS
from prxmail.message._bounds import MAX_RAW_FIELD_BYTES as MAX_RAW_FIELD_BYTES
from prxmail.message._bounds import MAX_REFERENCES_KEPT as MAX_REFERENCES_KEPT
from prxmail.message._filenames import sanitize_filename as sanitize_filename
from prxmail.message._headers import decode_header_text as decode_header_text
from prxmail.message._headers import parse_message_ids as parse_message_ids
from prxmail.message._mailparser import parse_addresses as parse_addresses
from prxmail.message._model import MISSING_ID_DOMAIN as MISSING_ID_DOMAIN
from prxmail.message._model import Address as Address
from prxmail.message._model import Attachment as Attachment
from prxmail.message._model import Message as Message
from prxmail.message._model import missing_message_id as missing_message_id
from prxmail.message._parse import parse_message as parse_message

__all__ = [
    "Address",
    "Attachment",
    "Message",
    "decode_header_text",
    "missing_message_id",
    "parse_addresses",
    "parse_message",
    "parse_message_ids",
    "sanitize_filename",
]
