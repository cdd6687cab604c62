"""Messages to frames and back, and the checks a payload must pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gossipnode.messages import (
    Busy,
    Error,
    Exchange,
    Hello,
    Message,
    Reply,
    TensorSpec,
    check_payload,
    from_frame,
    to_frame,
)
from gossipnode.wire import Frame, FrameDecoder, ProtocolError, encode_bytes

SPEC = (TensorSpec(torch.float32, (3,)),)
HELLO = {
    "type": "hello",
    "node_id": 1,
    "session": 5,
    "task": "t",
    "signature": "",
    "payload_spec": [],
}


def decode(header: dict[str, Any]) -> Message:
    """A message from a bare header, as a frame without tensors."""
    return from_frame(Frame({"v": 1, "sender": 0, "seq": 0, "alg": "gossip", **header}))


def through_the_wire(msg: Message) -> Message:
    fields, tensors = to_frame(msg)
    decoder = FrameDecoder()
    decoder.feed(encode_bytes({"sender": 1, "seq": 0, "alg": "gossip", **fields}, tensors))
    frame = decoder.next_frame()
    assert frame is not None
    return from_frame(frame)


@pytest.mark.parametrize(
    "msg",
    [
        Hello(
            4,
            2**62,
            "digits",
            "mu=1 L=2",
            (TensorSpec(torch.float32, (5130,)), TensorSpec(torch.float64, ())),
        ),
        Busy(2**62, "busy"),
        Error("payload is float64[3]; expected float32[3]"),
    ],
)
def test_messages_without_tensors_round_trip(msg: Message) -> None:
    assert through_the_wire(msg) == msg


@pytest.mark.parametrize("kind", [Exchange, Reply])
def test_payload_messages_round_trip(kind: type[Exchange] | type[Reply]) -> None:
    payload = (torch.tensor([1.0, 2.0, 3.0]),)
    got = through_the_wire(kind(9, payload))
    assert isinstance(got, kind)
    assert got.exchange_id == 9
    assert torch.equal(got.payload[0], payload[0])


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"type": "launch"}, "unknown message type"),
        ({"type": "exchange"}, "'exchange_id' must be an integer"),
        ({"type": "exchange", "exchange_id": True}, "must be an integer"),
        ({**HELLO, "task": 3}, "'task' must be a string"),
        ({**HELLO, "session": "x"}, "'session' must be an integer"),
        ({**HELLO, "signature": None}, "'signature' must be a string"),
        ({**HELLO, "payload_spec": [["f", [1]]]}, "bad payload"),
        ({**HELLO, "payload_spec": None}, "must be a list"),
    ],
)
def test_bad_fields(header: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(header)


def test_check_payload_accepts_a_matching_payload() -> None:
    check_payload((torch.zeros(3),), SPEC)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ((torch.zeros(4),), r"payload is float32\[4\]; expected float32\[3\]"),
        ((torch.zeros(3, dtype=torch.float64),), r"float64\[3\]"),
        ((), "payload is empty"),
        ((torch.zeros(3), torch.zeros(3)), "expected float32"),
        ((torch.tensor([0.0, float("nan"), 1.0]),), "NaN or infinite"),
        ((torch.tensor([0.0, float("inf"), 1.0]),), "NaN or infinite"),
    ],
)
def test_check_payload_refuses(payload: tuple, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        check_payload(payload, SPEC)


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    big = torch.tensor([3e38, 3e38, 3e38])
    check_payload((big,), SPEC)
