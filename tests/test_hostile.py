"""A live node on real TCP fed bad input: it drops that connection, says why, and gossips on."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest
import torch
import trio

from gossipnode.algorithms import Gossip
from gossipnode.messages import Exchange, Hello, Message, to_frame
from gossipnode.node import Node
from gossipnode.transport import Address, TcpTransport
from gossipnode.wire import FrameDecoder, encode_bytes

from .helpers import config, eventually, task


def frame(msg: Message, *, seq: int, alg: str = "gossip", sender: int = 9) -> bytes:
    fields, tensors = to_frame(msg)
    return encode_bytes({"sender": sender, "seq": seq, "alg": alg, **fields}, tensors)


def raw_frame(header: dict) -> bytes:
    packed = msgpack.packb(header)
    return struct.pack(">I", len(packed)) + packed


async def refusal(
    address: Address, data: bytes, *, handshake: bool = False, spec: tuple = ()
) -> str:
    """Send ``data`` (after a valid handshake if asked); the node's reason for hanging up."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    decoder = FrameDecoder()
    async with stream:
        if handshake:  # as a peer does: nothing more until the node's Hello has come
            await stream.send_all(frame(Hello(9, 1, "logreg", "", spec), seq=0))
            while decoder.next_frame() is None:
                decoder.feed(await stream.receive_some(65536))
        await stream.send_all(data)
        reasons = []
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                decoder.feed(chunk)
                while (f := decoder.next_frame()) is not None:
                    if f.type == "error":
                        reasons.append(f.header["reason"])
    assert len(reasons) == 1, "expected one Error frame, then the connection closed"
    return str(reasons[0])


@pytest.fixture
async def live_pair(nursery: trio.Nursery) -> tuple[Node, Node]:
    tcp = TcpTransport()
    b_cfg = config(1, 2, [], listen=Address("127.0.0.1", 0), gossip_rate=0.0, grad_rate=20.0)
    b = Node(b_cfg, transport=tcp, task=task(n=2), algorithm=Gossip(lr=0.1))
    b_address = await nursery.start(b.run)
    a_cfg = config(
        0,
        2,
        [],
        listen=Address("127.0.0.1", 0),
        peers=(b_address,),
        gossip_rate=40.0,
        grad_rate=20.0,
    )
    a = Node(a_cfg, transport=tcp, task=task(n=2), algorithm=Gossip(lr=0.1))
    await nursery.start(a.run)
    return a, b


async def test_bad_input_is_refused_and_gossip_goes_on(
    live_pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = live_pair
    assert b.address is not None
    target = b.address
    spec = a.spec
    size = spec[0].shape[0]
    good = torch.zeros(size, dtype=torch.float64)
    cases = {
        "garbage bytes": (b"\xff" * 64, False, "malformed header|exceeds the limit"),
        "an oversized length": (struct.pack(">I", 1 << 30), False, "exceeds the limit"),
        "an oversized body": (
            raw_frame(
                {
                    "type": "exchange",
                    "sender": 9,
                    "seq": 0,
                    "alg": "gossip",
                    "v": 1,
                    "exchange_id": 1,
                    "tensors": [["float32", [1 << 29], 1 << 31]],
                }
            ),
            False,
            # before the handshake no tensors at all are taken
            "1 tensors exceed the limit of 0",
        ),
        "a wrong version": (
            frame(Hello(9, 1, "logreg", "", spec), seq=0).replace(b"\xa1v\x01", b"\xa1v\x02"),
            False,
            "protocol version 2",
        ),
        "another algorithm": (
            frame(Hello(9, 1, "logreg", "", spec), seq=0, alg="dadao"),
            False,
            "runs algorithm 'dadao'",
        ),
        "another task": (
            frame(Hello(9, 1, "digits", "", spec), seq=0),
            False,
            "trains task 'digits'",
        ),
        "a wrong shape": (
            frame(Exchange(1, (torch.zeros(size + 1, dtype=torch.float64),)), seq=1),
            True,
            r"payload is float64\[12\]; expected float64\[11\]",
        ),
        "a wrong dtype": (
            frame(Exchange(1, (torch.zeros(size),)), seq=1),
            True,
            r"payload is float32\[11\]",
        ),
        "NaN values": (
            frame(Exchange(1, (good.clone().fill_(float("nan")),)), seq=1),
            True,
            "NaN or infinite",
        ),
        "a bad sequence number": (frame(Exchange(1, (good,)), seq=5), True, "sequence number 5"),
    }
    for name, (data, handshake, expected) in cases.items():
        served_before = b.stats.exchanges["served"]
        reason = await refusal(target, data, handshake=handshake, spec=spec)
        assert re.search(expected, reason), f"{name}: {reason}"
        assert any(reason in r.getMessage() for r in caplog.records), f"{name} not logged"

        # The good peer is still being served.
        def served_more(before: int = served_before) -> bool:
            return b.stats.exchanges["served"] >= before + 3

        assert await eventually(served_more, 10)
    assert b.stats.exchanges["rejected"] == len(cases)
    before_hello = sum(not handshake for _, handshake, _ in cases.values())
    assert b.stats.handshake_failures == before_hello
    assert a.stats.exchanges["failed"] == 0
    messages = [r.getMessage() for r in caplog.records]
    logged = [m for m in messages if "dropping connection" in m or "failed handshake" in m]
    assert len(logged) == len(cases)  # one warning with the reason for each
    a.stop()
    b.stop()
