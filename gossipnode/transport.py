"""Transports move bytes between nodes: TCP for real machines, memory for tests and simulation.

Both implement ``Transport`` and hand out ``Stream``s; the node does not know which it has.
Foreign exceptions are translated here, once: callers see ``TransportError`` for anything that
went wrong below them, and an empty read at end of stream.
"""

from __future__ import annotations

import errno
import itertools
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import trio

Handler = Callable[["Stream"], Awaitable[None]]


class TransportError(Exception):
    """Connecting, sending or receiving failed; the stream (if any) is unusable."""


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port`` or ``[v6]:port``. Raises ValueError with what is wrong."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        host = host.removeprefix("[").removesuffix("]")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} has no valid port (0-65535)")
        return cls(host, int(port))


class Stream(Protocol):
    @property
    def remote(self) -> str:
        """Who is at the other end, for logs ("" if unknown)."""
        ...

    def identity(self) -> str | None:
        """The common name of the peer's certificate (mutual TLS), once it has been seen."""
        ...

    async def send_all(self, data: bytes | memoryview) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; b"" at end of stream."""
        ...

    async def receive_into(self, view: memoryview) -> int:
        """Receive into ``view``; the number of bytes written, 0 at end of stream."""
        ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def connect(self, address: Address) -> Stream: ...

    async def serve(
        self, address: Address, handler: Handler, *, task_status: trio.TaskStatus[Address]
    ) -> None:
        """Accept connections forever, running ``handler(stream)`` for each in its own task.

        Reports the bound address (port 0 picks a free one) through ``task_status``. The
        handler owns the stream and must close it.
        """
        ...


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TransportError(str(exc) or type(exc).__name__) from exc


@dataclass(eq=False)
class TcpStream:
    """TCP, or TLS over it. TLS shakes hands on the first send or receive, so under whatever
    deadline the caller has set for its own handshake."""

    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    remote: str = ""

    async def send_all(self, data: bytes | memoryview) -> None:
        with _translated():
            await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        with _translated():
            return bytes(await self.stream.receive_some(max_bytes))

    async def receive_into(self, view: memoryview) -> int:
        if isinstance(self.stream, trio.SocketStream):
            # trio's SocketStream has no receive_into; its socket does, and it saves a copy.
            with _translated():
                return await self.stream.socket.recv_into(view)
        data = await self.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    async def aclose(self) -> None:
        with _translated():
            await self.stream.aclose()

    def identity(self) -> str | None:
        if not isinstance(self.stream, trio.SSLStream):
            return None
        try:
            cert = self.stream.getpeercert()
        except trio.NeedHandshakeError:
            return None
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None


@dataclass(frozen=True)
class Tls:
    """Mutual TLS: both ends show a certificate of the cluster's CA (``scripts/dev-ca``)."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, cert: str, key: str, ca: str) -> Tls:
        """Contexts from PEM files. Raises OSError or ssl.SSLError if one is unusable."""
        contexts = []
        for purpose in (ssl.Purpose.CLIENT_AUTH, ssl.Purpose.SERVER_AUTH):
            context = ssl.create_default_context(purpose, cafile=ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cert, key)
            context.verify_mode = ssl.CERT_REQUIRED
            # Peers are dialed by address; who they are is the certificate's common name,
            # checked against the id they claim in their Hello.
            context.check_hostname = False
            contexts.append(context)
        return cls(*contexts)


# ---------------------------------------------------------------------------- TCP


