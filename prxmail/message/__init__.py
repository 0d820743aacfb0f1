"""The message model: one received mail as a frozen value, parsed from raw bytes."""

from prxmail.message._parse import *  # noqa: F403
from prxmail.message._parse import ELIDE_FLOOR_BYTES as ELIDE_FLOOR_BYTES
from prxmail.message._parse import MAX_FILENAME_BYTES as MAX_FILENAME_BYTES
from prxmail.message._parse import MAX_MESSAGE_ID_CHARS as MAX_MESSAGE_ID_CHARS
from prxmail.message._parse import MAX_MIME_PARTS as MAX_MIME_PARTS
from prxmail.message._parse import MAX_REFERENCES_KEPT as MAX_REFERENCES_KEPT
from prxmail.message._parse import __all__ as __all__
