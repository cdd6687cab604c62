"""The messages two nodes exchange, and how each maps to a wire frame header. No I/O.

A conversation on one connection::

    dialer                               listener
    Challenge(nonce)                   ->                        (with a cluster key: ``auth``)
                                      <- Response(nonce, proof)
    Proof(proof)                       ->
    Hello(node_id, session, task,      ->
          signature, payload_spec)
                                      <- Hello(...)            (or Error, then close)
    Exchange(exchange_id, payload)     ->
                                      <- Reply(exchange_id, payload) | Busy(exchange_id, reason)
    ... more exchanges, one at a time ...

The dialer of a connection always initiates its exchanges; the listener only answers. So a
gossip edge uses one connection per direction and no two requests ever cross on a stream.
An exchange id is chosen by the initiator; sending the same id again is a retry, which the
responder answers from its cache without applying the update twice.

A merge client (``gossipnode merge``) is not a gossip peer: its Hello has the role ``client``,
and the node's Hello back lists the spec of its model (flat parameters), not of its gossip
payload. A client that does not know the task, signature or spec yet (before it has met a
first node) leaves them empty; what it gives must be the node's. Then, one request at a time::

    client                               node
    Fetch()                            ->
                                      <- Model(gradients, (params,))
    Merge(merge_id, (average,))        ->
                                      <- Merged(merge_id, local, merged, saved)

Membership (``membership``, ``swim``) rides on peer connections too, one request at a time:
``Ping`` is answered by ``Ack``; ``PingReq`` (ping that member for me) by ``Ack`` saying
whether it answered; ``Sync`` (all I know) by ``Sync``. Each carries ``Update``s. A peer may
also ``Fetch`` a node's model, to start from it when it joins late.

The node re-estimates BatchNorm statistics for the average on its own data, evaluates it and
keeps it (``saved``: where, "" if nowhere), and goes on training its own model. It refuses an
Exchange from a client, and a Fetch or Merge from a peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gossipnode.auth import NONCE_BYTES, PROOF_BYTES
from gossipnode.membership import Status, Update
from gossipnode.wire import DTYPE_NAMES, DTYPES, Frame, Payload, ProtocolError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The dtype and shape of one payload tensor; both ends must agree on them."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}{list(self.shape)}"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


STATUSES = {s.value for s in Status}
PEER = "peer"
CLIENT = "client"  # a merge client: fetches and merges models, never gossips
ROLES = (PEER, CLIENT)


@dataclass(frozen=True, slots=True)
class Hello:
    node_id: int
    session: int  # random per process start: a new one means the peer restarted, state fresh
    task: str
    signature: str  # the algorithm's parameters that both ends must share
    payload_spec: tuple[TensorSpec, ...]
    role: str = PEER  # absent on the wire: a peer


@dataclass(frozen=True, slots=True)
class Challenge:
    """A dialer with the cluster key opens with this (see ``auth``)."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """The listener's proof that it holds the key, and its own challenge."""

    nonce: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    """The dialer's proof that it holds the key."""

    proof: bytes


@dataclass(frozen=True, slots=True)
class Exchange:
    exchange_id: int
    payload: Payload


@dataclass(frozen=True, slots=True)
class Reply:
    exchange_id: int
    payload: Payload


@dataclass(frozen=True, slots=True)
class Busy:
    exchange_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Fetch:
    """A merge client asks for the node's model."""


@dataclass(frozen=True, slots=True)
class Model:
    gradients: int  # gradient steps the node has applied
    payload: Payload  # (flat parameters,)


@dataclass(frozen=True, slots=True)
class Merge:
    merge_id: int
    payload: Payload  # (the average of the cluster's flat parameters,)


