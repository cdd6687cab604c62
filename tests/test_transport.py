"""One conformance suite, run against every transport (after trio's check_two_way_stream)."""

from __future__ import annotations

import os

import pytest
import trio

from gossipnode.transport import (
    Address,
    MemoryNetwork,
    Stream,
    TcpTransport,
    Transport,
    TransportError,
)

LOCAL = Address("127.0.0.1", 0)
BIG = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> Transport:
    return MemoryNetwork() if request.param == "memory" else TcpTransport(connect_timeout=2.0)


async def receive_exactly(stream: Stream, n: int, *, into: bool) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if into:
            k = await stream.receive_into(view[got:])
        else:
            chunk = await stream.receive_some(n - got)
            k = len(chunk)
            view[got : got + k] = chunk
        assert k > 0, "unexpected end of stream"
        got += k
    return bytes(buf)


async def send_until_it_fails(stream: Stream) -> None:
    for _ in range(100):  # TCP may buffer the first sends
        await stream.send_all(b"x" * 65536)


async def echo(stream: Stream) -> None:
    """Send back everything, then close when the other side does."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.aclose()


@pytest.mark.parametrize("into", [False, True])
async def test_bytes_arrive_in_order_both_ways(transport: Transport, into: bool) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(transport.serve, LOCAL, echo)
            assert address.port != 0
            stream = await transport.connect(address)
            async with trio.open_nursery() as inner:
                inner.start_soon(stream.send_all, memoryview(BIG))
                assert await receive_exactly(stream, len(BIG), into=into) == BIG
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_end_of_stream_reads_empty(transport: Transport) -> None:
    async def close_at_once(stream: Stream) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(transport.serve, LOCAL, close_at_once)
            stream = await transport.connect(address)
            assert await stream.receive_some(100) == b""
            assert await stream.receive_into(memoryview(bytearray(10))) == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_sending_to_a_closed_peer_fails(transport: Transport) -> None:
    async def close_at_once(stream: Stream) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(transport.serve, LOCAL, close_at_once)
            stream = await transport.connect(address)
            assert await stream.receive_some(1) == b""  # the peer is gone
            with pytest.raises(TransportError):
                await send_until_it_fails(stream)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_using_a_closed_stream_fails(transport: Transport) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(transport.serve, LOCAL, echo)
            stream = await transport.connect(address)
            await stream.aclose()
            with pytest.raises(TransportError):
                await stream.send_all(b"late")
            with pytest.raises(TransportError):
                await stream.receive_some(1)
            nursery.cancel_scope.cancel()


async def test_connecting_to_nobody_fails(transport: Transport) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, LOCAL, echo)
        nursery.cancel_scope.cancel()
    with trio.fail_after(10), pytest.raises(TransportError):
        await transport.connect(address)


async def test_an_address_in_use_is_refused(transport: Transport) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(transport.serve, LOCAL, echo)
            with pytest.raises(TransportError):
                await nursery.start(transport.serve, address, echo)
            nursery.cancel_scope.cancel()


def test_address_parsing() -> None:
    assert Address.parse("127.0.0.1:7001") == Address("127.0.0.1", 7001)
    assert Address.parse("[::1]:80") == Address("::1", 80)
    assert str(Address("::1", 80)) == "[::1]:80"
    for bad in ("7001", "host:", ":80", "host:99999", "host:http"):
        with pytest.raises(ValueError, match=r"port|host:port"):
            Address.parse(bad)
