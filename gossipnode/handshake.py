"""Whether a Hello comes from someone this node may talk with. Pure: each refusal is a
ProtocolError that says why, which the node sends back before it hangs up.

A peer must train the same task with the same algorithm parameters and payload spec, be
who its frames say it is (and, under mutual TLS, who its certificate names), and not claim
this node's own id. A merge client must match what it gives; it leaves empty what it has
not learnt yet (before it has met a first node).
"""

from __future__ import annotations

from dataclasses import dataclass

from gossipnode.messages import CLIENT, Challenge, Hello, Message, TensorSpec
from gossipnode.wire import ProtocolError


@dataclass(frozen=True, slots=True)
class Ours:
    """What a Hello is checked against: this node."""

    node_id: int
    task: str
    algorithm: str
    signature: str  # the algorithm's parameters both ends must share
    spec: tuple[TensorSpec, ...]  # of the gossip payload, for peers
    model_spec: tuple[TensorSpec, ...]  # of the flat model, for merge clients


def check_hello(
    msg: Message, ours: Ours, *, sender: int | None, identity: str | None, client_ok: bool
) -> Hello:
    """``msg`` if it is an acceptable Hello from the connection's ``sender`` (its frames'
    id), whose TLS certificate, if any, names ``identity``."""
    if isinstance(msg, Challenge):
        raise ProtocolError("the peer authenticates with a cluster key; this node has none")
    if not isinstance(msg, Hello):
        raise ProtocolError(f"expected Hello, got {type(msg).__name__}")
    if msg.node_id != sender:
        raise ProtocolError(f"Hello of node {msg.node_id} sent as node {sender}")
    if msg.role == CLIENT:
        if not client_ok:
            raise ProtocolError("expected a node, got a merge client")
        _check_agreement(msg, ours, ours.model_spec, unknown_ok=True)
        return msg
    if identity is not None and identity != f"node-{msg.node_id}":
        raise ProtocolError(f"node {msg.node_id} shows the certificate of {identity!r}")
    if msg.node_id == ours.node_id:
        raise ProtocolError(f"peer claims this node's own id {msg.node_id}")
    _check_agreement(msg, ours, ours.spec)
    return msg


def _check_agreement(
    msg: Hello, ours: Ours, spec: tuple[TensorSpec, ...], *, unknown_ok: bool = False
) -> None:
    """Refuse a Hello for another task, signature or spec (``unknown_ok``: unless empty)."""
    if msg.task != ours.task and not (unknown_ok and not msg.task):
        raise ProtocolError(f"peer trains task {msg.task!r}; this node trains {ours.task!r}")
    if msg.signature != ours.signature and not (unknown_ok and not msg.signature):
        raise ProtocolError(
            f"peer runs {ours.algorithm} with {msg.signature or 'no parameters'}; "
            f"this node with {ours.signature or 'no parameters'}"
        )
    if msg.payload_spec != spec and not (unknown_ok and not msg.payload_spec):
        theirs = ", ".join(map(str, msg.payload_spec))
        mine = ", ".join(map(str, spec))
        raise ProtocolError(f"peer's payload is {theirs}; this node's is {mine}")