@dataclass(frozen=True, slots=True)
class Merged:
    merge_id: int
    local: dict[str, float]  # the metrics of the node's own model
    merged: dict[str, float]  # of the merged one, with BatchNorm re-estimated on local data
    saved: str  # where the node wrote the merged model; "" if nowhere


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there? (failure detection); carries membership news both ways."""

    probe_id: int
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class PingReq:
    """Probe ``target`` at ``address`` for me, and tell me if it answered."""

    probe_id: int
    target: int
    address: str
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    probe_id: int
    ok: bool  # to a PingReq: whether the target answered
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Sync:
    """All a node knows of the cluster; answered with the same (joins, partitions healing)."""

    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Error:
    """Sent before closing a connection because of the peer's fault; the reason is for humans."""

    reason: str


Message = (
    Challenge | Response | Proof | Hello | Exchange | Reply | Busy | Fetch | Model | Merge | Merged
) | (Ping | PingReq | Ack | Sync | Error)


def to_frame(msg: Message) -> tuple[dict[str, Any], Payload]:
    """The message-specific header fields (type included) and the tensors of ``msg``."""
    match msg:
        case Hello(node_id, session, task, signature, spec, role):
            table = [[DTYPE_NAMES[s.dtype], list(s.shape)] for s in spec]
            fields = {
                "node_id": node_id,
                "session": session,
                "task": task,
                "signature": signature,
                "payload_spec": table,
                "role": role,
            }
            return {"type": "hello", **fields}, ()
        case Challenge(nonce):
            return {"type": "challenge", "nonce": nonce}, ()
        case Response(nonce, proof):
            return {"type": "response", "nonce": nonce, "proof": proof}, ()
        case Proof(proof):
            return {"type": "proof", "proof": proof}, ()
        case Exchange(exchange_id, payload):
            return {"type": "exchange", "exchange_id": exchange_id}, payload
        case Reply(exchange_id, payload):
            return {"type": "reply", "exchange_id": exchange_id}, payload
        case Busy(exchange_id, reason):
            return {"type": "busy", "exchange_id": exchange_id, "reason": reason}, ()
        case Fetch():
            return {"type": "fetch"}, ()
        case Model(gradients, payload):
            return {"type": "model", "gradients": gradients}, payload
        case Merge(merge_id, payload):
            return {"type": "merge", "merge_id": merge_id}, payload
        case Merged(merge_id, local, merged, saved):
            fields = {"merge_id": merge_id, "local": local, "merged": merged, "saved": saved}
            return {"type": "merged", **fields}, ()
        case Ping(probe_id, updates):
            return {"type": "ping", "probe_id": probe_id, "updates": _table(updates)}, ()
        case PingReq(probe_id, target, address, updates):
            fields = {"probe_id": probe_id, "target": target, "address": address}
            return {"type": "ping_req", **fields, "updates": _table(updates)}, ()
        case Ack(probe_id, ok, updates):
            fields = {"probe_id": probe_id, "ok": ok, "updates": _table(updates)}
            return {"type": "ack", **fields}, ()
        case Sync(updates):
            return {"type": "sync", "updates": _table(updates)}, ()
        case Error(reason):
            return {"type": "error", "reason": reason}, ()


