"""Private Dovecot + Postfix instances on loopback, for integration tests and the demo.

Theory of operation
-------------------
Everything lives in one temporary directory (the *workdir*); nothing under ``/etc`` or
``/var`` is read or written beyond installing the Debian packages once:

* ``apt-get install`` of ``dovecot-imapd dovecot-lmtpd postfix`` only when a binary is
  missing, with a ``/usr/sbin/policy-rc.d`` that answers 101 ("action forbidden") so the
  packages' maintainer scripts do not start the system-wide services. The file is
  removed again afterwards, and only if we created it.
* A throwaway CA (trustme) signs a certificate for ``localhost`` and ``127.0.0.1``; the
  CA is written to ``tls/ca.pem`` for clients.
* Dovecot runs *rootless* as the unprivileged ``dovecot`` system user the package
  creates: its master is started by us in the foreground (``-F``), so its pid is our
  child's pid. Every service runs as that one user, so chroots are off and
  ``first_valid_uid``/``last_valid_uid`` pin mail access to that uid. Users are
  ``passwd-file`` entries, one file per user, so ``add_user`` works on the very next
  login; mail is Maildir under ``mail/<domain>/<localpart>/Maildir``. Postfix talks to
  Dovecot through two unix sockets in Dovecot's ``base_dir``: LMTP for delivery and the
  auth socket for SASL.
* Dovecot counts a connection whose remote and local addresses are equal as secure,
  which on loopback would let a plain-text LOGIN through before STARTTLS. So its plain
  listener is on 127.0.0.2 and a byte relay in *this* process serves
  ``imap_plain_port`` on 127.0.0.1; Dovecot then sees 127.0.0.1 -> 127.0.0.2 and
  enforces ``LOGINDISABLED`` as it would on a network. (Only that port is relayed.)
* Postfix runs as a private instance (``postfix -c <workdir>/postfix/etc start``, as
  root, which Postfix requires) with its own queue and data directories, listening only
  on two submission ports: implicit TLS (465-style) and STARTTLS-required (587-style).
  The only deliverable domain is ``prxmail.test`` (virtual, over LMTP); other domains
  and ``rejected@prxmail.test`` are refused at RCPT with 5xx, unauthenticated clients
  too, DNS is never consulted, and there is no local delivery. An unknown user at
  ``prxmail.test`` is accepted at RCPT and then bounced by Dovecot's LMTP (the
  non-delivery report lands in the sender's INBOX): tests should use fresh users.
* Every port is a free 127.0.0.1 port picked at start; if a server cannot bind (another
  process took the port meanwhile), the whole start is retried with fresh ports.
  Readiness means a real greeting (after a TLS handshake on the TLS ports), within a
  bounded deadline; a server that dies during startup fails fast with its log tail.
* ``stop()`` stops what was started: Dovecot by the pid we started, Postfix by
  ``postfix -c DIR stop`` and a bounded wait on the master pid recorded at start
  (SIGTERM/SIGKILL to that pid if needed). The workdir is then removed if we made it.
* A watchdog process holds a pipe from the owner; if the owner dies without ``stop()``
  (a test run killed by a timeout), it stops the servers it can prove are ours, so
  nothing keeps running. The workdir is then kept for the post-mortem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    # Imported where the servers start: the watchdog runs this file as a script, where
    # the tests package is not importable (and needs no authorization server).
    from tests.oauthserver import AuthServer


__all__ = [
    "DOMAIN",
    "REJECTED_ADDRESS",
    "SMTP_SIZE_LIMIT",
    "MailServers",
    "MailServersError",
    "User",
    "ensure_installed",
    "mail_servers",
    "start_mail_servers",
]

DOMAIN = "prxmail.test"
HOST = "127.0.0.1"
# The address Postfix refuses at RCPT with a 5xx, for tests of refused recipients.
REJECTED_ADDRESS = f"rejected@{DOMAIN}"
DEFAULT_USERS = ("alice", "bob", "bot")
# Postfix's message_size_limit (advertised as SIZE in EHLO). Room for the 50 MB
# attachment tests (about 68 MB once base64-encoded); stated so tests of oversized
# messages can rely on it.
SMTP_SIZE_LIMIT = 100 * 1024 * 1024
# Concurrent IMAP sessions per user and client address.
IMAP_MAX_USER_IP_CONNECTIONS = 100
# Concurrent IMAP sessions in all (imap-login and imap process_limit): the many-accounts
# benchmark opens 100 plus its own injector connections, with room for a reconnect wave.
IMAP_LOGIN_PROCESS_LIMIT = 300
# Connections each Dovecot helper service (log, anvil, auth, stats) accepts: one from
# every login and imap process, so it must exceed twice IMAP_LOGIN_PROCESS_LIMIT. This
# is Dovecot 2.3's default, written out so that raising the limit above stays honest.
DOVECOT_CLIENT_LIMIT = 1000
# With ``imap_sessions`` (the many-accounts benchmark at N = 1,000) imap-login runs in
# Dovecot's high-performance mode instead: this many long-lived login processes
# (service_count = 0), each proxying up to all the sessions, so 1,000 TLS sessions cost
# 1,000 imap processes and a few login processes, not 2,000 processes.
IMAP_LOGIN_SHARED_PROCESSES = 4
# Inotify instances one session's imap process takes while it IDLEs (one per watched
# mailbox), and what other Dovecots of the same uid (parallel test runs) may hold.
INOTIFY_PER_SESSION = 1
INOTIFY_HEADROOM = 512

# Dovecot treats a connection whose remote and local addresses are equal as secure
# (login-common: "secured = ssl || trusted || remote_ip == local_ip"), so on loopback it
# would accept a plain-text LOGIN before STARTTLS. Its plain listener therefore sits on
# this second loopback address, behind a byte relay on HOST: the relay connects from
# 127.0.0.1, the addresses differ, and LOGINDISABLED is enforced as on a real network.
PLAIN_BACKEND_HOST = "127.0.0.2"
# Each relay read: one TLS record's worth, so a STARTTLS handshake and mail both pass
# without a second buffer; sendall() blocks, so one direction never holds more.
RELAY_CHUNK = 16 * 1024
# Relayed connections at once (two threads each). Tests open a handful; the bound keeps
# a runaway client loop from exhausting threads in the test process.
RELAY_MAX_CONNECTIONS = 128

APT_PACKAGES = ("dovecot-imapd", "dovecot-lmtpd", "postfix")
DOVECOT_BIN = "/usr/sbin/dovecot"
POSTFIX_BIN = "/usr/sbin/postfix"
LMTP_MODULE = "/usr/lib/dovecot/lmtp"
DOVEADM_BIN = "/usr/bin/doveadm"
_MAILDIR_SUBDIRS = ("cur", "new", "tmp")
POLICY_RC_D = pathlib.Path("/usr/sbin/policy-rc.d")
# The unprivileged user the dovecot-core package creates; the private Dovecot runs as it.
DOVECOT_USER = "dovecot"
# The OAuth client registered on the test authorization server at start (a
# confidential client; tests register others, public ones too, as they need).
OAUTH_CLIENT_ID = "prxmail-tests"

# Startup is normally well under a second per server; the bound is generous for a
# loaded CI machine but still fails a broken setup quickly.
STARTUP_TIMEOUT = 20.0
# How long a polite stop may take before the process is killed.
STOP_TIMEOUT = 10.0
# Installing three packages on a fresh machine (download included).
APT_TIMEOUT = 600.0
POLL_INTERVAL = 0.05
# Full restarts with fresh ports when a server fails to start (a port race).
START_ATTEMPTS = 3
# How much of each log a failure message quotes: enough for the last few lines that
# usually name the problem, short enough to read in a pytest report.
LOG_TAIL_BYTES = 4000


class MailServersError(RuntimeError):
    """The private mail servers could not be installed, started or stopped."""


@attrs.frozen
class User:
    """A mailbox on the private servers.

    ``address`` is also the IMAP and SMTP login name. The password is left out of the
    repr so it never lands in a test report or log.
    """

    address: str
    password: str = attrs.field(repr=False)

    @property
    def localpart(self) -> str:
        """The part before ``@``."""
        return self.address.partition("@")[0]


# ---------------------------------------------------------------------------
# Installation


def _missing_binaries() -> list[str]:
    return [p for p in (DOVECOT_BIN, POSTFIX_BIN, LMTP_MODULE) if not os.path.exists(p)]


def ensure_installed() -> None:
    """Install Dovecot (IMAP, LMTP) and Postfix with apt if any piece is missing.

    The system-wide services are kept from starting by a temporary policy-rc.d.

    Raises:
        MailServersError: not root, no apt-get, or the installation failed.
    """
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise MailServersError(
            f"missing {', '.join(_missing_binaries())}; installing them needs root "
            f"(apt-get install {' '.join(APT_PACKAGES)})"
        )
    if shutil.which("apt-get") is None:
        raise MailServersError("missing Dovecot/Postfix and no apt-get to install them")
    # Parallel test runs on a fresh machine would otherwise race for the dpkg lock
    # and for policy-rc.d (one removing it while the other still installs).
    with _install_lock():
        if not _missing_binaries():
            return
        before = _system_service_pids()
        created_policy = False
        if not POLICY_RC_D.exists():
            POLICY_RC_D.write_text(
                "#!/bin/sh\n# Written by prxmail tests/mailservers.py during apt-get install:\n"
                "# do not start system-wide services.\nexit 101\n"
            )
            POLICY_RC_D.chmod(0o755)
            created_policy = True
        try:
            result = _apt_install()
            if result.returncode != 0:
                # Package lists may be missing on a fresh machine; update once, retry.
                subprocess.run(
                    ["apt-get", "update", "-q"],
                    capture_output=True,
                    timeout=APT_TIMEOUT,
                    check=False,
                    env=_apt_env(),
                )
                result = _apt_install()
            if result.returncode != 0:
                raise MailServersError(
                    f"apt-get install {' '.join(APT_PACKAGES)} failed "
                    f"(exit {result.returncode}):\n{result.stdout[-LOG_TAIL_BYTES:]}"
                )
        finally:
            if created_policy:
                POLICY_RC_D.unlink(missing_ok=True)
            _stop_services_started_since(before)
    if missing := _missing_binaries():
        raise MailServersError(f"still missing after apt-get install: {', '.join(missing)}")


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    import fcntl

    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
    fd = os.open(f"{lock_dir}/prxmail-mailservers-install.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for one apt-get run at most
        yield
    finally:
        os.close(fd)


def _system_service_pids() -> dict[str, set[int]]:
    """Pids of the system-wide Dovecot and Postfix masters (not private instances)."""
    found: dict[str, set[int]] = {"dovecot": set(), "postfix": set()}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        # A private instance always names its config with -c; the system one does not.
        if argv[0] == DOVECOT_BIN.encode() and b"-c" not in argv:
            found["dovecot"].add(int(entry.name))
        if argv[0].endswith(b"/postfix/sbin/master") and cwd == "/var/spool/postfix":
            found["postfix"].add(int(entry.name))
    return found


def _stop_services_started_since(before: dict[str, set[int]]) -> None:
    """Stop system-wide services that appeared during our install (and only those)."""
    after = _system_service_pids()
    commands = {"dovecot": [DOVECOT_BIN, "stop"], "postfix": [POSTFIX_BIN, "stop"]}
    for name, command in commands.items():
        if after[name] - before[name] and not before[name]:
            print(f"mail servers: stopping the system {name} the install started", file=sys.stderr)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(command, capture_output=True, timeout=STOP_TIMEOUT, check=False)


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _apt_install() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            # Wait for a dpkg lock held by someone else (unattended-upgrades, ...).
            "-o",
            "DPkg::Lock::Timeout=300",
            *APT_PACKAGES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=APT_TIMEOUT,
        check=False,
        env=_apt_env(),
    )


# ---------------------------------------------------------------------------
# Configuration templates

_DOVECOT_CONF = """\
# Private Dovecot for prxmail tests (rootless: every process runs as {run_user}).
instance_name = {instance_name}
base_dir = {base_dir}
state_dir = {state_dir}
protocols = imap lmtp
listen = {host}
log_path = {log_file}
info_log_path = {log_file}
debug_log_path = {log_file}
auth_verbose = yes

