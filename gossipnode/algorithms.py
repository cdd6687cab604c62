"""Update rules as pure functions on tensors: no I/O, no clocks, no randomness of their own.

An ``Algorithm`` maps (state, gradient) to a new state, and (state, the payload it sent, the
payload a neighbour sent back) to a new state. A state is a dict of named tensors, so it can
be checkpointed as it is.

State tensors are values: an update returns new tensors and never writes into one the state
holds. So a payload, or a snapshot for a gradient thread, can share the state's memory at no
cost, and stays valid however the state moves on. What an update may write into is what it
is handed: the gradient and the received payload belong to the algorithm once passed in,
which is how a 100 MB model is updated without allocating or copying 100 MB.

Both ends of an exchange apply the same pair of payloads, each its own as ``sent``. That is
what lets a rule conserve a sum across nodes even when the initiator's state moved while the
exchange was in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from gossipnode.wire import Payload

State = dict[str, torch.Tensor]


class Algorithm(Protocol):
    @property
    def name(self) -> str:
        """Both ends of an exchange must run the same algorithm; peers compare names."""
        ...

    @property
    def signature(self) -> str:
        """The parameters both ends must agree on ("" if none); compared at the handshake."""
        ...

    def init(self, params: torch.Tensor) -> State:
        """The state for a node whose model starts at ``params`` (flat)."""
        ...

    def params(self, state: State, now: float) -> torch.Tensor:
        """The model parameters (flat) at time ``now``: to compute gradients at, to evaluate."""
        ...

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        """A local step with the gradient of the loss, taken at ``params(state, ...)``."""
        ...

    def payload(self, state: State, now: float) -> Payload:
        """What to send a neighbour."""
        ...

    def mix(self, state: State, sent: Payload, received: Payload, now: float, peer: int) -> State:
        """Apply an exchange with neighbour ``peer`` in which this node sent ``sent`` and got
        ``received``."""
        ...

    def reset_edge(self, state: State, peer: int, now: float) -> State:
        """Neighbour ``peer`` restarted with fresh state: drop what the edge to it carries."""
        ...


@dataclass(frozen=True, slots=True)
class Gossip:
    """Local SGD plus pairwise gossip averaging of the parameters (asynchronous D-SGD).

    With ``momentum`` > 0 the local steps use heavy-ball momentum (m = beta m + g, x -= lr m,
    as torch's SGD), kept local and never averaged (DFedAvgM-style)."""

    name: ClassVar[str] = "gossip"
    signature: ClassVar[str] = ""
    lr: float
    momentum: float = 0.0

    def init(self, params: torch.Tensor) -> State:
        state = {"x": params.clone()}
        if self.momentum:
            state["m"] = torch.zeros_like(params)
        return state

    def params(self, state: State, now: float) -> torch.Tensor:
        return state["x"]

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        if not self.momentum:
            return {"x": torch.add(state["x"], grad, alpha=-self.lr, out=grad)}
        m = torch.add(grad, state["m"], alpha=self.momentum, out=grad)
        return {"x": torch.add(state["x"], m, alpha=-self.lr), "m": m}

    def payload(self, state: State, now: float) -> Payload:
        return (state["x"],)

    def mix(self, state: State, sent: Payload, received: Payload, now: float, peer: int) -> State:
        x, (own,), (other,) = state["x"], sent, received
        if x is own:  # unchanged since sent (state tensors are never written): the average
            return {**state, "x": torch.lerp(x, other, 0.5, out=other)}
        # x moved while the exchange was in flight: add half the pair's difference. Both
        # ends do, so the sum over nodes is unchanged.
        other.sub_(own)
        return {**state, "x": torch.add(x, other, alpha=0.5, out=other)}

    def reset_edge(self, state: State, peer: int, now: float) -> State:
        return state  # averaging keeps nothing per edge

    def with_params(self, state: State, params: torch.Tensor) -> State:
        return {**state, "x": params.clone()}

    def aggregate(self, pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pairwise averaging, once with each received model: the mean of all of them."""
        return torch.stack([pivot, *received]).mean(0)
