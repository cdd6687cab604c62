"""Transports move bytes between nodes: TCP for real machines, memory for tests and simulation.

Both implement ``Transport`` and hand out ``Stream``s; the node does not know which it has.
Foreign exceptions are translated here, once: callers see ``TransportError`` for anything that
went wrong below them, and an empty read at end of stream.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import trio
import trio.testing

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


# ---------------------------------------------------------------------------- streams


@dataclass(eq=False)
class TrioStream:
    """A trio stream behind ``Stream``; ``receive_into`` copies (memory streams have no other)."""

    stream: trio.abc.Stream

    async def send_all(self, data: bytes | memoryview) -> None:
        with _translated():
            await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        with _translated():
            return bytes(await self.stream.receive_some(max_bytes))

    async def receive_into(self, view: memoryview) -> int:
        data = await self.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    async def aclose(self) -> None:
        with _translated():
            await self.stream.aclose()


@dataclass(eq=False)
class TcpStream(TrioStream):
    stream: trio.SocketStream

    async def receive_into(self, view: memoryview) -> int:
        # trio's SocketStream has no receive_into; its socket does, and it saves a copy.
        with _translated():
            return await self.stream.socket.recv_into(view)


# ---------------------------------------------------------------------------- TCP


class TcpTransport:
    """Real TCP with trio. Listens on one address; dials with a timeout."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout

    async def connect(self, address: Address) -> Stream:
        with _translated():
            with trio.move_on_after(self.connect_timeout) as scope:
                return TcpStream(await trio.open_tcp_stream(address.host, address.port))
            assert scope.cancelled_caught
            raise TransportError(f"connecting to {address} timed out")

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
                nursery.start_soon(_accept_loop, listener, handler)


async def _accept_loop(listener: trio.SocketListener, handler: Handler) -> None:
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
            nursery.start_soon(handler, TcpStream(stream))


# ---------------------------------------------------------------------------- memory


@dataclass(eq=False)
class MemoryNetwork:
    """An in-process network of listeners, one per address, joined by trio memory streams."""

    _listeners: dict[Address, trio.MemorySendChannel[TrioStream]] = field(default_factory=dict)
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(40000))

    async def connect(self, address: Address) -> Stream:
        await trio.lowlevel.checkpoint()
        channel = self._listeners.get(address)
        if channel is None:
            raise TransportError(f"connection to {address} refused")
        ours, theirs = trio.testing.memory_stream_pair()
        try:
            channel.send_nowait(TrioStream(theirs))
        except (trio.BrokenResourceError, trio.WouldBlock) as exc:
            raise TransportError(f"connection to {address} refused") from exc
        return TrioStream(ours)

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
        send, receive = trio.open_memory_channel[TrioStream](64)
        self._listeners[address] = send
        try:
            async with receive, trio.open_nursery() as nursery:
                task_status.started(address)
                async for stream in receive:
                    nursery.start_soon(handler, stream)
        finally:
            del self._listeners[address]
            send.close()