def from_frame(frame: Frame) -> Message:
    """The message a decoded frame carries. Raises ProtocolError if its fields are wrong."""
    h = frame.header
    match frame.type:
        case "hello":
            return Hello(
                _int(h, "node_id"),
                _int(h, "session"),
                _str(h, "task"),
                _str(h, "signature"),
                _spec(h.get("payload_spec")),
                _role(h.get("role", PEER)),
            )
        case "challenge":
            return Challenge(_bytes(h, "nonce", NONCE_BYTES))
        case "response":
            return Response(_bytes(h, "nonce", NONCE_BYTES), _bytes(h, "proof", PROOF_BYTES))
        case "proof":
            return Proof(_bytes(h, "proof", PROOF_BYTES))
        case "exchange":
            return Exchange(_int(h, "exchange_id"), frame.tensors)
        case "reply":
            return Reply(_int(h, "exchange_id"), frame.tensors)
        case "busy":
            return Busy(_int(h, "exchange_id"), _str(h, "reason"))
        case "fetch":
            return Fetch()
        case "model":
            return Model(_int(h, "gradients"), frame.tensors)
        case "merge":
            return Merge(_int(h, "merge_id"), frame.tensors)
        case "merged":
            return Merged(
                _int(h, "merge_id"), _metrics(h, "local"), _metrics(h, "merged"), _str(h, "saved")
            )
        case "ping":
            return Ping(_int(h, "probe_id"), _updates(h))
        case "ping_req":
            return PingReq(_int(h, "probe_id"), _int(h, "target"), _str(h, "address"), _updates(h))
        case "ack":
            ok = h.get("ok")
            if not isinstance(ok, bool):
                raise ProtocolError(f"field 'ok' must be true or false, got {ok!r}")
            return Ack(_int(h, "probe_id"), ok, _updates(h))
        case "sync":
            return Sync(_updates(h))
        case "error":
            return Error(_str(h, "reason"))
        case other:
            raise ProtocolError(f"unknown message type {other!r}")


def check_payload(payload: Payload, spec: tuple[TensorSpec, ...]) -> None:
    """Refuse a payload whose dtypes or shapes differ from ``spec`` or that holds NaN or inf."""
    got = tuple(TensorSpec.of(t) for t in payload)
    if got != spec:
        raise ProtocolError(
            f"payload is {', '.join(map(str, got)) or 'empty'}; "
            f"expected {', '.join(map(str, spec))}"
        )
    for i, t in enumerate(payload):
        # Any NaN or inf makes the sum non-finite; only then pay for the exact check
        # (a finite tensor can still overflow its sum).
        if t.is_floating_point() and not (
            bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
        ):
            raise ProtocolError(f"payload tensor {i} holds NaN or infinite values")


def _int(h: dict[str, Any], key: str) -> int:
    value = h.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _str(h: dict[str, Any], key: str) -> str:
    value = h.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string, got {value!r}")
    return value


def _bytes(h: dict[str, Any], key: str, size: int) -> bytes:
    value = h.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"field {key!r} must be {size} bytes, got {value!r:.80}")
    return value


def _table(updates: tuple[Update, ...]) -> list[list[Any]]:
    return [[u.node, u.address, u.incarnation, u.status.value] for u in updates]


def _updates(h: dict[str, Any]) -> tuple[Update, ...]:
    table = h.get("updates")
    if not isinstance(table, list):
        raise ProtocolError("field 'updates' must be a list")
    updates = []
    for row in table:
        ok = (
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(row[i], int) and not isinstance(row[i], bool) for i in (0, 2))
            and isinstance(row[1], str)
            and row[2] >= 0
            and row[3] in STATUSES
        )
        if not ok:
            raise ProtocolError(f"bad membership update {row!r:.200}")
        updates.append(Update(row[0], row[1], row[2], Status(row[3])))
    return tuple(updates)


def _role(value: object) -> str:
    if value not in ROLES:
        raise ProtocolError(f"field 'role' must be one of {', '.join(ROLES)}, got {value!r}")
    assert isinstance(value, str)
    return value


def _metrics(h: dict[str, Any], key: str) -> dict[str, float]:
    value = h.get(key)
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in value.items()
    )
    if not ok:
        raise ProtocolError(f"field {key!r} must map names to numbers, got {value!r}")
    assert isinstance(value, dict)
    return {k: float(v) for k, v in value.items()}


def _spec(table: object) -> tuple[TensorSpec, ...]:
    if not isinstance(table, list):
        raise ProtocolError("field 'payload_spec' must be a list")
    specs = []
    for entry in table:
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and entry[0] in DTYPES
            and isinstance(entry[1], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])
        )
        if not ok:
            raise ProtocolError(f"bad payload_spec entry {entry!r}")
        specs.append(TensorSpec(DTYPES[entry[0]], tuple(entry[1])))
    return tuple(specs)
