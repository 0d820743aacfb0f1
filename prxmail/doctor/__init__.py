"""``prxmail doctor``: check every step from configuration to a working mailbox.

Theory of operation
-------------------
The doctor walks the path the service takes and stops each protocol at the first step
that fails, because every later step depends on it. The steps are:

* ``config`` -- the file loads (every problem with its key path, from
  :func:`~prxmail.config.load_config`).
* ``imap.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``capabilities``, ``login``,
  ``folder``, ``idle``. With implicit TLS the ``tls`` step runs before the greeting;
  with STARTTLS it runs after it (the upgrade); in plain mode it only warns.
* ``smtp.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``ehlo``, ``auth`` and
  ``from_address`` (the last one only compares configuration values).
* ``policy`` -- ``allowed_senders`` empty or ``"*"``.
* ``state.dir`` and ``state.db`` -- the state directory is writable (or creatable), and
  what an existing database holds; nothing is created.

The IMAP and SMTP chains run concurrently in one nursery. Every network step runs
under its own short timeout (the caller owns timeouts, so the doctor is the caller
here), so a run against hosts that never answer still ends in seconds. No step lets an
exception escape: each failure becomes a FAIL result with the cause and the fix in
plain words, and later steps of the same chain become SKIP. The password never
appears in the output: every text of every result passes through a redactor.

The package, by module: ``_report`` (the result model, limits, the chain of steps),
``_network`` (DNS, TCP, TLS diagnosis), ``_imap`` and ``_smtp`` (the protocol
chains), ``_local`` (config, policy and state checks), ``_run`` (running everything)
and ``_render`` (the text output).
"""

from prxmail.doctor._render import render_text as render_text
from prxmail.doctor._report import EXIT_BLOCKED as EXIT_BLOCKED
from prxmail.doctor._report import EXIT_OK as EXIT_OK
from prxmail.doctor._report import DoctorReport as DoctorReport
from prxmail.doctor._report import Status as Status
from prxmail.doctor._report import StepResult as StepResult
from prxmail.doctor._report import Timeouts as Timeouts
from prxmail.doctor._run import run_checks as run_checks
from prxmail.doctor._run import run_doctor as run_doctor

__all__ = [
    "EXIT_BLOCKED",
    "EXIT_OK",
    "DoctorReport",
    "Status",
    "StepResult",
    "Timeouts",
    "render_text",
    "run_checks",
    "run_doctor",
]
