"""Who a node agrees to talk with: the Hello checks, one refusal each."""

from __future__ import annotations

import pytest
import torch

from gossipnode.handshake import Ours, check_hello
from gossipnode.messages import CLIENT, Challenge, Fetch, Hello, Message, TensorSpec
from gossipnode.wire import ProtocolError

PAYLOAD = (TensorSpec(torch.float64, (11,)),)
MODEL = (TensorSpec(torch.float32, (11,)),)
OURS = Ours(0, "logreg", "gossip", "lr=0.1", PAYLOAD, MODEL)


def peer(node: int = 3, **changes: object) -> Hello:
    fields: dict[str, object] = {
        "node_id": node,
        "session": 1,
        "task": "logreg",
        "signature": "lr=0.1",
        "payload_spec": PAYLOAD,
    }
    return Hello(**{**fields, **changes})  # type: ignore[arg-type]


def client(**changes: object) -> Hello:
    fields: dict[str, object] = {"node_id": -1, "session": 1, "task": "", "signature": ""}
    return Hello(**{"payload_spec": (), "role": CLIENT, **fields, **changes})  # type: ignore[arg-type]


def test_a_matching_peer_and_a_client_that_knows_nothing_yet_are_accepted() -> None:
    assert check_hello(peer(), OURS, sender=3, identity=None, client_ok=False) == peer()
    assert check_hello(peer(), OURS, sender=3, identity="node-3", client_ok=False) == peer()
    assert check_hello(client(), OURS, sender=-1, identity="client", client_ok=True) == client()
    full = client(task="logreg", signature="lr=0.1", payload_spec=MODEL)
    assert check_hello(full, OURS, sender=-1, identity=None, client_ok=True) == full


@pytest.mark.parametrize(
    ("msg", "sender", "identity", "client_ok", "reason"),
    [
        (Challenge(b"n" * 16), 3, None, False, "authenticates with a cluster key"),
        (Fetch(), 3, None, False, "expected Hello, got Fetch"),
        (peer(), 4, None, False, "Hello of node 3 sent as node 4"),
        (peer(), 3, "node-2", False, "node 3 shows the certificate of 'node-2'"),
        (peer(0), 0, None, False, "claims this node's own id 0"),
        (peer(task="digits"), 3, None, False, "peer trains task 'digits'"),
        (peer(signature="lr=1"), 3, None, False, "peer runs gossip with lr=1"),
        (peer(payload_spec=MODEL), 3, None, False, r"peer's payload is float32\[11\]"),
        (client(), -1, None, False, "expected a node, got a merge client"),
        (client(task="digits"), -1, None, True, "peer trains task 'digits'"),
        (client(payload_spec=PAYLOAD), -1, None, True, r"payload is float64\[11\]"),
    ],
)
def test_every_refusal_says_why(
    msg: Message, sender: int, identity: str | None, client_ok: bool, reason: str
) -> None:
    with pytest.raises(ProtocolError, match=reason):
        check_hello(msg, OURS, sender=sender, identity=identity, client_ok=client_ok)
