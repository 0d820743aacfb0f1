"""IMAP benchmarks: prxmail vs stdlib imaplib vs imapclient on the same private Dovecot.

``python -m bench imap [--messages N] [--size BYTES] [--batch B] [--rounds R]
[--big-mb M] [--skip-memory]``

1. Fetch-only throughput: a backlog of N messages of about SIZE bytes (default 5,000 x
   4 KB) is written straight into a fresh user's Maildir, Dovecot indexes it once (a
   warm-up fetch), then each library logs in over implicit TLS, selects INBOX and times
   ``UID FETCH <batch> (BODY.PEEK[])`` over all UIDs in batches of B (prxmail also
   with its pipelined ``uid_fetch(batch_size=B, pipeline=True)``). Rounds interleave
   the libraries; the median round is reported. Every library must return every byte
   (checked by total size), so a fast-but-wrong client cannot win.
2. Parser throughput: one in-memory blob of FETCH responses (UID + BODY[] literals) is
   parsed by prxmail's framer + parser, and by imapclient's ``parse_fetch_response``
   (given the blob already split the way imaplib splits it -- imapclient does no
   framing of its own, so it is handed that work for free).
3. Peak memory fetching one big message (default 100 MB): each library runs in its own
   subprocess and reports the growth of its peak RSS (VmHWM) across the fetch.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import trio

from prxmail.imap import Framer, Security, open_imap_connection, parse_response
from tests.mailservers import MailServers, User, start_mail_servers


def _message(i: int, size: int) -> bytes:
    head = (
        f"From: Bench <bench@prxmail.test>\r\nTo: reader@prxmail.test\r\n"
        f"Subject: benchmark message {i}\r\nMessage-ID: <bench-{i}@prxmail.test>\r\n"
        f"Date: Tue, 24 Nov 2026 04:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnop.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def _batches(uids: list[int], batch: int) -> list[str]:
    return [f"{uids[i]}:{uids[min(i + batch, len(uids)) - 1]}" for i in range(0, len(uids), batch)]


# -- fetch-only throughput ------------------------------------------------------------------


def _fetch_prxmail(servers: MailServers, user: User, ranges: list[str]) -> tuple[float, int]:
    from prxmail.imap import SequenceSet

    async def main() -> tuple[float, int]:
        async with open_imap_connection(
            servers.host,
            servers.imap_tls_port,
            security=Security.TLS,
            ssl_context=servers.ssl_context(),
        ) as imap:
            await imap.login(user.address, user.password)
            await imap.select("INBOX")
            total = 0
            start = time.perf_counter()
            for r in ranges:
                async for msg in imap.uid_fetch(SequenceSet.parse(r), ["BODY.PEEK[]"]):
                    body = msg.body
                    assert body is not None
                    total += len(body)
            return time.perf_counter() - start, total

    return trio.run(main)


def _fetch_imaplib(servers: MailServers, user: User, ranges: list[str]) -> tuple[float, int]:
    conn = imaplib.IMAP4_SSL(servers.host, servers.imap_tls_port, ssl_context=servers.ssl_context())
    try:
        conn.login(user.address, user.password)
        conn.select("INBOX")
        total = 0
        start = time.perf_counter()
        for r in ranges:
            typ, data = conn.uid("FETCH", r, "(BODY.PEEK[])")
            assert typ == "OK"
            for item in data:
                if isinstance(item, tuple):
                    total += len(item[1])
        return time.perf_counter() - start, total
    finally:
        conn.logout()


def _fetch_imapclient(servers: MailServers, user: User, ranges: list[str]) -> tuple[float, int]:
    from imapclient import IMAPClient

    client = IMAPClient(
        servers.host, port=servers.imap_tls_port, ssl=True, ssl_context=servers.ssl_context()
    )
    try:
        client.login(user.address, user.password)
        client.select_folder("INBOX")
        total = 0
        start = time.perf_counter()
        for r in ranges:
            first, _, last = r.partition(":")
            # imapclient only takes message ids as ints (it sends them comma-joined)
            result = client.fetch(list(range(int(first), int(last or first) + 1)), ["BODY.PEEK[]"])
            for data in result.values():
                total += len(data[b"BODY[]"])
        return time.perf_counter() - start, total
    finally:
        client.logout()


def _fetch_prxmail_pipelined(
    servers: MailServers, user: User, ranges: list[str]
) -> tuple[float, int]:
    bounds = [tuple(int(x) for x in r.split(":")) for r in ranges]
    uids = [u for b in bounds for u in range(b[0], b[-1] + 1)]
    batch = bounds[0][-1] - bounds[0][0] + 1

    async def main() -> tuple[float, int]:
        async with open_imap_connection(
            servers.host,
            servers.imap_tls_port,
            security=Security.TLS,
            ssl_context=servers.ssl_context(),
        ) as imap:
            await imap.login(user.address, user.password)
            await imap.select("INBOX")
            total = 0
            start = time.perf_counter()
            async for msg in imap.uid_fetch(uids, ["BODY.PEEK[]"], batch_size=batch, pipeline=True):
                body = msg.body
                assert body is not None
                total += len(body)
            return time.perf_counter() - start, total

    return trio.run(main)


FETCHERS: dict[str, Callable[[MailServers, User, list[str]], tuple[float, int]]] = {
    "prxmail": _fetch_prxmail,
    "prxmail-pipe": _fetch_prxmail_pipelined,
    "imaplib": _fetch_imaplib,
    "imapclient": _fetch_imapclient,
}


def bench_fetch(servers: MailServers, n: int, size: int, batch: int, rounds: int) -> None:
    user = servers.add_user(f"benchfetch{os.getpid()}")
    messages = [_message(i, size) for i in range(n)]
    servers.deliver_to_maildir(user, messages)
    expected = sum(len(m) for m in messages)
    uids = list(range(1, n + 1))
    ranges = _batches(uids, batch)
    _fetch_imaplib(servers, user, ranges)  # warm-up: Dovecot indexes and caches once
    times: dict[str, list[float]] = {name: [] for name in FETCHERS}
    for _ in range(rounds):
        for name, fetch in FETCHERS.items():
            elapsed, total = fetch(servers, user, ranges)
            if total != expected:
                raise SystemExit(f"{name} fetched {total} bytes, expected {expected}")
            times[name].append(elapsed)
    print(f"\nfetch-only: {n} messages x ~{size} B, UID FETCH BODY.PEEK[] in batches of {batch}")
    print(f"  median of {rounds} interleaved rounds, implicit TLS, same Dovecot")
    rates = {name: n / statistics.median(ts) for name, ts in times.items()}
    for name, rate in rates.items():
        best = n / min(times[name])
        print(f"  {name:<12} {rate:>9,.0f} msg/s   (best round {best:,.0f} msg/s)")
    for ours in ("prxmail", "prxmail-pipe"):
        print(f"  ratio {ours}/imaplib    = {rates[ours] / rates['imaplib']:.2f}x  (target >= 1)")
        print(
            f"  ratio {ours}/imapclient = {rates[ours] / rates['imapclient']:.2f}x  (target >= 2)"
        )
    print("  (prxmail: one UID FETCH per batch like the peers; prxmail-pipe: the same")
    print("   batches via uid_fetch(batch_size=..., pipeline=True), two in flight)")


# -- parser throughput ----------------------------------------------------------------------


def _fetch_blob(n: int, size: int) -> tuple[bytes, list[object]]:
    """The same responses as one byte blob (prxmail) and as imaplib's split (imapclient)."""
    blob = bytearray()
    split: list[object] = []
    for i in range(1, n + 1):
        body = _message(i, size)
        head = b"%d (UID %d FLAGS (\\Seen) BODY[] {%d}" % (i, i, len(body))
        blob += b"* %d FETCH (UID %d FLAGS (\\Seen) BODY[] {%d}\r\n" % (i, i, len(body))
        blob += body + b")\r\n"
        split.append((head, body))
        split.append(b")")
    return bytes(blob), split


