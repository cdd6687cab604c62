"""The wire codec: frames to bytes and bytes (in any chunking) to frames. No I/O.

A frame is::

    u32 big-endian   length of the header in bytes
    msgpack map      the header
    raw buffers      the tensors listed in header["tensors"], back to back, little-endian

Every header carries ``v`` (protocol version), ``type`` (message type), ``sender`` (node id),
``seq`` (per-connection sequence number), ``alg`` (algorithm name) and ``tensors``: a list of
``[dtype, shape, nbytes]``. Anything else in the header belongs to the message type
(see ``messages``).

Theory of operation: ``FrameDecoder`` is a small state machine (prefix -> header -> body).
Every limit is checked before memory is allocated for what it limits: the header length
before the header is buffered, the tensor table before the body is allocated. The body of a
frame lands in one buffer, allocated once, and the tensors are ``torch.frombuffer`` views of
it, so a 100 MB model is copied at most once between the socket and the algorithm. A shell
that can receive straight into memory asks ``body_view()`` for the place to write and calls
``body_written(n)``; anything else calls ``feed(data)``.

The only exception that leaves this module on bad bytes is ``ProtocolError``.
"""

from __future__ import annotations

import math
import struct
import sys
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

PROTOCOL_VERSION = 1
_PREFIX = struct.Struct(">I")
ENVELOPE = ("v", "type", "sender", "seq", "alg", "tensors")

# Names on the wire; anything else is refused.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Tensor buffers go on the wire in host order, which must be little-endian.
assert sys.byteorder == "little"


Payload = tuple[torch.Tensor, ...]  # the tensors a message carries


