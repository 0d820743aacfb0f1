"""Memory bound: a 200 MB message in the mailbox, prxmail's channel vs imaplib + mail-parser.

``python -m bench memory [--size-mb 200] [--skip-peer] [--json FILE]``
``python -m bench memory --imports`` (the import baseline of ``prxmail serve`` only)

What is measured (issue 7, benchmark 3)
---------------------------------------
A fresh user's INBOX holds two messages: first one of ``--size-mb`` MB (a short text part
and one base64 attachment filling the rest), then one small ordinary message. The big
one is written straight into the Maildir, streamed to the file in chunks, never whole
in this process's memory (Postfix refuses anything over ``SMTP_SIZE_LIMIT`` anyway).
The bench checks that Dovecot lists both, in that order, with the big one's
RFC822.SIZE equal to the file's size, before any contender starts.

* prxmail: ``open_mail_channel`` with every default (``max_message_bytes`` = 25 MiB),
  except ``allowed_senders = ["*"]``, in its own subprocess; ``mark_handled`` for each
  message, stop after the second. It must hand over the big one as the oversize
  substitute (its text only, the attachment described by name and estimated size,
  defect ``too-large``) and then the small one, whole: the service went on.
* imaplib + mail-parser (the peer, for context): ``UID FETCH BODY.PEEK[]`` of each
  message in turn, ``mailparser.parse_from_bytes`` of each, in its own subprocess.

Each contender reports its peak RSS (VmHWM from ``/proc/self/status`` at the end) and
its RSS after imports (the baseline). Target: prxmail's peak RSS < 100 MB.
"""

from __future__ import annotations

import argparse
import base64
import imaplib
import json
import os
import pathlib
import pwd
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import trio

from bench._kit import run_child
from bench.channel_bench import _channel_toml, _context, _machine, _vm_kib
from tests.mailservers import MailServers, User, mail_servers

# The bound on prxmail's peak RSS with a 200 MB message waiting.
TARGET_PEAK_MB = 100
# Raw attachment bytes base64-encoded per write: 57 bytes make one 76-character line,
# so a multiple of 57 keeps every line full; 16,384 lines (1.3 MB written) per chunk
# bound this process's memory while it builds the file.
CHUNK_RAW_BYTES = 57 * 16_384
# One base64 line on disk: 76 characters and CRLF, for 57 raw bytes.
B64_LINE = 78
# Bounds: a contender must hand over both messages within CHILD_TIMEOUT; Dovecot's first
# look at the big file (it reads it whole once to index it) within INDEX_TIMEOUT.
CHILD_TIMEOUT = 600.0
INDEX_TIMEOUT = 300.0
BOUNDARY = "=_prxmail-bench-big"
SMALL_SUBJECT = "small message after the big one"


# -- the mailbox ------------------------------------------------------------------------------