default_login_user = {run_user}
default_internal_user = {run_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}

ssl = required
ssl_cert = <{cert_file}
ssl_key = <{key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
# XOAUTH2 and OAUTHBEARER beside the passwords: the oauth2 passdb below validates
# bearer tokens against the test authorization server (tests/oauthserver.py).
auth_mechanisms = plain login xoauth2 oauthbearer
# Tests log in with wrong passwords on purpose, all from 127.0.0.1: no 2 s failure
# delay and no per-IP penalty (which grows to 15 s), or the suite crawls. A failed
# login still takes up to 0.5 s (Dovecot flushes failures on a 500 ms timer).
auth_failure_delay = 0

passdb {{
  driver = passwd-file
  # One file per user: Dovecot stats a passwd-file at most once a second, so a user
  # appended to a shared file could be "unknown" for up to a second; a new file is
  # read on first use. Login names cannot contain "/" (auth_username_chars).
  args = scheme=PLAIN username_format=%u {passwd_dir}/%u
  # Passwords, and the lookups without a login (LMTP's user check, "none"): a bearer
  # token is never compared with a password.
  mechanisms = plain login none
}}
passdb {{
  driver = oauth2
  # Only for the token mechanisms: a password is never sent to the introspection URL.
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail_root}/%d/%n
}}
mail_location = maildir:~/Maildir
# Benchmarks and concurrency tests open many sessions as one user from one address;
# Dovecot's default of 10 per user+IP would refuse them.
mail_max_userip_connections = {max_userip}
namespace inbox {{
  inbox = yes
  separator = /
}}

