"""``prxmail doctor``: check every step from the config file to a working mailbox."""

from prxmail.doctor._imap import *  # noqa: F403
from prxmail.doctor._imap import __all__ as __all__