def _parse_prxmail(blob: bytes) -> int:
    framer = Framer()
    count = 0
    chunk = 65536
    for i in range(0, len(blob), chunk):
        framer.receive_data(blob[i : i + chunk])
        while (frame := framer.next_frame()) is not None:
            parse_response(frame)
            count += 1
    return count


def _parse_imapclient(split: list[object]) -> int:
    from imapclient.response_parser import parse_fetch_response

    return len(parse_fetch_response(split, True, True))  # type: ignore[arg-type]


def bench_parser(n: int, size: int, rounds: int) -> None:
    blob, split = _fetch_blob(n, size)
    mb = len(blob) / 1e6
    results: dict[str, float] = {}
    for name, fn in (
        ("prxmail", lambda: _parse_prxmail(blob)),
        ("imapclient", lambda: _parse_imapclient(split)),
    ):
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            count = fn()
            best = min(best, time.perf_counter() - start)
            if count != n:
                raise SystemExit(f"{name} parsed {count} responses, expected {n}")
        results[name] = mb / best
    print(
        f"\nparser: {n} FETCH responses (UID FLAGS BODY[] ~{size} B), {mb:.1f} MB, best of {rounds}"
    )
    print(f"  prxmail (framer + parser)          {results['prxmail']:>8,.0f} MB/s")
    print(f"  imapclient (parser, pre-split)     {results['imapclient']:>8,.0f} MB/s")
    print(f"  ratio prxmail/imapclient = {results['prxmail'] / results['imapclient']:.2f}x")


