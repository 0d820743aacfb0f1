# Theory of operation
# -------------------
#
# A small client-side TLS stream for bulk IMAP reads. trio.SSLStream is general (it
# handles renegotiation, concurrent senders and receivers, server side) and hands out
# at most one TLS record per receive_some() -- OpenSSL's SSL_read never crosses a record
# boundary. Dovecot writes one record per message or so, so a 5,000-message fetch
# costs 5,000 trips through trio's scheduler. Here one receive_some() reads up to
# max_bytes of ciphertext from the socket and then drains *every* complete record that
# arrived, returning them as one chunk: a few trips per hundred messages.
#
# It does only what an IMAP client needs: client side, one task at a time (the
# IMAPConnection guarantees that), TLS 1.2+ via the caller's SSLContext, which verifies
# the certificate and host name during the handshake exactly as trio.SSLStream would
# (both use SSLObject over MemoryBIOs). Failures surface as trio.BrokenResourceError
# with the ssl error as __cause__, the same contract as trio.SSLStream, so the
# connection layer translates both the same way.
#
# Cancellation: a cancelled receive_some() loses nothing (bytes already read from the
# socket stay in the incoming BIO); a cancelled send or handshake leaves the TLS state
# unknown, and the IMAP layer marks the connection broken in that case anyway.

from __future__ import annotations

import ssl

import trio

__all__ = ["ClientTLSStream"]

# Ciphertext read from the socket per transport read: big enough that a bulk fetch
# needs few reads, bounded so one read cannot balloon memory.
TRANSPORT_READ_SIZE = 256 * 1024


class ClientTLSStream(trio.abc.Stream):
    """Client-side TLS over any trio stream, returning all decrypted data per read.

    Args:
        transport_stream: The underlying (TCP) stream.
        ssl_context: Client context (verification settings are taken from it).
        server_hostname: Name checked against the certificate (and sent as SNI).
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._handshook = False
        self._eof = False
        self._closed = False

    def version(self) -> str | None:
        """The negotiated TLS version, e.g. ``"TLSv1.3"`` (as trio.SSLStream offers)."""
        return self.ssl_object.version()

    def getpeercert(self) -> dict[str, object] | None:
        """The server certificate as a dict (as trio.SSLStream offers)."""
        return self.ssl_object.getpeercert()  # type: ignore[return-value]

    def cipher(self) -> tuple[str, str, int] | None:
        """The negotiated cipher (as trio.SSLStream offers)."""
        return self.ssl_object.cipher()

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await self.transport_stream.send_all(pending)

    async def _feed(self) -> bool:
        """Read ciphertext from the transport; False at end of stream."""
        data = await self.transport_stream.receive_some(TRANSPORT_READ_SIZE)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def do_handshake(self) -> None:
        """Run the TLS handshake (certificate and host name are verified here).

        Raises:
            trio.BrokenResourceError: the handshake failed (``__cause__`` says why).
            trio.ClosedResourceError: the stream was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        while not self._handshook:
            try:
                self.ssl_object.do_handshake()
                self._handshook = True
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._feed():
                    raise trio.BrokenResourceError(
                        "the server closed the connection during the TLS handshake"
                    ) from ssl.SSLEOFError("EOF during handshake")
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return every decrypted byte available (at least one), up to ``max_bytes``.

        Returns:
            Data, or ``b""`` once the server ended TLS cleanly (close_notify).

        Raises:
            trio.BrokenResourceError: TLS failed or the server dropped the connection
                without close_notify.
        """
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        await self.do_handshake()
        limit = max_bytes if max_bytes is not None else TRANSPORT_READ_SIZE
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        # Honour a pending cancellation before taking anything out of the TLS object.
        await trio.lowlevel.checkpoint_if_cancelled()
        obj = self.ssl_object
        while True:
            chunks: list[bytes] = []
            got = 0
            try:
                while got < limit:
                    chunk = obj.read(limit - got)
                    if not chunk:
                        self._eof = True
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if chunks or self._eof:
                # Hand back what we have. The scheduler still gets its checkpoint, but a
                # shielded one: a cancellation now would throw away decrypted data.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            await self._flush()  # e.g. a TLS 1.3 KeyUpdate answer
            if not await self._feed():
                try:
                    obj.read(1)
                except ssl.SSLZeroReturnError:
                    self._eof = True
                    return b""
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(
                        "the server closed the connection without ending TLS"
                    ) from exc
                raise trio.BrokenResourceError(
                    "the server closed the connection without ending TLS"
                ) from ssl.SSLEOFError("EOF without close_notify")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Raises:
            trio.BrokenResourceError: TLS or the transport failed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        await self.do_handshake()
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to the transport."""
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:  # pragma: no cover - not part of IMAP
        """TLS has no half-close that servers honour; not supported."""
        raise NotImplementedError("TLS streams cannot send EOF")

    async def aclose(self) -> None:
        """Close the transport at once (idempotent).

        No close_notify is sent: an IMAP session has already ended with LOGOUT, and
        waiting on a possibly dead peer here would hide a timeout from the caller.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        await trio.aclose_forcefully(self.transport_stream)
