"""The wire codec, without sockets: round trips, any chunking, hostile bytes, pinned format."""

from __future__ import annotations

import contextlib
import math
import struct

import msgpack
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gossipnode.wire import (
    DTYPES,
    PROTOCOL_VERSION,
    BufferPool,
    Frame,
    FrameDecoder,
    Limits,
    ProtocolError,
    encode,
    encode_bytes,
)

ENVELOPE = {"type": "exchange", "sender": 3, "seq": 0, "alg": "gossip"}


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    nbytes = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


headers = st.fixed_dictionaries(
    {
        "type": st.text(max_size=10),
        "sender": st.integers(0, 2**63 - 1),
        "seq": st.integers(0, 2**32),
        "alg": st.text(max_size=10),
    },
    optional={"exchange_id": st.integers(0, 2**63 - 1), "reason": st.text(max_size=50)},
)
frames = st.tuples(headers, st.lists(tensors(), max_size=4))


def same(frame: Frame, header: dict, sent: list[torch.Tensor]) -> bool:
    expected = {**header, "v": PROTOCOL_VERSION}
    got = {k: v for k, v in frame.header.items() if k != "tensors"}
    return (
        got == expected
        and len(frame.tensors) == len(sent)
        and all(
            a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)
            for a, b in zip(frame.tensors, sent, strict=True)
        )
    )


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def decode_all(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


@given(frames)
def test_round_trip(frame: tuple[dict, list[torch.Tensor]]) -> None:
    header, sent = frame
    decoder = FrameDecoder()
    decoder.feed(encode_bytes(header, sent))
    (got,) = decode_all(decoder)
    assert same(got, header, sent)
    assert decoder.idle


@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_any_split_of_concatenated_frames(batch: list, data: st.DataObject) -> None:
    stream = b"".join(encode_bytes(h, t) for h, t in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
    got = decode_all(decoder)
    assert len(got) == len(batch)
    assert all(same(g, h, t) for g, (h, t) in zip(got, batch, strict=True))


@given(st.lists(frames, min_size=1, max_size=3), st.data())
def test_receive_into_body_views(batch: list, data: st.DataObject) -> None:
    """The shell's zero-copy path: header bytes fed, bodies written into body_view()."""
    stream = memoryview(b"".join(encode_bytes(h, t) for h, t in batch))
    decoder = FrameDecoder()
    got: list[Frame] = []
    while stream:
        size = data.draw(st.integers(1, 64))
        view = decoder.body_view()
        if view is None:
            decoder.feed(stream[:size])
            stream = stream[size:]
        else:
            n = min(size, len(view), len(stream))
            view[:n] = stream[:n]
            decoder.body_written(n)
            stream = stream[n:]
        got += decode_all(decoder)
    assert all(same(g, h, t) for g, (h, t) in zip(got, batch, strict=True))
    assert len(got) == len(batch)


@given(st.binary(max_size=300))
def test_random_bytes_give_frames_or_protocol_error(junk: bytes) -> None:
    decoder = FrameDecoder(Limits(max_header_bytes=256, max_body_bytes=1024))
    try:
        decoder.feed(junk)
        decode_all(decoder)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and it stays broken
            decoder.feed(b"\x00")


@given(frames, st.integers(0, 7), st.integers(0, 255))
def test_corrupted_frames_give_frames_or_protocol_error(frame: tuple, pos: int, byte: int) -> None:
    raw = bytearray(encode_bytes(*frame))
    raw[min(pos * 7, len(raw) - 1)] = byte
    with contextlib.suppress(ProtocolError):
        FrameDecoder().feed(bytes(raw))


def test_oversized_header_is_rejected_before_buffering() -> None:
    decoder = FrameDecoder(Limits(max_header_bytes=1000))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack(">I", 1001))  # the 4-byte prefix alone is enough


def test_oversized_body_is_rejected_before_allocating() -> None:
    calls: list[int] = []

    def allocate(n: int) -> memoryview:
        calls.append(n)
        return memoryview(bytearray(n))

    decoder = FrameDecoder(Limits(max_body_bytes=1 << 20), allocate=allocate)
    header = msgpack.packb({**ENVELOPE, "v": 1, "tensors": [["float32", [1 << 40], 4 << 40]]})
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack(">I", len(header)) + header)
    assert calls == []


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2, 3], "not a map"),
        ({"type": "x"}, "lacks"),
        ({**ENVELOPE, "v": 99, "tensors": []}, "protocol version 99"),
        ({**ENVELOPE, "v": 1, "sender": "me", "tensors": []}, "'sender' must be int"),
        ({**ENVELOPE, "v": 1, "tensors": [["complex64", [1], 8]]}, "unknown dtype"),
        ({**ENVELOPE, "v": 1, "tensors": [["float32", [-1], -4]]}, "bad shape"),
        ({**ENVELOPE, "v": 1, "tensors": [["float32", [2], 4]]}, "declares 4 bytes, not 8"),
        ({**ENVELOPE, "v": 1, "tensors": [["float32", [1], 4]] * 65}, "65 tensors"),
        ({**ENVELOPE, "v": 1, "tensors": [["float32", [1] * 9, 4]]}, "at most 8"),
        ({**ENVELOPE, "v": 1, "tensors": "none"}, "must be a list"),
    ],
)
def test_malformed_headers(header: object, message: str) -> None:
    packed = msgpack.packb(header)
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(struct.pack(">I", len(packed)) + packed)