def _big_head(size: int) -> bytes:
    return (
        f"From: Alice <alice@prxmail.test>\r\nTo: reader@prxmail.test\r\n"
        f"Subject: a {size / 1e6:.0f} MB message\r\nMessage-ID: <big-{os.getpid()}"
        f"@bench.prxmail.test>\r\nDate: Tue, 24 Nov 2026 05:00:00 +0000\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{BOUNDARY}"\r\n'
        f"\r\nThis is a multi-part message in MIME format.\r\n\r\n"
        f"--{BOUNDARY}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 7bit\r\n\r\n"
        + "Here is the archive you asked for; it is rather large.\r\n"
        * 20
        + f'\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream; name="archive.bin"\r\n'
        f'Content-Disposition: attachment; filename="archive.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()


def _write_big_message(f: BinaryIO, size: int, rng: random.Random) -> int:
    """Write a message of about ``size`` bytes to ``f`` chunk by chunk.

    Returns:
        The number of bytes written.
    """
    head = _big_head(size)
    tail = f"--{BOUNDARY}--\r\n".encode()
    lines = max(1, (size - len(head) - len(tail)) // B64_LINE)
    written = f.write(head)
    per_chunk = CHUNK_RAW_BYTES // 57
    while lines > 0:
        now = min(lines, per_chunk)
        encoded = base64.encodebytes(rng.randbytes(now * 57)).replace(b"\n", b"\r\n")
        written += f.write(encoded)
        lines -= now
    written += f.write(tail)
    return written


def _small_message() -> bytes:
    return (
        f"From: Bob <bob@prxmail.test>\r\nTo: reader@prxmail.test\r\n"
        f"Subject: {SMALL_SUBJECT}\r\nMessage-ID: <small-{os.getpid()}@bench.prxmail.test>\r\n"
        f"Date: Tue, 24 Nov 2026 05:00:01 +0000\r\n\r\nStill there?\r\n"
    ).encode()


def _write_maildir_file(
    servers: MailServers, user: User, write: Callable[[BinaryIO], int]
) -> pathlib.Path:
    """Deliver one message into ``user``'s INBOX the Maildir way, streaming it to disk.

    Like ``MailServers.deliver_to_maildir`` (tmp/ then rename into new/, owned by
    Dovecot's user), but the content comes from ``write(file)`` instead of memory.
    """
    owner = pwd.getpwnam("dovecot")
    root = servers.maildir(user)
    for d in (root.parent.parent, root.parent, root, root / "cur", root / "new", root / "tmp"):
        if not d.exists():
            d.mkdir(mode=0o700)
            os.chown(d, owner.pw_uid, owner.pw_gid)
    now = time.time_ns()
    name = f"{now // 1_000_000_000}.M{now // 1000 % 1_000_000}P{os.getpid()}.bench-big"
    tmp = root / "tmp" / name
    with tmp.open("xb") as f:
        write(f)
    os.chown(tmp, owner.pw_uid, owner.pw_gid)
    final = root / "new" / name
    tmp.rename(final)
    return final


def _dovecot_sizes(servers: MailServers, user: User) -> list[tuple[int, int]]:
    """SELECT the INBOX (Dovecot indexes new files now) and list (UID, RFC822.SIZE)."""
    conn = imaplib.IMAP4_SSL(
        servers.host,
        servers.imap_tls_port,
        ssl_context=servers.ssl_context(),
        timeout=INDEX_TIMEOUT,
    )
    try:
        conn.login(user.address, user.password)
        typ, data = conn.select("INBOX")
        if typ != "OK" or int(data[0] or b"0") == 0:
            return []
        typ, items = conn.fetch("1:*", "(UID RFC822.SIZE)")
        if typ != "OK":
            raise RuntimeError(f"FETCH answered {typ}")
        found = []
        for item in items:
            text = item.decode() if isinstance(item, bytes) else ""
            words = text.replace("(", " ").replace(")", " ").split()
            if "UID" in words and "RFC822.SIZE" in words:
                uid = int(words[words.index("UID") + 1])
                found.append((uid, int(words[words.index("RFC822.SIZE") + 1])))
        return sorted(found)
    finally:
        conn.logout()


def prepare_mailbox(servers: MailServers, size: int, rng: random.Random) -> tuple[User, int]:
    """A fresh user whose INBOX holds the big message (UID 1) and then a small one.

    Returns:
        The user and the big message's size in bytes.

    Raises:
        SystemExit: Dovecot does not list the messages as written.
    """
    user = servers.add_user(f"mem-{os.getpid()}-{rng.randrange(10**6)}")
    written = [0]

    def write(f: BinaryIO) -> int:
        written[0] = _write_big_message(f, size, rng)
        return written[0]

    _write_maildir_file(servers, user, write)
    # Index the big one alone first, so it gets the lower UID whatever the order in
    # which Dovecot reads new/.
    first = _dovecot_sizes(servers, user)
    if len(first) != 1 or first[0][1] != written[0]:
        raise SystemExit(f"Dovecot lists {first}, expected one message of {written[0]} bytes")
    servers.deliver_to_maildir(user, [_small_message()])
    both = _dovecot_sizes(servers, user)
    if len(both) != 2 or both[0] != first[0] or both[1][1] != len(_small_message()):
        raise SystemExit(f"Dovecot lists {both}, expected the big message then a small one")
    return user, written[0]


# -- contenders (each in its own subprocess) -------------------------------------------------


def _run_prxmail(spec: dict[str, Any]) -> dict[str, Any]:
    from prxmail.channel import open_mail_channel
    from prxmail.config import parse_config

    config = parse_config(spec["toml"])
    got: list[dict[str, Any]] = []

    async def main() -> None:
        start = time.perf_counter()
        async with open_mail_channel(config) as channel:
            with trio.fail_after(CHILD_TIMEOUT):
                async for message in channel:
                    got.append(
                        {
                            "at_s": time.perf_counter() - start,
                            "uid": message.uid,
                            "subject": message.subject,
                            "size": message.size,
                            "defects": list(message.defects),
                            "text_chars": len(message.text),
                            "attachments": [
                                [a.filename, a.content_type, a.size, a.content is not None]
                                for a in message.attachments
                            ],
                        }
                    )
                    await channel.mark_handled(message)
                    if len(got) == 2:
                        break

    trio.run(main)
    return {"limit": config.max_message_bytes, "messages": got}


def _run_imaplib(spec: dict[str, Any]) -> dict[str, Any]:
    import mailparser

    conn = imaplib.IMAP4_SSL(
        spec["host"], spec["port"], ssl_context=_context(spec), timeout=CHILD_TIMEOUT
    )
    got: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        conn.login(spec["address"], spec["password"])
        conn.select("INBOX")
        for uid in (1, 2):
            typ, items = conn.uid("FETCH", str(uid), "(BODY.PEEK[])")
            if typ != "OK":
                raise RuntimeError(f"FETCH answered {typ}")
            raw = next(item[1] for item in items if isinstance(item, tuple))
            parsed = mailparser.parse_from_bytes(raw)
            got.append(
                {
                    "at_s": time.perf_counter() - start,
                    "uid": uid,
                    "subject": parsed.subject,
                    "size": len(raw),
                    "defects": [],
                    "text_chars": len(parsed.text_plain[0]) if parsed.text_plain else 0,
                    "attachments": [
                        [a.get("filename"), a.get("mail_content_type"), len(a["payload"]), True]
                        for a in parsed.attachments
                    ],
                }
            )
            del raw, parsed, items
    finally:
        conn.logout()
    return {"messages": got}


CONTENDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prxmail": _run_prxmail,
    "imaplib": _run_imaplib,
}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender; the parent reads the JSON line this prints."""
    if spec["contender"] == "prxmail":
        import prxmail.channel  # noqa: F401  (imports before the baseline)
    else:
        import mailparser  # noqa: F401
    base = _vm_kib("VmRSS")
    start = time.perf_counter()
    result = CONTENDERS[spec["contender"]](spec)
    return {
        **result,
        "elapsed": time.perf_counter() - start,
        "base_kib": base,
        "hwm_kib": _vm_kib("VmHWM"),
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child("bench.memory_bench", "_child", spec, timeout=CHILD_TIMEOUT + 60)


# -- the import baseline of prxmail serve (issue 16) -------------------------------------------

# Modules a serve of one password account without health_listen must not load.
NOT_LOADED = ("httpx", "h11", "prometheus_client", "prxmail.oauth2._token", "prxmail._health")
# The statements whose RSS stands next to the serve process's, in that order.
IMPORT_ROWS = (
    ("bare python", "pass"),
    ("imaplib + mail-parser (peer)", "import imaplib, mailparser"),
    ("peer + trio (the bench's peer child)", "import imaplib, mailparser, trio"),
    ("import prxmail.channel", "import prxmail.channel"),
    ("serve import path", "import prxmail.cli._serve"),
)
# How long serve may take to log that it serves, and how long it then settles (its first
# IDLE) before its RSS is read.
SERVE_START_TIMEOUT = 60.0
SERVE_SETTLE_SECONDS = 3.0


def _import_rss_kib(statement: str) -> int:
    read = "re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1]"
    code = f"{statement}\nimport re\nprint({read})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)},
    )
    return int(out.stdout.split()[-1])


def _serve_rss(servers: MailServers) -> tuple[int, list[str]]:
    """RSS (KiB) of an idle ``python -m prxmail serve`` of one password account, and the
    modules of NOT_LOADED it imported (from its ``-X importtime`` lines)."""
    user = servers.add_user(f"imp-{os.getpid()}")
    state = servers.workdir / f"state-{user.localpart}"
    config = servers.workdir / f"imports-{user.localpart}.toml"
    config.write_text(_channel_toml(servers, user, state))
    root = pathlib.Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-X", "importtime", "-m", "prxmail", "serve", "-c", str(config)]
    proc = subprocess.Popen(
        [*argv, "--exec", "cat"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    lines: list[str] = []
    assert proc.stderr is not None
    stderr = proc.stderr
    reader = threading.Thread(
        target=lambda: lines.extend(
            x.decode("utf-8", "replace") for x in iter(stderr.readline, b"")
        ),
        daemon=True,
    )
    reader.start()
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while not any("prxmail serving" in x for x in list(lines)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("prxmail serve did not start:\n" + "".join(lines[-30:]))
            time.sleep(0.05)
        time.sleep(SERVE_SETTLE_SECONDS)
        if proc.poll() is not None:
            raise SystemExit("prxmail serve stopped:\n" + "".join(lines[-30:]))
        status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        stderr.close()
    imported = {x.split("|")[-1].strip() for x in lines if x.startswith("import time:")}
    if "prxmail.channel" not in imported:  # the -X importtime lines were not read
        raise SystemExit("no import list from prxmail serve:\n" + "".join(lines[-30:]))
    return rss, [m for m in NOT_LOADED if m in imported]


def bench_imports(servers: MailServers) -> dict[str, Any]:
    rows = {label: _import_rss_kib(stmt) for label, stmt in IMPORT_ROWS}
    serve_kib, unwanted = _serve_rss(servers)
    rows["prxmail serve, idle (1 password account)"] = serve_kib
    bare = rows["bare python"]
    peer = rows["imaplib + mail-parser (peer)"]
    print("\nimport baseline: RSS after imports (VmRSS), with ratios to the peer's imports")
    print(f"  {'':<42} {'RSS':>9} {'/ peer':>7} {'above bare':>11}")
    for label, kib in rows.items():
        print(f"  {label:<42} {kib / 1024:7.1f}MB {kib / peer:6.2f}x {(kib - bare) / 1024:9.1f}MB")
    print(f"  serve loaded from {list(NOT_LOADED)}: {unwanted or 'none'}")
    return {"rss_kib": rows, "unwanted": unwanted}


# -- the section -----------------------------------------------------------------------------


def _check_prxmail(res: dict[str, Any], big_size: int) -> list[str]:
    """What is wrong with prxmail's hand-over, if anything (empty when all is right)."""
    from prxmail.channel._fetch import OVERSIZE_DEFECT

    problems = []
    msgs = res["messages"]
    if len(msgs) != 2:
        return [f"handed over {len(msgs)} messages, expected 2"]
    big, small = msgs
    if big["uid"] != 1 or big["size"] != big_size or OVERSIZE_DEFECT not in big["defects"]:
        problems.append(f"first message is not the oversize substitute of UID 1: {big}")
    if not big["text_chars"] or not big["attachments"] or any(a[3] for a in big["attachments"]):
        problems.append(f"substitute lacks its text or lists loaded attachments: {big}")
    if small["uid"] != 2 or small["subject"] != SMALL_SUBJECT or small["defects"]:
        problems.append(f"second message is not the small one, whole: {small}")
    return problems


def bench_memory(servers: MailServers, size: int, *, peer: bool) -> dict[str, Any]:
    rng = random.Random(3)
    names = ["prxmail", "imaplib"] if peer else ["prxmail"]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        user, big_size = prepare_mailbox(servers, size, rng)
        state = servers.workdir / f"state-{user.localpart}"
        spec = {
            "contender": name,
            "host": servers.host,
            "port": servers.imap_tls_port,
            "ca_file": str(servers.ca_file),
            "address": user.address,
            "password": user.password,
            "toml": _channel_toml(servers, user, state),
        }
        results[name] = _run_child(spec)
        results[name]["big_size"] = big_size
    pr = results["prxmail"]
    problems = _check_prxmail(pr, pr["big_size"])
    big = pr["messages"][0] if pr["messages"] else {}
    print(
        f"\n3. memory bound: one {pr['big_size'] / 1e6:.1f} MB message (text + base64"
        f" attachment), then a small one; prxmail max_message_bytes = {pr['limit']:,}"
    )
    print(
        f"  {'':<22} {'peak RSS':>9} {'baseline':>9} {'growth':>8} {'1st at':>7}"
        f" {'2nd at':>7}  first message as handed over"
    )
    for name, res in results.items():
        msgs = res["messages"]
        first = msgs[0] if msgs else {}
        atts = first.get("attachments", [])
        desc = (
            f"{first.get('size', 0) / 1e6:.1f} MB, text {first.get('text_chars', 0)} chars,"
            f" {len(atts)} attachment(s) {'loaded' if any(a[3] for a in atts) else 'described'}"
        )
        if first.get("defects"):
            desc += f", defects {','.join(first['defects'])}"
        label = "prxmail channel" if name == "prxmail" else "imaplib + mail-parser"
        print(
            f"  {label:<22} {res['hwm_kib'] / 1024:7.1f}MB {res['base_kib'] / 1024:7.1f}MB"
            f" {(res['hwm_kib'] - res['base_kib']) / 1024:6.1f}MB"
            f" {first.get('at_s', 0):6.1f}s {msgs[-1]['at_s'] if msgs else 0:6.1f}s  {desc}"
        )
    if big.get("attachments"):
        name_, ctype, est, _ = big["attachments"][0]
        print(
            f"  prxmail's attachment description: {name_} {ctype} ~{est / 1e6:.1f} MB (estimated)"
        )
    peak_mb = pr["hwm_kib"] / 1024
    verdict = "met" if peak_mb < TARGET_PEAK_MB else "MISSED"
    print(f"  prxmail peak RSS {peak_mb:.1f} MB (target < {TARGET_PEAK_MB} MB: {verdict})")
    if "imaplib" in results:
        ratio = results["imaplib"]["hwm_kib"] / pr["hwm_kib"]
        print(f"  ratio peak RSS imaplib / prxmail = {ratio:.1f}x")
    if problems:
        print("  prxmail hand-over WRONG:\n    " + "\n    ".join(problems))
    else:
        print("  checked: the big one came as the oversize substitute, the small one after it")
    return {
        "size": pr["big_size"],
        "results": results,
        "target_met": peak_mb < TARGET_PEAK_MB,
        "problems": problems,
    }


def main(argv: list[str]) -> int:
    """Run the memory-bound bench against freshly started private servers.

    Args:
        argv: Command-line arguments after ``memory``.

    Returns:
        0 when prxmail handed both messages over as expected, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200, help="big message size, MB (200)")
    parser.add_argument("--skip-peer", action="store_true", help="do not run imaplib + mail-parser")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
    parser.add_argument(
        "--imports", action="store_true", help="only the import baseline of prxmail serve"
    )
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine_start": _machine(), "argv": argv}
    print(f"machine: {report['machine_start']}")
    if args.imports:
        with mail_servers() as servers:
            report["imports"] = bench_imports(servers)
        report["machine_end"] = _machine()
        print(f"machine at end: {report['machine_end']}")
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2, default=str))
        return 1 if report["imports"]["unwanted"] else 0
    with mail_servers() as servers:
        report["memory"] = bench_memory(servers, args.size_mb * 1_000_000, peer=not args.skip_peer)
    report["machine_end"] = _machine()
    print(f"machine at end: {report['machine_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if report["memory"]["problems"] else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        print(json.dumps(_child(json.loads(sys.stdin.read()))))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