class ProtocolError(Exception):
    """The peer sent bytes or messages that break the protocol. The connection is unusable."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on what a peer can make this node buffer or parse."""

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 1 << 30
    max_tensors: int = 64
    max_ndim: int = 8
    max_str_len: int = 4096
    max_array_len: int = 1024
    max_map_len: int = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its header (envelope + message fields) and its tensors."""

    header: dict[str, Any]
    tensors: Payload = ()

    @property
    def type(self) -> str:
        return str(self.header["type"])


# ---------------------------------------------------------------------------- encoding


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (one copy if it is not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def encode(header: Mapping[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[memoryview]:
    """Encode a frame as buffers to send in order: the prefix+header, then one view per tensor.

    ``header`` must hold the envelope fields except ``v`` and ``tensors``, which this adds.
    The tensor buffers are views of the tensors' memory, not copies: keep the tensors
    unchanged until the buffers are sent.
    """
    table = []
    views = []
    for t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {t.dtype} cannot be sent")
        view = tensor_bytes(t)
        table.append([DTYPE_NAMES[t.dtype], list(t.shape), view.nbytes])
        views.append(view)
    packed = msgpack.packb({**header, "v": PROTOCOL_VERSION, "tensors": table})
    return [memoryview(_PREFIX.pack(len(packed)) + packed), *views]


def encode_bytes(header: Mapping[str, Any], tensors: Sequence[torch.Tensor] = ()) -> bytes:
    """``encode`` joined into one bytes object (tests, small frames)."""
    return b"".join(bytes(part) for part in encode(header, tensors))


# ---------------------------------------------------------------------------- decoding

Allocator = Callable[[int], memoryview]


def allocate_body(nbytes: int) -> memoryview:
    """A fresh writable buffer for a frame body (torch memory: huge pages when enabled)."""
    return torch.empty(nbytes, dtype=torch.uint8).numpy().data


class BufferPool:
    """Frame-body buffers reused once no tensor refers to them any more.

    A fresh 100 MB buffer costs page faults on every first write; a node receiving the same
    model over and over can recycle a few. Bodies under ``min_bytes`` are not worth it. The
    pool holds at most ``keep`` buffers, busy or idle; beyond that it allocates fresh ones.
    """

    def __init__(self, keep: int = 4, min_bytes: int = 1 << 20) -> None:
        self.keep = keep
        self.min_bytes = min_bytes
        # A buffer is busy while the numpy view it lent out lives: tensors made from that
        # view by torch.frombuffer keep it alive, and nothing else does.
        self._buffers: list[tuple[torch.Tensor, weakref.ref[Any]]] = []

    def allocate(self, nbytes: int) -> memoryview:
        if nbytes < self.min_bytes:
            return allocate_body(nbytes)
        idle = [i for i, (_, lent) in enumerate(self._buffers) if lent() is None]
        slot = next((i for i in idle if self._buffers[i][0].numel() == nbytes), None)
        if slot is not None:
            buffer = self._buffers[slot][0]
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            if len(self._buffers) >= self.keep:
                if not idle:
                    return buffer.numpy().data  # every pooled buffer is busy: not pooled
                slot = idle[0]  # an idle buffer of another size makes room
        view = buffer.numpy()
        entry = (buffer, weakref.ref(view))
        if slot is None:
            self._buffers.append(entry)
        else:
            self._buffers[slot] = entry
        return view.data


@dataclass(frozen=True, slots=True)
class _Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class FrameDecoder:
    """Turn a byte stream into frames. Feed it any chunking; take frames with ``next_frame``."""

    limits: Limits = field(default_factory=Limits)
    allocate: Allocator = allocate_body

    _buffer: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _header_len: int | None = field(default=None, init=False)
    _header: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _specs: list[_Spec] = field(default_factory=list, init=False, repr=False)
    _body: memoryview | None = field(default=None, init=False, repr=False)
    _filled: int = field(default=0, init=False)
    _frames: deque[Frame] = field(default_factory=deque, init=False, repr=False)
    _error: ProtocolError | None = field(default=None, init=False)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume bytes. Raises ProtocolError, after which the decoder stays broken."""
        self._check_usable()
        view = memoryview(data).cast("B")
        try:
            while view:
                if self._body is not None:
                    n = min(len(view), len(self._body) - self._filled)
                    self._body[self._filled : self._filled + n] = view[:n]
                    view = view[n:]
                    self.body_written(n)
                else:
                    view = self._take_head(view)
        except ProtocolError as exc:
            self._error = exc
            raise

    def body_view(self) -> memoryview | None:
        """Where the rest of the current frame's body goes, for ``recv_into``; else None."""
        if self._body is None:
            return None
        return self._body[self._filled :]

    def body_written(self, n: int) -> None:
        """Record that ``n`` bytes were written into ``body_view()``."""
        assert self._body is not None
        assert 0 <= n <= len(self._body) - self._filled
        self._filled += n
        if self._filled == len(self._body):
            self._finish(self._body)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        return self._frames.popleft() if self._frames else None

    @property
    def idle(self) -> bool:
        """True between frames: nothing of a next frame has arrived yet."""
        return not self._buffer and self._header_len is None and self._body is None

    # -- internals

    def _check_usable(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"decoder failed earlier: {self._error}")

    def _take_head(self, view: memoryview) -> memoryview:
        """Buffer prefix and header bytes; parse them when complete. Returns what is left."""
        need = _PREFIX.size if self._header_len is None else self._header_len
        take = min(len(view), need - len(self._buffer))
        self._buffer += view[:take]
        view = view[take:]
        if len(self._buffer) < need:
            return view
        if self._header_len is None:
            (self._header_len,) = _PREFIX.unpack(self._buffer)
            self._buffer.clear()
            if self._header_len > self.limits.max_header_bytes:
                raise ProtocolError(
                    f"header of {self._header_len} bytes exceeds the limit of "
                    f"{self.limits.max_header_bytes}"
                )
            if self._header_len == 0:
                raise ProtocolError("empty header")
            return view
        header = self._parse_header(bytes(self._buffer))
        self._buffer.clear()
        self._header_len = None
        self._specs = _tensor_specs(header["tensors"], self.limits)
        total = sum(s.nbytes for s in self._specs)
        if total > self.limits.max_body_bytes:
            raise ProtocolError(
                f"frame body of {total} bytes exceeds the limit of {self.limits.max_body_bytes}"
            )
        self._header = header
        if total == 0:
            self._finish(memoryview(b""))
        else:
            self._body, self._filled = self.allocate(total), 0
        return view

    def _parse_header(self, raw: bytes) -> dict[str, Any]:
        lim = self.limits
        try:
            header = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_str_len=lim.max_str_len,
                max_bin_len=lim.max_str_len,
                max_array_len=lim.max_array_len,
                max_map_len=lim.max_map_len,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many types on bad input
            raise ProtocolError(f"malformed header: {type(exc).__name__}: {exc}") from exc
        if not isinstance(header, dict):
            raise ProtocolError(f"header is a {type(header).__name__}, not a map")
        missing = [key for key in ENVELOPE if key not in header]
        if missing:
            raise ProtocolError(f"header lacks {', '.join(missing)}")
        if header["v"] != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {header['v']!r}; this node speaks {PROTOCOL_VERSION}"
            )
        for key, kind in (("type", str), ("sender", int), ("seq", int), ("alg", str)):
            if not isinstance(header[key], kind) or isinstance(header[key], bool):
                raise ProtocolError(f"header field {key!r} must be {kind.__name__}")
        return header

    def _finish(self, body: memoryview) -> None:
        assert self._header is not None
        tensors, offset = [], 0
        for spec in self._specs:
            if spec.nbytes == 0:
                tensors.append(torch.empty(spec.shape, dtype=spec.dtype))
            else:
                flat = torch.frombuffer(
                    body, dtype=spec.dtype, count=math.prod(spec.shape), offset=offset
                )
                tensors.append(flat.view(spec.shape))
            offset += spec.nbytes
        self._frames.append(Frame(self._header, tuple(tensors)))
        self._header, self._specs, self._body, self._filled = None, [], None, 0


def _tensor_specs(table: object, limits: Limits) -> list[_Spec]:
    if not isinstance(table, list):
        raise ProtocolError("header field 'tensors' must be a list")
    if len(table) > limits.max_tensors:
        raise ProtocolError(f"{len(table)} tensors exceed the limit of {limits.max_tensors}")
    return [_tensor_spec(entry, limits) for entry in table]


def _tensor_spec(entry: object, limits: Limits) -> _Spec:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise ProtocolError("a tensor entry must be [dtype, shape, nbytes]")
    name, shape, nbytes = entry
    if name not in DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}")
    if not (isinstance(shape, list) and len(shape) <= limits.max_ndim):
        raise ProtocolError(f"a shape must be a list of at most {limits.max_ndim} sizes")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"bad shape {shape!r}")
    dtype = DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise ProtocolError(f"tensor {name}{shape} declares {nbytes!r} bytes, not {expected}")
    return _Spec(dtype, tuple(shape), expected)
