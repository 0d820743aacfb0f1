"""SMTP client: a sans-I/O protocol core and a trio connection on top.

Typical use::

    async with open_smtp_sender("smtp.example.com", 465, username=u, password=p) as s:
        result = await s.send_message("bot@example.com", ["alice@example.com"], data)

:class:`SMTPConnection` works over any ``trio.abc.Stream``; :class:`SMTPProtocol`
is the bytes-in, replies-out core with no I/O at all.

Several messages at once go faster with ``send_messages([MailTransaction(...), ...])``,
which pipelines across messages (one message at a time is bound by the server's
per-message work, whatever the client does); each gets a :class:`BatchOutcome`.
"""

from prxmail._tls import Security as Security
from prxmail.smtp._connection import IDLE_PROBE_SECONDS as IDLE_PROBE_SECONDS
from prxmail.smtp._connection import MAX_PIPELINED_MESSAGES as MAX_PIPELINED_MESSAGES
from prxmail.smtp._connection import BatchOutcome as BatchOutcome
from prxmail.smtp._connection import MailTransaction as MailTransaction
from prxmail.smtp._connection import RecipientResult as RecipientResult
from prxmail.smtp._connection import SendResult as SendResult
from prxmail.smtp._connection import SMTPConnection as SMTPConnection
from prxmail.smtp._connection import SMTPSender as SMTPSender
from prxmail.smtp._connection import connect_smtp as connect_smtp
from prxmail.smtp._connection import open_smtp_connection as open_smtp_connection
from prxmail.smtp._connection import open_smtp_sender as open_smtp_sender
from prxmail.smtp._protocol import MAX_LINE_LENGTH as MAX_LINE_LENGTH
from prxmail.smtp._protocol import MAX_REPLY_BYTES as MAX_REPLY_BYTES
from prxmail.smtp._protocol import MAX_REPLY_LINES as MAX_REPLY_LINES
from prxmail.smtp._protocol import Command as Command
from prxmail.smtp._protocol import Extensions as Extensions
from prxmail.smtp._protocol import Reply as Reply
from prxmail.smtp._protocol import SMTPProtocol as SMTPProtocol
from prxmail.smtp._protocol import State as State
from prxmail.smtp._protocol import decode_data as decode_data
from prxmail.smtp._protocol import encode_data as encode_data
from prxmail.smtp._protocol import error_for_reply as error_for_reply
from prxmail.smtp._protocol import normalize_crlf as normalize_crlf
from prxmail.smtp._protocol import parse_extensions as parse_extensions

__all__ = [
    "IDLE_PROBE_SECONDS",
    "MAX_LINE_LENGTH",
    "MAX_PIPELINED_MESSAGES",
    "MAX_REPLY_BYTES",
    "MAX_REPLY_LINES",
    "BatchOutcome",
    "Command",
    "Extensions",
    "MailTransaction",
    "RecipientResult",
    "Reply",
    "SMTPConnection",
    "SMTPProtocol",
    "SMTPSender",
    "Security",
    "SendResult",
    "State",
    "connect_smtp",
    "decode_data",
    "encode_data",
    "error_for_reply",
    "normalize_crlf",
    "open_smtp_connection",
    "open_smtp_sender",
    "parse_extensions",
]
