"""Durable state: what was seen, claimed, handled and answered, and the outbox."""

from prxmail.state._store import (
    DB_FILENAME as DB_FILENAME,
)
from prxmail.state._store import (
    MAX_REASON_CHARS as MAX_REASON_CHARS,
)
from prxmail.state._store import (
    SCHEMA_VERSION as SCHEMA_VERSION,
)
from prxmail.state._store import (
    TRANSITIONS as TRANSITIONS,
)
from prxmail.state._store import (
    AsyncStateStore as AsyncStateStore,
)
from prxmail.state._store import (
    ClaimBatch as ClaimBatch,
)
from prxmail.state._store import (
    ClaimOutcome as ClaimOutcome,
)
from prxmail.state._store import (
    ClaimResult as ClaimResult,
)
from prxmail.state._store import (
    MailboxState as MailboxState,
)
from prxmail.state._store import (
    MessageKey as MessageKey,
)
from prxmail.state._store import (
    MessageRecord as MessageRecord,
)
from prxmail.state._store import (
    MessageStatus as MessageStatus,
)
from prxmail.state._store import (
    OutboxDraft as OutboxDraft,
)
from prxmail.state._store import (
    OutboxItem as OutboxItem,
)
from prxmail.state._store import (
    OutboxStatus as OutboxStatus,
)
from prxmail.state._store import (
    PruneReport as PruneReport,
)
from prxmail.state._store import (
    RecoveryReport as RecoveryReport,
)
from prxmail.state._store import (
    RetryPolicy as RetryPolicy,
)
from prxmail.state._store import (
    StateStatistics as StateStatistics,
)
from prxmail.state._store import (
    StateStore as StateStore,
)
from prxmail.state._store import __all__ as __all__
from prxmail.state._store import (
    account_key as account_key,
)
from prxmail.state._store import (
    normalize_message_id as normalize_message_id,
)
from prxmail.state._store import (
    open_state_store as open_state_store,
)
from prxmail.state._store import (
    own_id_predicate as own_id_predicate,
)