def test_msgpack_container_limits_apply_inside_the_header() -> None:
    # A map declaring 2**31 entries in 6 bytes must fail at parse, not allocate.
    packed = b"\xdf\x80\x00\x00\x00"
    with pytest.raises(ProtocolError, match="malformed header"):
        FrameDecoder().feed(struct.pack(">I", len(packed)) + packed)
    long_string = msgpack.packb({**ENVELOPE, "v": 1, "tensors": [], "reason": "x" * 5000})
    with pytest.raises(ProtocolError, match="malformed header"):
        FrameDecoder().feed(struct.pack(">I", len(long_string)) + long_string)


def test_golden_bytes() -> None:
    """Pins the frame format: changing it must be a deliberate protocol version change."""
    header = {**ENVELOPE, "exchange_id": 7}
    raw = encode_bytes(header, [torch.tensor([1.0, -2.0])])
    assert raw.hex() == (
        "0000004c"  # header length: 76 bytes
        "87"  # a msgpack map of 7 entries:
        "a474797065a865786368616e6765"  # "type": "exchange"
        "a673656e64657203"  # "sender": 3
        "a373657100"  # "seq": 0
        "a3616c67a6676f73736970"  # "alg": "gossip"
        "ab65786368616e67655f696407"  # "exchange_id": 7
        "a17601"  # "v": 1
        "a774656e736f72739193a7666c6f617433329102"
        "08"  # "tensors": [["float32", [2], 8]]
        "0000803f000000c0"  # the tensor: 1.0, -2.0 as little-endian float32
    )


def test_encode_views_share_tensor_memory() -> None:
    t = torch.arange(4, dtype=torch.float32)
    parts = encode(ENVELOPE, [t])
    t[0] = 42.0
    assert torch.frombuffer(bytearray(parts[1]), dtype=torch.float32)[0] == 42.0


def test_non_contiguous_and_bfloat16_tensors() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    b = torch.tensor([1.5, -3.0], dtype=torch.bfloat16)
    decoder = FrameDecoder()
    decoder.feed(encode_bytes(ENVELOPE, [t, b]))
    frame = decoder.next_frame()
    assert frame is not None
    assert torch.equal(frame.tensors[0], t)
    assert torch.equal(frame.tensors[1], b)


def test_buffer_pool_reuses_a_buffer_only_once_it_is_free() -> None:
    pool = BufferPool(keep=2, min_bytes=16)
    frame_bytes = encode_bytes(ENVELOPE, [torch.arange(8, dtype=torch.float32)])

    def receive() -> torch.Tensor:
        decoder = FrameDecoder(allocate=pool.allocate)
        decoder.feed(frame_bytes)
        frame = decoder.next_frame()
        assert frame is not None
        return frame.tensors[0]

    first = receive()
    second = receive()  # the first is still alive: a different buffer
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, second)
    address = first.data_ptr()
    del first
    third = receive()  # the first's buffer is free again
    assert third.data_ptr() == address
    assert torch.equal(third, torch.arange(8, dtype=torch.float32))
    fourth = receive()  # both pooled buffers busy: a fresh one, not pooled
    assert fourth.data_ptr() not in (address, second.data_ptr())


def test_buffer_pool_ignores_small_bodies() -> None:
    pool = BufferPool(min_bytes=1 << 20)
    a = pool.allocate(100)
    b = pool.allocate(100)
    assert len(a) == len(b) == 100
    assert pool._buffers == []