class TcpTransport:
    """Real TCP with trio, or TLS over it. Listens on one address; dials with a timeout."""

    def __init__(self, connect_timeout: float = 5.0, tls: Tls | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.tls = tls

    async def connect(self, address: Address) -> Stream:
        with _translated():
            with trio.move_on_after(self.connect_timeout) as scope:
                stream = await trio.open_tcp_stream(address.host, address.port)
                return self._wrap(stream, str(address), server=False)
            assert scope.cancelled_caught
            raise TransportError(f"connecting to {address} timed out")

    def _wrap(self, stream: trio.SocketStream, remote: str, *, server: bool) -> Stream:
        if self.tls is None:
            return TcpStream(stream, remote)
        context = self.tls.server if server else self.tls.client
        return TcpStream(trio.SSLStream(stream, context, server_side=server), remote)

    async def serve(
        self,
        address: Address,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with _translated():
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started(Address(address.host, bound[1]))
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, handler)

    async def _accept_loop(self, listener: trio.SocketListener, handler: Handler) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of file descriptors or memory: wait for connections to close.
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        raise
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(handler, self._wrap(stream, _peer(stream), server=True))


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return ""
    return str(Address(host, port))


# ---------------------------------------------------------------------------- memory


Endpoint = Address | None  # None: a connection from no node in particular


class Timing(Protocol):
    """When bytes sent from one address to another arrive (``netmodel.NetModel`` is one)."""

    def reachable(self, src: Endpoint, dst: Endpoint, now: float) -> bool: ...

    def transmit(
        self, src: Endpoint, dst: Endpoint, nbytes: int, now: float
    ) -> tuple[float, float]:
        """(when the sender is done, when the receiver has the bytes)."""
        ...


class Instant:
    """Links with no delay that never fail."""

    def reachable(self, src: Endpoint, dst: Endpoint, now: float) -> bool:
        return True

    def transmit(
        self, src: Endpoint, dst: Endpoint, nbytes: int, now: float
    ) -> tuple[float, float]:
        return now, now


async def _wait_until(deadline: float) -> None:
    """sleep_until, minus the cancel scope when there is nothing to wait for (hot path)."""
    if deadline > trio.current_time():
        await trio.sleep_until(deadline)
    else:
        await trio.lowlevel.checkpoint()


@dataclass(eq=False)
class _Pipe:
    """One direction of a memory connection: chunks in flight, each with its arrival time."""

    timing: Timing
    src: Endpoint
    dst: Endpoint
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    eof: bool = False  # the sender closed: the receiver reads what is queued, then b""
    reset: bool = False  # the receiver is gone: sending fails

    async def send(self, data: bytes | memoryview) -> None:
        if self.eof or self.reset:
            raise TransportError("connection closed")
        chunk = bytes(data)
        done, arrival = self.timing.transmit(self.src, self.dst, len(chunk), trio.current_time())
        await _wait_until(done)  # the link is busy sending it
        if self.reset:
            raise TransportError("connection reset by peer")
        self.queue.append((arrival, chunk))
        self.lot.unpark_all()

    async def receive(self, max_bytes: int) -> bytes:
        while not self.queue:
            if self.eof or self.reset:
                await trio.lowlevel.checkpoint()
                return b""
            await self.lot.park()
        arrival, chunk = self.queue[0]
        await _wait_until(arrival)
        if not self.queue:  # reset while we waited
            return b""
        if len(chunk) > max_bytes:
            self.queue[0] = (arrival, chunk[max_bytes:])
            return chunk[:max_bytes]
        self.queue.popleft()
        return chunk

    def close(self, *, reset: bool = False) -> None:
        self.eof = True
        if reset:
            self.reset = True
            self.queue.clear()
        self.lot.unpark_all()


@dataclass(eq=False)
class MemoryStream:
    out: _Pipe
    inp: _Pipe
    on_close: Callable[[], object] | None = None
    closed: bool = False
    remote: str = ""

    async def send_all(self, data: bytes | memoryview) -> None:
        self._check_open()
        await self.out.send(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        self._check_open()
        return await self.inp.receive(max_bytes)

    async def receive_into(self, view: memoryview) -> int:
        data = await self.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def identity(self) -> str | None:
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.close()  # the peer reads the rest, then end of stream
            self.inp.close(reset=True)  # the peer's sends fail
            if self.on_close is not None:
                self.on_close()

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError("stream is closed")


@dataclass(eq=False)
class MemoryNetwork:
    """An in-process network of listeners, one per address, with link timing from ``timing``.

    Used directly as a ``Transport`` its connections come from nowhere in particular; each
    simulated node gets its own ``endpoint(address)``, so links know both ends and ``kill``
    can drop everything of one node at once, as a crash would.
    """

    timing: Timing = field(default_factory=Instant)
    _listeners: dict[Address, trio.MemorySendChannel[MemoryStream]] = field(default_factory=dict)
    _streams: dict[Address, dict[int, MemoryStream]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(40000))
    _down: set[Address] = field(default_factory=set)  # killed, until they serve again

    def endpoint(self, address: Address) -> Transport:
        return _NodeTransport(self, address)

    async def connect(self, address: Address, *, source: Address | None = None) -> Stream:
        now = trio.current_time()
        if source in self._down:  # a crashed node sends nothing, not even goodbyes
            await trio.lowlevel.checkpoint()
            raise TransportError(f"{source} is down")
        if not self.timing.reachable(source, address, now):
            await trio.lowlevel.checkpoint()
            raise TransportError(f"{address} is unreachable")
        # The handshake of a connection costs a round trip.
        _, there = self.timing.transmit(source, address, 0, now)
        _, back = self.timing.transmit(address, source, 0, there)
        await trio.sleep_until(back)
        channel = self._listeners.get(address)
        if channel is None:
            raise TransportError(f"connection to {address} refused")
        forth, back_pipe = _Pipe(self.timing, source, address), _Pipe(self.timing, address, source)
        ours = self._register(source, MemoryStream(forth, back_pipe, remote=str(address)))
        theirs = self._register(address, MemoryStream(back_pipe, forth, remote=str(source or "")))
        try:
            channel.send_nowait(theirs)
        except (trio.BrokenResourceError, trio.WouldBlock) as exc:
            ours.close()
            theirs.close()
            raise TransportError(f"connection to {address} refused") from exc
        return ours

    async def serve(
        self,
        address: Address,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if address.port == 0:
            address = Address(address.host, next(self._ports))
        if address in self._listeners:
            raise TransportError(f"address {address} already in use")
        send, receive = trio.open_memory_channel[MemoryStream](64)
        self._listeners[address] = send
        self._down.discard(address)
        try:
            async with receive, trio.open_nursery() as nursery:
                task_status.started(address)
                async for stream in receive:
                    nursery.start_soon(handler, stream)
        finally:
            if self._listeners.get(address) is send:
                del self._listeners[address]
            send.close()

    def kill(self, address: Address) -> None:
        """Drop ``address``'s listener and every connection it has, and refuse it new ones
        until it serves again, as a crash does."""
        self._down.add(address)
        channel = self._listeners.pop(address, None)
        if channel is not None:
            channel.close()
        for stream in list(self._streams.pop(address, {}).values()):
            stream.close()

    def _register(self, owner: Address | None, stream: MemoryStream) -> MemoryStream:
        if owner is None:
            return stream
        streams = self._streams.setdefault(owner, {})
        key = next(self._ids)
        streams[key] = stream
        stream.on_close = lambda: streams.pop(key, None)
        return stream


@dataclass(frozen=True)
class _NodeTransport:
    """One node's view of a MemoryNetwork: its connections come from its own address."""

    network: MemoryNetwork
    address: Address

    async def connect(self, address: Address) -> Stream:
        return await self.network.connect(address, source=self.address)

    async def serve(
        self,
        address: Address,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.network.serve(address, handler, task_status=task_status)
