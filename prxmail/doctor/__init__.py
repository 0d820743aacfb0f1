"""``prxmail doctor``: check every step from configuration to a working mailbox.

Theory of operation
-------------------
The doctor walks the path the service takes and stops each protocol at the first step
that fails, because every later step depends on it. The steps are:

* ``config`` -- the file loads (every problem with its key path, from
  :func:`~prxmail.config.load_config`, which reads the file and the files it names,
  such as ``tls_ca_file``; it runs in a worker thread, off the event loop).
* ``imap.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``capabilities``, ``login``,
  ``folder``, ``idle``. With implicit TLS the ``tls`` step runs before the greeting;
  with STARTTLS it runs after it (the upgrade); in plain mode it only warns.
* ``smtp.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``ehlo``, ``auth`` and
  ``from_address`` (the last one only compares configuration values).
* ``policy`` -- ``allowed_senders`` empty or ``"*"``.
* ``state.dir`` and ``state.db`` -- the state directory is writable (or creatable), and
  what an existing database holds; nothing is created.

Every account of the file (:func:`~prxmail.config.load_accounts`) is checked, all
accounts concurrently, one report each (:func:`run_account_checks`; ``--account NAME``
checks one); a file with one account prints as before. The IMAP and SMTP chains run
concurrently in one nursery. Every network step runs
under its own short timeout (the caller owns timeouts, so the doctor is the caller
here), so a run against hosts that never answer still ends in seconds. No step lets an
exception escape: each failure becomes a FAIL result with the cause and the fix in
plain words, and later steps of the same chain become SKIP. Severity and advice are
decided from the error's type and attributes (the refusal behind an
:class:`~prxmail.errors.AuthenticationError`, IMAP response codes, SMTP reply codes),
never by matching its text. The password never appears in the output: every text of
every result passes through the one :class:`~prxmail._redact.Redactor` built from
:func:`~prxmail._redact.config_secrets`, as the service's log does.

Exit statuses (:attr:`DoctorReport.exit_status`): 0 when nothing blocks the channel
(warnings allowed), 1 when a step after ``config`` failed, 2 when the ``config`` step
failed (nothing else could be checked) -- the same 2 that ``prxmail serve`` uses for
a configuration it cannot start with.

The package, by module: ``_report`` (the result model, limits, the chain of steps),
``_network`` (DNS, TCP, TLS diagnosis), ``_imap`` and ``_smtp`` (the protocol
chains), ``_local`` (config, policy and state checks), ``_run`` (running everything)
and ``_render`` (the text output).
"""

from prxmail.doctor._render import render_accounts as render_accounts
from prxmail.doctor._render import render_text as render_text
from prxmail.doctor._report import EXIT_BLOCKED as EXIT_BLOCKED
from prxmail.doctor._report import EXIT_CONFIG as EXIT_CONFIG
from prxmail.doctor._report import EXIT_OK as EXIT_OK
from prxmail.doctor._report import DoctorReport as DoctorReport
from prxmail.doctor._report import Status as Status
from prxmail.doctor._report import StepResult as StepResult
from prxmail.doctor._report import Timeouts as Timeouts
from prxmail.doctor._run import run_account_checks as run_account_checks
from prxmail.doctor._run import run_checks as run_checks
from prxmail.doctor._run import run_doctor as run_doctor

__all__ = [
    "EXIT_BLOCKED",
    "EXIT_CONFIG",
    "EXIT_OK",
    "DoctorReport",
    "Status",
    "StepResult",
    "Timeouts",
    "render_accounts",
    "render_text",
    "run_account_checks",
    "run_checks",
    "run_doctor",
]
