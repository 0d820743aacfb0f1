"""prxmail: an email channel for agents on Trio -- IMAP IDLE in, threaded SMTP replies out."""

from prxmail.errors import AuthenticationError as AuthenticationError
from prxmail.errors import ConfigError as ConfigError
from prxmail.errors import ConnectionBrokenError as ConnectionBrokenError
from prxmail.errors import HandlerError as HandlerError
from prxmail.errors import IMAPBadResponse as IMAPBadResponse
from prxmail.errors import IMAPCommandError as IMAPCommandError
from prxmail.errors import IMAPNoResponse as IMAPNoResponse
from prxmail.errors import LocalProtocolError as LocalProtocolError
from prxmail.errors import PrxmailError as PrxmailError
from prxmail.errors import RemoteProtocolError as RemoteProtocolError
from prxmail.errors import SMTPPermanentError as SMTPPermanentError
from prxmail.errors import SMTPReplyError as SMTPReplyError
from prxmail.errors import SMTPTransientError as SMTPTransientError
from prxmail.errors import StateError as StateError
from prxmail.errors import TLSError as TLSError

__version__ = "0.1.0.dev0"

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectionBrokenError",
    "HandlerError",
    "IMAPBadResponse",
    "IMAPCommandError",
    "IMAPNoResponse",
    "LocalProtocolError",
    "PrxmailError",
    "RemoteProtocolError",
    "SMTPPermanentError",
    "SMTPReplyError",
    "SMTPTransientError",
    "StateError",
    "TLSError",
    "__version__",
]