# Benchmarks watch 100 mailboxes from one process (issue 7, N = 100). Every TLS session
# keeps its own imap-login process as the TLS proxy (service_count = 1, the default
# high-security mode), and imap-login's process_limit defaults to default_process_limit
# (100): the 101st login waited for a free process and clients timed out and
# reconnected in a loop. IMAP_LOGIN_PROCESS_LIMIT sessions at once, and as many imap
# processes; default_client_limit must cover them, because the log, anvil, auth and
# stats services take one connection from each of those processes. With imap_sessions
# (N = 1,000) imap-login runs in high-performance mode instead: a few long-lived login
# processes proxy every TLS session (MailServers._login_service).
default_client_limit = {client_limit}
service imap-login {{
  chroot =
{login_service}  inet_listener imap {{
    address = {plain_backend_host}
    port = {plain_backend_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imap_tls_port}
    ssl = yes
  }}
}}
service imap {{
  process_limit = {imap_limit}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
"""

# Dovecot's oauth2 passdb settings (doc/example-config/dovecot-oauth2.conf.ext): every
# token is POSTed as ``token=...`` to the RFC 7662 introspection endpoint of the test
# authorization server, which answers {"active": true, "username": ...}.
_DOVECOT_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = {introspection_url}
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {ca_file}
"""

_POSTFIX_MAIN_CF = """\
# Private Postfix for prxmail tests: submission only, delivery to Dovecot over LMTP.
compatibility_level = 3.6
config_directory = {config_dir}
queue_directory = {queue_dir}
data_directory = {data_dir}
maillog_file = {log_file}
maillog_file_prefixes = {log_dir}
mail_owner = postfix
setgid_group = postdrop

myhostname = mail.{domain}
mydomain = {domain}
myorigin = $mydomain
mydestination =
mynetworks = 127.0.0.1/32
inet_interfaces = {host}
inet_protocols = ipv4
smtp_bind_address = {host}
relayhost =
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
default_transport = error:5.7.1 outbound relay is disabled
relay_transport = error:5.7.1 outbound relay is disabled
virtual_mailbox_domains = {domain}
virtual_transport = lmtp:unix:{lmtp_socket}
biff = no
append_dot_mydomain = no

# No DNS anywhere: every address is numeric or a unix socket.
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no

smtpd_banner = $myhostname ESMTP prxmail-test
message_size_limit = {size_limit}
smtpd_tls_chain_files = {key_file}, {cert_file}
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_session_cache_database =
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth_socket}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
broken_sasl_auth_clients = no

# Foreign domains are refused even for authenticated users (no relay at all); the
# access table refuses rejected@; then only authenticated clients may send.
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions =
    check_recipient_access texthash:{config_dir}/recipient_access,
    permit_sasl_authenticated,
    reject
smtpd_sender_restrictions =
smtpd_client_restrictions =
"""

# Only the services a submission-to-LMTP path needs; no chroot (the queue directory
# has none of the files a chroot would need), no port 25.
_POSTFIX_MASTER_CF = """\
{host}:{smtp_tls_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
{host}:{smtp_starttls_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


# ---------------------------------------------------------------------------
# Helpers


def _free_ports(count: int, host: str = HOST) -> list[int]:
    """Pick ``count`` distinct free loopback ports (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _greets(port: int, greeting: bytes, context: ssl.SSLContext | None, host: str = HOST) -> bool:
    """True when the server on ``port`` sends its greeting (over TLS when ``context``)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as raw:
            if context is None:
                line = raw.makefile("rb").readline(512)
            else:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    line = tls.makefile("rb").readline(512)
    except (OSError, ssl.SSLError):
        return False
    return line.startswith(greeting)


def _tail(path: pathlib.Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return data[-limit:].decode("utf-8", "replace")


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rpartition(")")[2].split()[0] != "Z"


_MAILDIR_NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)(?:Q(\d+))?")


def _maildir_order(name: str) -> tuple[int, int, int, int, str]:
    """Sort key for Maildir file names: delivery second, microsecond, then counter.

    File mtimes are only as fine as the kernel's coarse clock (milliseconds), so
    messages delivered in a burst tie on mtime; the numbers in the name break the tie
    (compared as numbers: "M99" is before "M100").
    """
    m = _MAILDIR_NAME.match(name)
    if m is None:
        return (0, 0, 0, 0, name)
    secs, usecs, pid, counter = m.groups()
    return (int(secs), int(usecs), int(pid), int(counter or 0), name)


def _chown(path: pathlib.Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)


class _Relay:
    """Byte relay from HOST:port to a backend address, two threads per connection.

    Only for Dovecot's plain IMAP port (see PLAIN_BACKEND_HOST). It copies bytes both
    ways without looking at them, so STARTTLS and the TLS that follows pass through.
    Half-closes are forwarded; an error on either side closes both sockets.
    """

    def __init__(self, port: int, backend: tuple[str, int]) -> None:
        self._backend = backend
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, port))
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"imap-relay-{port}", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by close()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            # Two sockets per relayed connection.
            if self._closed or len(self._sockets) >= 2 * RELAY_MAX_CONNECTIONS:
                return False
            self._sockets.add(sock)
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            if not self._track(client):
                return
            try:
                upstream = socket.create_connection(self._backend, timeout=STARTUP_TIMEOUT)
            except OSError:
                return  # Dovecot is down (restarting): the client sees the close
            upstream.settimeout(None)
            if not self._track(upstream):
                return
            back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
            back.start()
            self._pump(client, upstream)
            back.join()
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._sockets.discard(sock)
                    sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(RELAY_CHUNK):
                dst.sendall(data)
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        else:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting and cut every relayed connection."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(STOP_TIMEOUT)


# ---------------------------------------------------------------------------
# The servers


class MailServers:
    """Running private Dovecot and Postfix; see the module docstring.

    Attributes:
        host: Loopback address every server listens on.
        imap_tls_port: IMAP with implicit TLS.
        imap_plain_port: IMAP in plain text offering STARTTLS; LOGIN is refused before TLS.
        smtp_tls_port: Submission with implicit TLS (465-style).
        smtp_starttls_port: Submission requiring STARTTLS (587-style).
        ca_file: PEM of the throwaway CA that signed the servers' certificate.
        log_dir: Directory holding ``dovecot.log`` and ``postfix.log``.
        users: The pre-created users by local part ("alice", "bob", "bot", ...).
        oauth: The test OAuth 2 authorization server (tests/oauthserver.py) whose
            introspection endpoint Dovecot's oauth2 passdb asks, so XOAUTH2 and
            OAUTHBEARER work on IMAP and, through Dovecot SASL, on SMTP submission.
        oauth_client_secret: Secret of the client :data:`OAUTH_CLIENT_ID` there.
        workdir: The directory holding everything (configs, mail, logs, TLS files).
        dovecot_log, postfix_log: The two server logs, inside ``log_dir``.
        imap_sessions: IMAP sessions Dovecot serves at once (all clients together).
        host_changes: What the start raised on the machine for ``imap_sessions``
            (inotify sysctls, the descriptor limit), one line each; empty by default.

    The methods are synchronous and block (``wait_for_messages`` polls); from trio
    code call them through ``trio.to_thread.run_sync``. They are thread-safe.
    """

    host: str
    imap_tls_port: int
    imap_plain_port: int
    smtp_tls_port: int
    smtp_starttls_port: int
    ca_file: pathlib.Path
    log_dir: pathlib.Path
    users: dict[str, User]
    oauth: AuthServer

    def __init__(
        self, workdir: pathlib.Path, *, remove_workdir: bool, imap_sessions: int | None = None
    ) -> None:
        self.workdir = workdir
        self._remove_workdir = remove_workdir
        # None: the suite's configuration (one login process per TLS session, up to
        # IMAP_LOGIN_PROCESS_LIMIT). A number: that many sessions at once, through
        # shared login processes (see _login_service).
        self._shared_login = imap_sessions is not None
        self.imap_sessions = IMAP_LOGIN_PROCESS_LIMIT if imap_sessions is None else imap_sessions
        if self.imap_sessions < 1:
            raise ValueError(f"imap_sessions must be at least 1, got {imap_sessions}")
        # What start() changed on the machine for imap_sessions (sysctls, fd limit), for
        # the caller to report.
        self.host_changes: list[str] = []
        self.host = HOST
        (
            self.imap_tls_port,
            self.imap_plain_port,
            self.smtp_tls_port,
            self.smtp_starttls_port,
        ) = _free_ports(4)
        (self._plain_backend_port,) = _free_ports(1, PLAIN_BACKEND_HOST)
        self._relay: _Relay | None = None
        self._oauth: AuthServer | None = None
        self.oauth_client_secret = secrets.token_urlsafe(16)
        self.users = {}
        self._lock = threading.Lock()
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._postfix_pid: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: int | None = None
        self._stopped = False
        self._maildir_counter = 0

        pw = pwd.getpwnam(DOVECOT_USER)
        self._uid, self._gid = pw.pw_uid, pw.pw_gid

        self.tls_dir = workdir / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self._cert_file = self.tls_dir / "server.pem"
        self._key_file = self.tls_dir / "server.key"
        self.log_dir = workdir / "logs"
        self.dovecot_log = self.log_dir / "dovecot.log"
        self.postfix_log = self.log_dir / "postfix.log"
        self._dovecot_dir = workdir / "dovecot"
        self._dovecot_conf = self._dovecot_dir / "dovecot.conf"
        self._passwd_dir = self._dovecot_dir / "users"
        self._base_dir = self._dovecot_dir / "run"
        self._mail_root = workdir / "mail"
        self._postfix_dir = workdir / "postfix"
        self._postfix_conf_dir = self._postfix_dir / "etc"
        self._postfix_queue_dir = self._postfix_dir / "queue"

    # -- setup ---------------------------------------------------------------

    def _write_files(self) -> None:
        import trustme

        uid, gid = self._uid, self._gid
        # Postfix's unprivileged processes and the dovecot user must traverse the tree.
        self.workdir.chmod(0o755)
        for d in (
            self.tls_dir,
            self.log_dir,
            self._postfix_dir,
            self._postfix_conf_dir,
            self._postfix_queue_dir,
        ):
            d.mkdir(mode=0o755)
        for d in (self._dovecot_dir, self._base_dir, self._dovecot_dir / "state"):
            d.mkdir(mode=0o755)
            _chown(d, uid, gid)
        self._passwd_dir.mkdir(mode=0o700)  # passwords: Dovecot's user (and root) only
        _chown(self._passwd_dir, uid, gid)
        self._mail_root.mkdir(mode=0o700)
        _chown(self._mail_root, uid, gid)

        ca = trustme.CA(organization_name="prxmail test CA")
        cert = ca.issue_cert("localhost", HOST)
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.ca_file.chmod(0o644)
        with self._cert_file.open("wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        self._cert_file.chmod(0o644)
        fd = os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.private_key_pem.bytes())
        _chown(self._key_file, uid, gid)  # Dovecot reads it as its user; Postfix as root.

        for log in (self.dovecot_log, self.postfix_log):
            log.touch(mode=0o644)
        _chown(self.dovecot_log, uid, gid)

        # The authorization server binds its (free) port now, before Dovecot's config
        # names it; it runs in a thread of this process, signed by the same CA.
        from tests.oauthserver import AuthServer, server_ssl_context

        self._oauth = self.oauth = AuthServer(server_ssl_context(cert)).start()
        self.oauth.register_client(OAUTH_CLIENT_ID, self.oauth_client_secret)
        oauth2_conf = self._dovecot_dir / "dovecot-oauth2.conf.ext"
        oauth2_conf.write_text(
            _DOVECOT_OAUTH2_CONF.format(
                introspection_url=self.oauth.introspection_url, ca_file=self.ca_file
            )
        )

        self._dovecot_conf.write_text(
            _DOVECOT_CONF.format(
                run_user=DOVECOT_USER,
                instance_name=f"prxmail-test-{self.imap_tls_port}",
                base_dir=self._base_dir,
                state_dir=self._dovecot_dir / "state",
                host=HOST,
                log_file=self.dovecot_log,
                uid=uid,
                gid=gid,
                cert_file=self._cert_file,
                key_file=self._key_file,
                passwd_dir=self._passwd_dir,
                oauth2_conf=oauth2_conf,
                mail_root=self._mail_root,
                plain_backend_host=PLAIN_BACKEND_HOST,
                plain_backend_port=self._plain_backend_port,
                imap_tls_port=self.imap_tls_port,
                max_userip=IMAP_MAX_USER_IP_CONNECTIONS,
                login_service=self._login_service(),
                imap_limit=self.imap_sessions,
                client_limit=self._client_limit(),
            )
        )
        (self._postfix_conf_dir / "main.cf").write_text(
            _POSTFIX_MAIN_CF.format(
                config_dir=self._postfix_conf_dir,
                queue_dir=self._postfix_queue_dir,
                data_dir=self._postfix_dir / "data",
                log_file=self.postfix_log,
                log_dir=self.log_dir,
                domain=DOMAIN,
                host=HOST,
                lmtp_socket=self._base_dir / "lmtp",
                auth_socket=self._base_dir / "auth-postfix",
                key_file=self._key_file,
                cert_file=self._cert_file,
                size_limit=SMTP_SIZE_LIMIT,
            )
        )
        (self._postfix_conf_dir / "master.cf").write_text(
            _POSTFIX_MASTER_CF.format(
                host=HOST,
                smtp_tls_port=self.smtp_tls_port,
                smtp_starttls_port=self.smtp_starttls_port,
            )
        )
        (self._postfix_conf_dir / "recipient_access").write_text(
            f"{REJECTED_ADDRESS} REJECT 5.1.1 this recipient is refused (test address)\n"
        )
        # Postfix re-reads a configuration file modified within the last couple of
        # seconds until it is "old enough" (in case an editor is still writing it),
        # which alone cost two seconds per start. Ours are complete: backdate them.
        past = time.time() - 60
        for conf in self._postfix_conf_dir.iterdir():
            os.utime(conf, (past, past))

    def _login_service(self) -> str:
        """The imap-login settings (inside its service block) for the session count."""
        if not self._shared_login:
            # High-security mode (service_count = 1): one login process per session.
            return f"  process_limit = {self.imap_sessions}\n"
        # High-performance mode: long-lived login processes, each proxying many TLS
        # sessions (two descriptors each); started up front so no login waits for one.
        return (
            "  service_count = 0\n"
            f"  process_min_avail = {IMAP_LOGIN_SHARED_PROCESSES}\n"
            f"  process_limit = {IMAP_LOGIN_SHARED_PROCESSES}\n"
            f"  client_limit = {self.imap_sessions}\n"
            "  vsz_limit = 1G\n"
        )

    def _client_limit(self) -> int:
        # log, anvil, auth and stats take one connection from every login and imap
        # process: the sessions' imap processes plus the login processes, with room.
        logins = IMAP_LOGIN_SHARED_PROCESSES if self._shared_login else self.imap_sessions
        return max(DOVECOT_CLIENT_LIMIT, self.imap_sessions + logins + 100)

    def _prepare_host(self) -> None:
        """Raise what IMAP sessions beyond the suite's need, only where it is lower:
        the inotify instances Dovecot's uid may hold (else IDLE falls back to polling)
        and this process's descriptor limit (Dovecot and clients inherit it)."""
        if not self._shared_login:
            return
        need = self.imap_sessions * INOTIFY_PER_SESSION + INOTIFY_HEADROOM
        knob = pathlib.Path("/proc/sys/fs/inotify/max_user_instances")
        have = int(knob.read_text())
        if have < need:
            knob.write_text(f"{need}\n")
            self.host_changes.append(f"fs.inotify.max_user_instances {have} -> {need}")
        watches = pathlib.Path("/proc/sys/fs/inotify/max_user_watches")
        have = int(watches.read_text())
        need = 8 * need
        if have < need:
            watches.write_text(f"{need}\n")
            self.host_changes.append(f"fs.inotify.max_user_watches {have} -> {need}")
        # A proxied session holds two descriptors in a login process; a client one.
        need = 3 * self.imap_sessions + 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            self.host_changes.append(f"RLIMIT_NOFILE {soft} -> {new}")

    # -- users ---------------------------------------------------------------

    def add_user(self, localpart: str, password: str | None = None) -> User:
        """Create a mailbox user, usable at once for IMAP login and delivery.

        Args:
            localpart: The part before ``@prxmail.test``; lower-case letters, digits,
                ``.``, ``_`` and ``-`` only (``+`` is a detail delimiter, so no).
            password: The password; a random one when ``None``.

        Returns:
            The new user (also stored in :attr:`users`).

        Raises:
            ValueError: a bad local part or password, or the user exists.
        """
        allowed = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
        if not localpart or not set(localpart) <= allowed:
            raise ValueError(f"unusable local part {localpart!r}")
        if password is None:
            password = secrets.token_urlsafe(12)
        if not password or any(c in password for c in ":\r\n\0") or not password.isprintable():
            raise ValueError("password must be printable and contain no ':'")
        with self._lock:
            if localpart in self.users:
                raise ValueError(f"user {localpart!r} exists")
            user = User(address=f"{localpart}@{DOMAIN}", password=password)
            # Written under a temporary name and renamed, so Dovecot never reads half.
            final = self._passwd_dir / user.address
            tmp = self._passwd_dir / f".{user.address}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{user.address}:{{PLAIN}}{password}::::::\n")
            _chown(tmp, self._uid, self._gid)
            tmp.rename(final)
            self.users[localpart] = user
        return user

    def refresh_token(self, user: User, client_id: str = OAUTH_CLIENT_ID) -> str:
        """Issue a refresh token for ``user`` on :attr:`oauth`, as after consent."""
        return self.oauth.issue_refresh_token(user.address, client_id)

    def maildir(self, user: User) -> pathlib.Path:
        """Return the root of ``user``'s Maildir (holding ``new``, ``cur``, ``tmp``).

        It may not exist yet: Dovecot creates it on first login or delivery.
        """
        return self._mail_root / DOMAIN / user.localpart / "Maildir"

    def inbox_messages(self, user: User) -> list[bytes]:
        """Return the raw messages in ``user``'s INBOX (``new`` and ``cur``), oldest first.

        Raises:
            MailServersError: the Maildir kept changing under us (a very busy mailbox).
        """
        root = self.maildir(user)
        # Dovecot renames files from new/ to cur/ (and changes flags in the name) while
        # we read; a vanished file means "list again". Bounded so we cannot spin.
        for _ in range(50):
            try:
                found = []
                for sub in ("new", "cur"):
                    d = root / sub
                    if not d.is_dir():
                        continue
                    for entry in os.scandir(d):
                        if entry.is_file():
                            found.append(
                                (entry.stat().st_mtime_ns, _maildir_order(entry.name), entry.path)
                            )
                found.sort()
                return [pathlib.Path(p).read_bytes() for _, _, p in found]
            except FileNotFoundError:
                time.sleep(0.01)
        raise MailServersError(f"Maildir of {user.address} kept changing while read")

    def wait_for_messages(self, user: User, count: int, timeout: float = 10) -> list[bytes]:
        """Poll ``user``'s INBOX until it holds at least ``count`` messages.

        Args:
            user: Whose Maildir to watch.
            count: How many messages to wait for.
            timeout: Seconds before giving up.

        Returns:
            All messages in the INBOX (at least ``count``), oldest first.

        Raises:
            TimeoutError: fewer than ``count`` messages arrived in time; the message
                quotes the Postfix log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            messages = self.inbox_messages(user)
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{user.address} has {len(messages)} of {count} messages after "
                    f"{timeout}s; postfix log tail:\n{_tail(self.postfix_log, 1500)}"
                )
            time.sleep(POLL_INTERVAL)

    def deliver_to_maildir(self, user: User, messages: Iterable[bytes]) -> list[pathlib.Path]:
        """Put raw messages straight into ``user``'s INBOX, bypassing SMTP (fast bulk fill).

        Files are written the Maildir way (``tmp/`` then renamed into ``new/``) and owned
        by Dovecot's user, so Dovecot can flag and move them; it sees them at its next
        mailbox sync (SELECT, NOOP, or at once during IDLE).

        Args:
            user: Whose INBOX.
            messages: Raw RFC 5322 messages (LF or CRLF line ends).

        Returns:
            The paths of the new files, in order.
        """
        root = self.maildir(user)
        created = []
        with self._lock:
            # Create missing directories as Dovecot's user would: owned by it, 0700.
            for d in (root.parent.parent, root.parent, root, *(root / x for x in _MAILDIR_SUBDIRS)):
                if not d.exists():
                    d.mkdir(mode=0o700)
                    _chown(d, self._uid, self._gid)
            for raw in messages:
                self._maildir_counter += 1
                now = time.time_ns()
                name = (
                    f"{now // 1_000_000_000}.M{now // 1000 % 1_000_000}"
                    f"P{os.getpid()}Q{self._maildir_counter}.prxmail-test"
                )
                tmp = root / "tmp" / name
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(raw)
                _chown(tmp, self._uid, self._gid)
                final = root / "new" / name
                tmp.rename(final)
                created.append(final)
        return created

    def _doveadm(self, *args: str) -> str:
        result = subprocess.run(
            [DOVEADM_BIN, "-c", str(self._dovecot_conf), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
            user=self._uid,
            group=self._gid,
            extra_groups=[],
            cwd=self._dovecot_dir,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
        if result.returncode != 0:
            raise MailServersError(f"doveadm {args[0]} failed: {result.stdout.strip()}")
        return result.stdout

    def uidvalidity(self, user: User, mailbox: str = "INBOX") -> int:
        """Return the UIDVALIDITY of ``user``'s ``mailbox`` (creating INBOX if needed).

        Raises:
            MailServersError: doveadm failed (unknown mailbox, say).
        """
        out = self._doveadm("mailbox", "status", "-u", user.address, "uidvalidity", mailbox)
        return int(out.strip().partition("=")[2])

    def change_uidvalidity(self, user: User, mailbox: str = "INBOX") -> int:
        """Give ``user``'s ``mailbox`` a new, higher UIDVALIDITY, as after a server rebuild.

        Messages stay; a client must treat every UID it knew as invalid.

        Returns:
            The new UIDVALIDITY.

        Raises:
            MailServersError: doveadm failed.
        """
        new = self.uidvalidity(user, mailbox) + 1
        self._doveadm("mailbox", "update", "-u", user.address, "--uid-validity", str(new), mailbox)
        return new

    # -- TLS -----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts only the throwaway CA (hostname checked)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    # -- Dovecot -------------------------------------------------------------

    def start_dovecot(self) -> None:
        """Start the private Dovecot and wait until its listeners accept.

        Raises:
            MailServersError: it exited or did not listen within the startup bound.
        """
        if self._dovecot is not None:
            return
        with self.dovecot_log.open("ab") as out:
            self._dovecot = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self._dovecot_conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self._uid,
                group=self._gid,
                extra_groups=[],
                # Own process group: a terminal's Ctrl-C reaches only us, and we stop
                # Dovecot in order.
                start_new_session=True,
                cwd=self._dovecot_dir,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )
        self._wait_ready(
            "dovecot",
            lambda: (
                _greets(self.imap_tls_port, b"* OK", self._probe_context)
                and _greets(self._plain_backend_port, b"* OK", None, PLAIN_BACKEND_HOST)
                and (self._base_dir / "lmtp").exists()
                and (self._base_dir / "auth-postfix").exists()
            ),
            self.dovecot_log,
            alive=lambda: self._dovecot is not None and self._dovecot.poll() is None,
        )

    def stop_dovecot(self) -> None:
        """Stop the private Dovecot by the pid we started (SIGTERM, then SIGKILL)."""
        proc, self._dovecot = self._dovecot, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The group is the one Dovecot's master leads (start_new_session).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        # The master waits for its children before exiting on SIGTERM; if it was
        # killed, no child may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart_dovecot(self) -> None:
        """Stop and start Dovecot on the same ports; mailboxes and users stay.

        Raises:
            MailServersError: it did not come back.
        """
        self.stop_dovecot()
        self.start_dovecot()

    # -- Postfix -------------------------------------------------------------

    def _postfix(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX_BIN, "-c", str(self._postfix_conf_dir), action],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )

    def _postfix_master_pid(self) -> int | None:
        try:
            return int((self._postfix_queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start_postfix(self) -> None:
        """Start the private Postfix (as root) and wait until both ports greet.

        Raises:
            MailServersError: ``postfix start`` failed or the ports never opened.
        """
        if self._postfix_pid is not None:
            return
        result = self._postfix("start")
        if result.returncode != 0:
            raise MailServersError(
                f"postfix start failed (exit {result.returncode}): {result.stdout.strip()}\n"
                f"postfix log tail:\n{_tail(self.postfix_log)}"
            )
        # `postfix start` returns once the master is up (master -w), pid file written.
        self._postfix_pid = self._postfix_master_pid()
        if self._postfix_pid is None:
            raise MailServersError(
                f"postfix started but wrote no master.pid; log tail:\n{_tail(self.postfix_log)}"
            )
        pid = self._postfix_pid
        self._wait_ready(
            "postfix",
            lambda: (
                _greets(self.smtp_tls_port, b"220 ", self._probe_context)
                and _greets(self.smtp_starttls_port, b"220 ", None)
            ),
            self.postfix_log,
            alive=lambda: _pid_alive(pid),
        )

    def flush_postfix(self) -> None:
        """Ask Postfix to retry deferred mail now (after Dovecot was down, say)."""
        self._postfix("flush")

    def stop_postfix(self) -> None:
        """Stop the private Postfix with ``postfix -c DIR stop``; wait for its master to exit
        and its submission ports to refuse connections.

        If that does not work (say its directory was deleted under it), the master pid
        recorded at start is sent SIGTERM, then SIGKILL.

        Raises:
            MailServersError: the master did not exit even when killed.
        """
        pid, self._postfix_pid = self._postfix_pid, None
        if pid is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self._postfix("stop")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + STOP_TIMEOUT
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL)
            if not _pid_alive(pid):
                self._wait_smtp_closed()
                return
            # Still the master we started (its pid was read right after our start).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if _pid_alive(pid):
            raise MailServersError(f"postfix master {pid} did not stop")

    def _wait_smtp_closed(self) -> None:
        """Wait until the submission ports refuse connections.

        The master is gone, but an smtpd it started holds the listening sockets it
        inherited until it notices and exits, and meanwhile the kernel still accepts
        connections on them: stopped means refused (bounded by STOP_TIMEOUT).
        """
        deadline = time.monotonic() + STOP_TIMEOUT
        for port in (self.smtp_tls_port, self.smtp_starttls_port):
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((self.host, port), timeout=POLL_INTERVAL).close()
                except OSError:
                    break
                time.sleep(POLL_INTERVAL)
            else:
                raise MailServersError(f"postfix port {port} still accepts after its master exited")

    @property
    def _probe_context(self) -> ssl.SSLContext:
        return self.ssl_context()

    # -- lifecycle -----------------------------------------------------------

    def _wait_ready(
        self,
        name: str,
        ready: Any,
        log: pathlib.Path,
        *,
        alive: Any,
    ) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready():
            if not alive():
                raise MailServersError(f"{name} exited during startup; log tail:\n{_tail(log)}")
            if time.monotonic() >= deadline:
                raise MailServersError(
                    f"{name} not ready after {STARTUP_TIMEOUT}s; log tail:\n{_tail(log)}"
                )
            time.sleep(POLL_INTERVAL)

    def _start_watchdog(self) -> None:
        # The watchdog holds the read end of a pipe whose write end only this process
        # has (os.pipe() fds are not inherited by the servers). When this process
        # exits in any way -- even SIGKILL -- the pipe reaches EOF and the watchdog
        # stops whatever servers are still running, so none outlive a killed test run.
        read_fd, write_fd = os.pipe()
        try:
            with (self.log_dir / "watchdog.log").open("ab") as log:
                self._watchdog = subprocess.Popen(
                    [
                        sys.executable,
                        str(pathlib.Path(__file__).resolve()),
                        "_watchdog",
                        str(read_fd),
                        str(self._dovecot_conf),
                        str(self._base_dir / "master.pid"),
                        str(self._postfix_conf_dir),
                        str(self._postfix_queue_dir),
                    ],
                    pass_fds=(read_fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C must not reach it
                )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watchdog_pipe = write_fd

    def _stop_watchdog(self) -> None:
        fd, self._watchdog_pipe = self._watchdog_pipe, None
        if fd is not None:
            os.close(fd)
        proc, self._watchdog = self._watchdog, None
        if proc is not None:
            try:
                proc.wait(2 * STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start(self) -> None:
        self._prepare_host()
        self._write_files()
        self._start_watchdog()
        for name in DEFAULT_USERS:
            self.add_user(name)
        try:
            self._relay = _Relay(
                self.imap_plain_port, (PLAIN_BACKEND_HOST, self._plain_backend_port)
            )
        except OSError as exc:
            raise MailServersError(
                f"cannot listen on {HOST}:{self.imap_plain_port}: {exc}"
            ) from exc
        self.start_dovecot()
        self.start_postfix()

    def log_tails(self, limit: int = LOG_TAIL_BYTES) -> str:
        """Return the last ``limit`` bytes of the Dovecot and Postfix logs, labelled."""
        return (
            f"--- {self.dovecot_log} (tail) ---\n{_tail(self.dovecot_log, limit)}\n"
            f"--- {self.postfix_log} (tail) ---\n{_tail(self.postfix_log, limit)}"
        )

    def stop(self, *, keep_logs_in: pathlib.Path | None = None) -> None:
        """Stop both servers and remove the workdir (if we created it). Idempotent.

        Args:
            keep_logs_in: Copy the log directory here first (for failing test runs).

        Raises:
            MailServersError: a server did not stop (the other is still stopped).
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            self.stop_postfix()
        finally:
            if self._relay is not None:
                self._relay.close()
            if self._oauth is not None:
                self._oauth.stop()
            try:
                self.stop_dovecot()
            finally:
                self._stop_watchdog()
            if keep_logs_in is not None:
                shutil.copytree(self.log_dir, keep_logs_in, dirs_exist_ok=True)
            if self._remove_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        """Return host, ports, CA file and users (with their throwaway passwords)."""
        return {
            "host": self.host,
            "imap_tls_port": self.imap_tls_port,
            "imap_plain_port": self.imap_plain_port,
            "smtp_tls_port": self.smtp_tls_port,
            "smtp_starttls_port": self.smtp_starttls_port,
            "ca_file": str(self.ca_file),
            "oauth2_token_url": self.oauth.token_url,
            "oauth2_client_id": OAUTH_CLIENT_ID,
            "log_dir": str(self.log_dir),
            "workdir": str(self.workdir),
            "users": {
                name: {"address": u.address, "password": u.password}
                for name, u in self.users.items()
            },
        }

    def prxmail_toml(
        self,
        user: str = "bot",
        allowed: str | Sequence[str] = "alice",
        *,
        imap_security: str = "tls",
        smtp_security: str = "tls",
        imap_port: int | None = None,
        smtp_port: int | None = None,
        tls_ca_file: bool = True,
        state_dir: pathlib.Path | None = None,
    ) -> str:
        """Return a ``prxmail.toml`` for ``user`` that answers mail from ``allowed``.

        Args:
            user: Local part of the account prxmail logs in as (and sends from).
            allowed: ``allowed_senders``: local parts of users here, or entries used
                verbatim when they contain ``@`` or are ``"*"``.
            imap_security: ``"tls"`` (the implicit-TLS port) or ``"starttls"``/``"plain"``
                (the plain port); written as ``imap_security``.
            smtp_security: ``"tls"`` (465-style port) or ``"starttls"``/``"plain"``
                (587-style port); written as ``smtp_security``.
            imap_port, smtp_port: Override the port chosen from the security mode (to
                test a mismatch, say implicit TLS against the STARTTLS port).
            tls_ca_file: Include the throwaway CA; ``False`` tests an untrusted server.
            state_dir: Where prxmail keeps state; default inside the workdir, so it
                goes away with the servers.

        Returns:
            The TOML text: one ``[channels_config.email]`` table.

        Raises:
            KeyError: ``user`` or an ``allowed`` local part is not a user here.
            ValueError: an unknown security mode.
        """
        modes = ("tls", "starttls", "plain")
        if imap_security not in modes or smtp_security not in modes:
            raise ValueError(f"security modes are {modes}")
        if imap_port is None:
            imap_port = self.imap_tls_port if imap_security == "tls" else self.imap_plain_port
        if smtp_port is None:
            smtp_port = self.smtp_tls_port if smtp_security == "tls" else self.smtp_starttls_port
        account = self.users[user]
        entries = [allowed] if isinstance(allowed, str) else list(allowed)
        senders = [e if "@" in e or e == "*" else self.users[e].address for e in entries]
        if state_dir is None:
            state_dir = self.workdir / "prxmail-state"

        def q(value: object) -> str:
            # JSON string escapes are valid TOML basic-string escapes.
            return json.dumps(str(value))

        lines = [
            "[channels_config.email]",
            f"imap_host = {q(self.host)}",
            f"imap_port = {imap_port}",
            f"imap_security = {q(imap_security)}",
            f"smtp_host = {q(self.host)}",
            f"smtp_port = {smtp_port}",
            f"smtp_security = {q(smtp_security)}",
            f"username = {q(account.address)}",
            f"password = {q(account.password)}",
            f"from_address = {q(account.address)}",
            f"allowed_senders = [{', '.join(q(a) for a in senders)}]",
        ]
        if tls_ca_file:
            lines.append(f"tls_ca_file = {q(self.ca_file)}")
        lines.append(f"state_dir = {q(state_dir)}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (
            f"<MailServers {self.host} imap tls={self.imap_tls_port} "
            f"plain={self.imap_plain_port} smtp tls={self.smtp_tls_port} "
            f"starttls={self.smtp_starttls_port} workdir={self.workdir}>"
        )


def start_mail_servers(
    workdir: pathlib.Path | None = None, *, imap_sessions: int | None = None
) -> MailServers:
    """Install if needed, then start private Dovecot and Postfix on free loopback ports.

    Args:
        workdir: An empty directory to hold everything; kept afterwards. When ``None``,
            a fresh temporary directory is made and removed by :meth:`MailServers.stop`.
        imap_sessions: Serve this many IMAP sessions at once through shared login
            processes (Dovecot's high-performance mode), raising the inotify sysctls
            and the descriptor limit where they are lower than that needs (listed in
            :attr:`MailServers.host_changes`). ``None``: the suite's configuration,
            :data:`IMAP_LOGIN_PROCESS_LIMIT` sessions, one login process each.

    Returns:
        The running servers with users "alice", "bob" and "bot".

    Raises:
        MailServersError: not root, installation failed, or a server did not start
            (the message includes the log tail).
    """
    if os.geteuid() != 0:
        raise MailServersError(
            "the private Postfix must be started as root (its master requires it)"
        )
    ensure_installed()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise MailServersError(f"workdir {workdir} is not empty")
        return _start_in(workdir, remove=False, imap_sessions=imap_sessions)
    # A free port can be taken by another process between our probe and the server's
    # bind (parallel test runs do this): then start again with fresh ports.
    for attempt in range(1, START_ATTEMPTS + 1):
        # Short path: Dovecot's unix sockets live inside it (sun_path is ~108 bytes).
        path = pathlib.Path(tempfile.mkdtemp(prefix="prxmail-mail-", dir="/tmp"))
        try:
            return _start_in(path, remove=True, imap_sessions=imap_sessions)
        except MailServersError as exc:
            if attempt == START_ATTEMPTS:
                raise MailServersError(f"{exc}\n(attempt {attempt}; files kept in {path})") from exc
            print(f"mail servers: attempt {attempt} failed, retrying: {exc}", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
    raise AssertionError("unreachable")


def _start_in(path: pathlib.Path, *, remove: bool, imap_sessions: int | None) -> MailServers:
    servers = MailServers(path, remove_workdir=remove, imap_sessions=imap_sessions)
    try:
        servers._start()
    except BaseException:
        servers._remove_workdir = False  # the caller decides what to keep
        with contextlib.suppress(Exception):
            servers.stop()
        raise
    return servers


@contextlib.contextmanager
def mail_servers(
    workdir: pathlib.Path | None = None, *, imap_sessions: int | None = None
) -> Iterator[MailServers]:
    """Run private mail servers for the duration of a ``with`` block.

    Args:
        workdir, imap_sessions: As for :func:`start_mail_servers`.

    Yields:
        The running servers.

    Raises:
        MailServersError: as for :func:`start_mail_servers`.
    """
    servers = start_mail_servers(workdir, imap_sessions=imap_sessions)
    try:
        yield servers
    finally:
        servers.stop()


# ---------------------------------------------------------------------------
# Watchdog (a separate process; see MailServers._start_watchdog)


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _read_pid(path: str) -> int | None:
    try:
        return int(pathlib.Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int, *, group: bool) -> None:
    """SIGTERM, a bounded wait, then SIGKILL (to the process group when ``group``)."""
    kill = os.killpg if group else os.kill
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if not _pid_alive(pid):
            return


def _watchdog_main(argv: list[str]) -> int:
    fd_text, dovecot_conf, dovecot_pidfile, postfix_conf, queue_dir = argv
    fd = int(fd_text)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.read(fd, 64):
        pass
    # EOF: the owner stopped everything and closed the pipe, or it died. Only stop
    # processes that are provably ours: Dovecot by its command line naming our
    # config, the Postfix master by its working directory being our queue.
    pid = _read_pid(dovecot_pidfile)
    if pid is not None and _pid_alive(pid) and dovecot_conf in _cmdline(pid):
        print(f"owner gone: stopping dovecot {pid}", flush=True)
        _terminate(pid, group=True)
    pid = _read_pid(os.path.join(queue_dir, "pid", "master.pid"))
    if pid is not None and _pid_alive(pid) and _cwd(pid).startswith(queue_dir):
        print(f"owner gone: stopping postfix {pid}", flush=True)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [POSTFIX_BIN, "-c", postfix_conf, "stop"],
                capture_output=True,
                timeout=STOP_TIMEOUT,
                check=False,
            )
        _terminate(pid, group=False)
    return 0


# ---------------------------------------------------------------------------
# Command line: `python -m tests.mailservers up`


def _cmd_up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # Handlers first, so a signal during startup still leads to a clean stop.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        servers = start_mail_servers(args.workdir)
    except MailServersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        info = servers.describe()
        info["prxmail_toml"] = servers.prxmail_toml()
        if args.json is not None:
            fd = os.open(args.json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f, indent=2)
        if args.toml is not None:
            # It holds a (throwaway) password: readable by its owner only.
            fd = os.open(args.toml, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(info["prxmail_toml"])
        print(json.dumps(info, indent=2), flush=True)
        print(
            f"mail servers running (logs in {servers.log_dir}); Ctrl-C or SIGTERM stops them",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    finally:
        servers.stop()
    print("mail servers stopped", file=sys.stderr)
    return 0


def _load_description(path: pathlib.Path) -> tuple[dict[str, Any], ssl.SSLContext]:
    info: dict[str, Any] = json.loads(path.read_text())
    context = ssl.create_default_context(cafile=info["ca_file"])
    return info, context


def _cmd_send(args: argparse.Namespace) -> int:
    # smtplib/imaplib are fine here: this is test tooling, never part of prxmail.
    import email.message
    import email.utils
    import smtplib

    info, context = _load_description(args.servers)
    sender = info["users"][args.sender]
    recipient = args.recipient if "@" in args.recipient else f"{args.recipient}@{DOMAIN}"
    msg = email.message.EmailMessage()
    msg["From"] = sender["address"]
    msg["To"] = recipient
    msg["Subject"] = args.subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=DOMAIN)
    msg.set_content(args.body + "\n")
    with smtplib.SMTP_SSL(
        info["host"], info["smtp_tls_port"], context=context, timeout=STARTUP_TIMEOUT
    ) as client:
        client.login(sender["address"], sender["password"])
        client.send_message(msg)
    print(f"sent {msg['Message-ID']} from {sender['address']} to {recipient}")
    return 0


def _cmd_inbox(args: argparse.Namespace) -> int:
    import imaplib

    info, context = _load_description(args.servers)
    user = info["users"][args.user]
    client = imaplib.IMAP4_SSL(
        info["host"], info["imap_tls_port"], ssl_context=context, timeout=STARTUP_TIMEOUT
    )
    try:
        client.login(user["address"], user["password"])
        client.select("INBOX", readonly=True)
        _, data = client.uid("SEARCH", "ALL")
        uids = (data[0] or b"").decode().split()
        print(f"{user['address']}: {len(uids)} message(s)")
        for uid in uids:
            _, parts = client.uid("FETCH", uid, "(BODY.PEEK[])")
            for part in parts:
                if isinstance(part, tuple):
                    print(f"----- UID {uid} -----")
                    print(part[1].decode("utf-8", "replace").rstrip())
    finally:
        client.logout()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tests.mailservers``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The process exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_watchdog"]:
        return _watchdog_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m tests.mailservers",
        description=(
            "Private Dovecot (IMAP) and Postfix (submission) on free 127.0.0.1 ports, for "
            "prxmail's integration tests and demo. Needs root on Debian; installs "
            f"{', '.join(APT_PACKAGES)} with apt-get if missing, without starting the "
            "system-wide services."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="start the servers, print a JSON description, run until SIGINT/SIGTERM",
        description=(
            "Start the servers and print a JSON object with host, ports, ca_file, users "
            "(with their throwaway passwords) and a ready prxmail TOML snippet for user "
            "'bot' answering 'alice'. Runs until SIGINT/SIGTERM, then stops the servers "
            "and removes the temporary directory."
        ),
    )
    up.add_argument(
        "--toml",
        type=pathlib.Path,
        default=None,
        help="also write the prxmail TOML snippet to this file (mode 0600)",
    )
    up.add_argument(
        "--json",
        type=pathlib.Path,
        default=None,
        help="also write the JSON description to this file (mode 0600), for 'send'/'inbox'",
    )
    up.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=None,
        help="empty directory to run in (kept afterwards); default: a temporary one",
    )
    sub.add_parser("install", help="only install the packages if missing (needs root)")
    send = sub.add_parser(
        "send",
        help="submit a message as one user to another (for manual testing and the demo)",
        description="Submit a message over implicit-TLS submission, as a user of 'up --json'.",
    )
    send.add_argument("--servers", type=pathlib.Path, required=True, help="file of up --json")
    send.add_argument("--from", dest="sender", default="alice", help="local part (alice)")
    send.add_argument("--to", dest="recipient", default="bot", help="local part or address")
    send.add_argument("--subject", default="Hello from alice")
    send.add_argument("--body", default="Hi bot, can you hear me?")
    inbox = sub.add_parser(
        "inbox",
        help="print the messages in a user's INBOX, fetched over IMAP",
        description="Fetch and print every message in a user's INBOX (IMAP over TLS).",
    )
    inbox.add_argument("--servers", type=pathlib.Path, required=True, help="file of up --json")
    inbox.add_argument("user", nargs="?", default="alice", help="local part (alice)")
    args = parser.parse_args(argv)
    if args.command == "send":
        return _cmd_send(args)
    if args.command == "inbox":
        return _cmd_inbox(args)
    if args.command == "install":
        try:
            ensure_installed()
        except MailServersError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    return _cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
