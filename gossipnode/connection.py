"""One peer connection: typed messages over a transport stream, via the wire codec.

This is the adapter between the sans-I/O core (``wire``, ``messages``) and trio: it fills in
the envelope on the way out, checks it on the way in, receives frame bodies straight into
their buffers where the stream allows, and counts bytes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import trio

from gossipnode import auth
from gossipnode.messages import (
    CLIENT,
    Challenge,
    Error,
    Hello,
    Message,
    Proof,
    Response,
    from_frame,
    to_frame,
)
from gossipnode.transport import Stream, TransportError
from gossipnode.wire import (
    Allocator,
    Frame,
    FrameDecoder,
    Limits,
    ProtocolError,
    allocate_body,
    encode,
)

RECEIVE_CHUNK = 64 * 1024
SMALL_FRAME = 64 * 1024  # frames up to this size are sent in one write


class RemoteError(Exception):
    """The peer sent an Error message (and will close): it refused something of ours."""


class ConnectionClosed(TransportError):
    """The peer closed the connection."""


class AuthError(ProtocolError):
    """The peer did not prove that it holds the cluster key."""


# What a peer may make us buffer before it has authenticated and said Hello: no tensors.
HANDSHAKE_LIMITS = Limits(max_header_bytes=16 * 1024, max_body_bytes=0, max_tensors=0)


class Meter(Protocol):
    """Where a connection adds up the bytes it moves (a node's stats)."""

    def moved(self, peer: int | None, sent: int, received: int) -> None:
        """``peer`` is the node at the other end, None until its first frame."""
        ...


class _Bytes:
    bytes_sent = 0
    bytes_received = 0

    def moved(self, peer: int | None, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received


ANY_ALGORITHM = "*"  # what a merge client sends until it has learnt the cluster's algorithm


class Connection:
    def __init__(
        self,
        stream: Stream,
        *,
        node_id: int,
        algorithm: str,
        limits: Limits,
        meter: Meter | None = None,
        allocate: Allocator = allocate_body,
    ) -> None:
        self.stream = stream
        self.node_id = node_id
        self.algorithm = algorithm
        self.peer_id: int | None = None  # set from the first frame received
        self.meter = meter if meter is not None else _Bytes()
        self._limits = limits
        self._decoder = FrameDecoder(HANDSHAKE_LIMITS, allocate)
        self._seq = 0
        self._peer_seq = -1

    async def send(self, msg: Message) -> None:
        fields, tensors = to_frame(msg)
        header = {"sender": self.node_id, "seq": self._seq, "alg": self.algorithm, **fields}
        self._seq += 1
        parts = encode(header, tensors)
        size = sum(part.nbytes for part in parts)
        if size <= SMALL_FRAME:  # one write: fewer syscalls, or fewer scheduler trips
            parts = [memoryview(b"".join(parts))]
        for part in parts:
            await self.stream.send_all(part)
        self.meter.moved(self.peer_id, size, 0)

    async def receive(self, frame_timeout: float | None = None) -> Message:
        """The next message. Once part of a frame has arrived, the rest must come within
        ``frame_timeout`` seconds (ProtocolError otherwise), so a stalled sender cannot hold
        the connection forever. Raises RemoteError if the peer sent an Error."""
        frame = await self._receive_frame(frame_timeout)
        msg = from_frame(frame)
        if isinstance(msg, Error):
            raise RemoteError(msg.reason)
        self._check_envelope(frame, msg)
        return msg

    async def authenticate(self, key: bytes | None, *, dialer: bool) -> None:
        """Prove to the peer that we hold ``key`` and check that it does (``auth``); nothing
        without a key. Raises AuthError, or RemoteError if the peer refused us."""
        if key is None:
            return
        if dialer:
            ours = auth.nonce()
            await self.send(Challenge(ours))
            response = await self.receive()
            if not isinstance(response, Response):
                raise ProtocolError(f"expected Response, got {type(response).__name__}")
            ids = (ours, response.nonce, self.node_id, self._known_peer())
            if not auth.verify(auth.proof(key, auth.LISTENER, *ids), response.proof):
                raise AuthError("the peer does not hold the cluster key")
            await self.send(Proof(auth.proof(key, auth.DIALER, *ids)))
            return
        challenge = await self.receive()
        if isinstance(challenge, Hello):
            raise AuthError("the peer did not authenticate (it has no cluster key?)")
        if not isinstance(challenge, Challenge):
            raise ProtocolError(f"expected Challenge, got {type(challenge).__name__}")
        ours = auth.nonce()
        ids = (challenge.nonce, ours, self._known_peer(), self.node_id)
        await self.send(Response(ours, auth.proof(key, auth.LISTENER, *ids)))
        proof = await self.receive()
        if not isinstance(proof, Proof):
            raise ProtocolError(f"expected Proof, got {type(proof).__name__}")
        if not auth.verify(auth.proof(key, auth.DIALER, *ids), proof.proof):
            raise AuthError("wrong cluster key")

    def admit(self) -> None:
        """The handshake is done: from now on the peer may send frames up to our limits."""
        self._decoder.limits = self._limits

    def _known_peer(self) -> int:
        assert self.peer_id is not None  # set by the first frame received
        return self.peer_id

    @property
    def peer_name(self) -> str:
        where = f" at {self.stream.remote}" if self.stream.remote else ""
        who = "an unidentified peer" if self.peer_id is None else f"node {self.peer_id}"
        return who + where

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(TransportError):
            await self.stream.aclose()

    def _check_envelope(self, frame: Frame, msg: Message) -> None:
        header = frame.header
        if self.algorithm == ANY_ALGORITHM and self.peer_id is None:
            self.algorithm = header["alg"]  # a merge client learns the cluster's from its node
        elif header["alg"] == ANY_ALGORITHM and _may_be_a_client(msg):
            pass  # a client that has not learnt it yet: it gets no gossip state anyway
        elif header["alg"] != self.algorithm:
            raise ProtocolError(
                f"peer runs algorithm {header['alg']!r}; this node runs {self.algorithm!r}"
            )
        if self.peer_id is None:
            self.peer_id = header["sender"]
        elif header["sender"] != self.peer_id:
            raise ProtocolError(f"sender id changed from {self.peer_id} to {header['sender']}")
        if header["seq"] != self._peer_seq + 1:
            raise ProtocolError(f"sequence number {header['seq']} after {self._peer_seq}")
        self._peer_seq = header["seq"]

    async def _receive_frame(self, frame_timeout: float | None) -> Frame:
        deadline = math.inf
        while (frame := self._decoder.next_frame()) is None:
            if frame_timeout is not None and deadline == math.inf and not self._decoder.idle:
                deadline = trio.current_time() + frame_timeout
            if deadline == math.inf:
                n = await self._receive_some()
            else:
                with trio.move_on_at(deadline):
                    n = await self._receive_some()
                if trio.current_time() >= deadline:
                    raise ProtocolError(f"frame not completed within {frame_timeout:g}s")
            if n == 0:
                where = "" if self._decoder.idle else " in the middle of a frame"
                raise ConnectionClosed(f"peer closed the connection{where}")
        return frame

    async def _receive_some(self) -> int:
        view = self._decoder.body_view()
        if view is not None:
            n = await self.stream.receive_into(view)
            if n:
                self._decoder.body_written(n)
        else:
            data = await self.stream.receive_some(RECEIVE_CHUNK)
            n = len(data)
            if n:
                self._decoder.feed(data)
        self.meter.moved(self.peer_id, 0, n)
        return n


def _may_be_a_client(msg: Message) -> bool:
    """Whether ``msg`` may come from a merge client, which sends no algorithm until it has
    met a node: its authentication and its Hello."""
    return isinstance(msg, Challenge | Proof) or (isinstance(msg, Hello) and msg.role == CLIENT)