# -- peak memory ----------------------------------------------------------------------------

_MEMORY_CHILD = r"""
import json, sys, ssl
lib, host, port, ca, user, password = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)

def rss():
    # VmHWM: this process's peak RSS. (ru_maxrss would include the parent's peak,
    # which Linux carries across fork + exec.)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

if lib == "prxmail":
    import trio
    from prxmail.imap import open_imap_connection
    async def main():
        async with open_imap_connection(host, int(port), ssl_context=ctx) as imap:
            await imap.login(user, password)
            await imap.select("INBOX")
            before = rss()
            size = 0
            async for msg in imap.uid_fetch([1], ["BODY.PEEK[]"]):
                size = len(msg.body)
            return before, rss(), size
    before, after, size = trio.run(main)
elif lib == "imaplib":
    import imaplib
    conn = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
    conn.login(user, password)
    conn.select("INBOX")
    before = rss()
    typ, data = conn.uid("FETCH", "1", "(BODY.PEEK[])")
    size = len(data[0][1])
    after = rss()
    conn.logout()
else:
    from imapclient import IMAPClient
    client = IMAPClient(host, port=int(port), ssl=True, ssl_context=ctx)
    client.login(user, password)
    client.select_folder("INBOX")
    before = rss()
    size = len(client.fetch([1], ["BODY.PEEK[]"])[1][b"BODY[]"])
    after = rss()
    client.logout()
print(json.dumps({"before": before, "after": after, "size": size}))
"""


def bench_memory(servers: MailServers, megabytes: int) -> None:
    user = servers.add_user(f"benchbig{os.getpid()}")
    message = _message(0, megabytes * 1024 * 1024)
    servers.deliver_to_maildir(user, [message])
    del message
    print(f"\npeak memory fetching one {megabytes} MB message (peak RSS growth, own process)")
    growth: dict[str, float] = {}
    for lib in ("prxmail", "imaplib", "imapclient"):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEMORY_CHILD,
                lib,
                servers.host,
                str(servers.imap_tls_port),
                str(servers.ca_file),
                user.address,
                user.password,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.getcwd(),
        )
        if proc.returncode != 0:
            print(f"  {lib:<11} failed: {proc.stderr.strip()[-300:]}")
            continue
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        growth[lib] = (data["after"] - data["before"]) / 1e6
        ratio = (data["after"] - data["before"]) / data["size"]
        print(f"  {lib:<11} +{growth[lib]:>7.1f} MB  ({ratio:.2f}x the message size)")
    if growth.get("prxmail") and growth.get("imaplib"):
        print(f"  ratio prxmail/imaplib = {growth['prxmail'] / growth['imaplib']:.2f}x")


def main(argv: list[str]) -> int:
    """Run the IMAP benchmarks against a freshly started private Dovecot.

    Args:
        argv: Command-line arguments (see the module docstring).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench imap", description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, ssl {ssl.OPENSSL_VERSION}")
    servers = start_mail_servers()
    try:
        bench_fetch(servers, args.messages, args.size, args.batch, args.rounds)
        bench_parser(2000, args.size, args.rounds)
        if not args.skip_memory:
            bench_memory(servers, args.big_mb)
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
