"""prxmail: an email channel for agents on Trio -- IMAP IDLE in, threaded SMTP replies out.

Most programs need :func:`open_mail_channel` with a :class:`Config` from
:func:`load_config`; the IMAP and SMTP clients live in :mod:`prxmail.imap` and
:mod:`prxmail.smtp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prxmail._lazy import lazy_exports

if TYPE_CHECKING:
    from prxmail._tls import Security as Security
    from prxmail.channel import ChannelStatistics as ChannelStatistics
    from prxmail.channel import ChannelStatus as ChannelStatus
    from prxmail.channel import MailChannel as MailChannel
    from prxmail.channel import open_mail_channel as open_mail_channel
    from prxmail.channel import open_mail_channels as open_mail_channels
    from prxmail.config import Config as Config
    from prxmail.config import load_accounts as load_accounts
    from prxmail.config import load_config as load_config
    from prxmail.config import parse_config as parse_config
    from prxmail.errors import AuthenticationError as AuthenticationError
    from prxmail.errors import CommandRefusedError as CommandRefusedError
    from prxmail.errors import ConfigError as ConfigError
    from prxmail.errors import ConnectionBrokenError as ConnectionBrokenError
    from prxmail.errors import HandlerError as HandlerError
    from prxmail.errors import IMAPBadResponse as IMAPBadResponse
    from prxmail.errors import IMAPCommandError as IMAPCommandError
    from prxmail.errors import IMAPNoResponse as IMAPNoResponse
    from prxmail.errors import LocalProtocolError as LocalProtocolError
    from prxmail.errors import ProtocolError as ProtocolError
    from prxmail.errors import PrxmailError as PrxmailError
    from prxmail.errors import RemoteProtocolError as RemoteProtocolError
    from prxmail.errors import SMTPPermanentError as SMTPPermanentError
    from prxmail.errors import SMTPReplyError as SMTPReplyError
    from prxmail.errors import SMTPTransientError as SMTPTransientError
    from prxmail.errors import StateError as StateError
    from prxmail.errors import TLSError as TLSError
    from prxmail.message import Address as Address
    from prxmail.message import Attachment as Attachment
    from prxmail.message import Message as Message
    from prxmail.service import serve_mail_channel as serve_mail_channel
    from prxmail.service import serve_mail_channels as serve_mail_channels

__version__ = "0.1.0.dev0"

__all__ = [
    "Address",
    "Attachment",
    "AuthenticationError",
    "ChannelStatistics",
    "ChannelStatus",
    "CommandRefusedError",
    "Config",
    "ConfigError",
    "ConnectionBrokenError",
    "HandlerError",
    "IMAPBadResponse",
    "IMAPCommandError",
    "IMAPNoResponse",
    "LocalProtocolError",
    "MailChannel",
    "Message",
    "ProtocolError",
    "PrxmailError",
    "RemoteProtocolError",
    "SMTPPermanentError",
    "SMTPReplyError",
    "SMTPTransientError",
    "Security",
    "StateError",
    "TLSError",
    "__version__",
    "load_accounts",
    "load_config",
    "open_mail_channel",
    "open_mail_channels",
    "parse_config",
    "serve_mail_channel",
    "serve_mail_channels",
]

# Where each public name lives. Importing the package loads none of them: a
# program that needs only a sans-I/O core (or the CLI's --version) does not pay for
# trio, mail-parser or the state store, and the core stays free of them.
_LOCATIONS: dict[str, str] = {
    "Security": "prxmail._tls",
    "ChannelStatistics": "prxmail.channel",
    "ChannelStatus": "prxmail.channel",
    "MailChannel": "prxmail.channel",
    "open_mail_channel": "prxmail.channel",
    "open_mail_channels": "prxmail.channel",
    "Config": "prxmail.config",
    "load_accounts": "prxmail.config",
    "load_config": "prxmail.config",
    "parse_config": "prxmail.config",
    "AuthenticationError": "prxmail.errors",
    "CommandRefusedError": "prxmail.errors",
    "ConfigError": "prxmail.errors",
    "ConnectionBrokenError": "prxmail.errors",
    "HandlerError": "prxmail.errors",
    "IMAPBadResponse": "prxmail.errors",
    "IMAPCommandError": "prxmail.errors",
    "IMAPNoResponse": "prxmail.errors",
    "LocalProtocolError": "prxmail.errors",
    "ProtocolError": "prxmail.errors",
    "PrxmailError": "prxmail.errors",
    "RemoteProtocolError": "prxmail.errors",
    "SMTPPermanentError": "prxmail.errors",
    "SMTPReplyError": "prxmail.errors",
    "SMTPTransientError": "prxmail.errors",
    "StateError": "prxmail.errors",
    "TLSError": "prxmail.errors",
    "Address": "prxmail.message",
    "Attachment": "prxmail.message",
    "Message": "prxmail.message",
    "serve_mail_channel": "prxmail.service",
    "serve_mail_channels": "prxmail.service",
}


__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS, __all__)
