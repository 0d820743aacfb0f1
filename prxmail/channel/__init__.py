"""The email channel for trio programs: accepted mail in, threaded replies out."""

from prxmail.channel._api import *  # noqa: F403
from prxmail.channel._api import RECONNECT_INITIAL_SECONDS as RECONNECT_INITIAL_SECONDS
from prxmail.channel._api import RECONNECT_MAX_SECONDS as RECONNECT_MAX_SECONDS
from prxmail.channel._api import __all__ as __all__
