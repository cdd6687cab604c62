"""Update rules as pure tensor math: no I/O, no clocks, no randomness of their own.

An ``Algorithm`` turns (state, gradient) into a new state and (state, the payload it sent, the
payload a neighbour sent back) into a new state. State is a dict of named tensors, so it can
be checkpointed as it is. Updates work in place on the state's tensors and return the state:
models can be 100 MB, and a copy per event would cost more than the update.

Both ends of an exchange call ``mix`` with the same pair of payloads (each its own as
``sent``), which is what lets a rule conserve a sum across nodes even when the state moved
while the exchange was in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

State = dict[str, torch.Tensor]
Payload = tuple[torch.Tensor, ...]


class Algorithm(Protocol):
    @property
    def name(self) -> str:
        """Both ends of an exchange must run the same algorithm; peers compare names."""
        ...

    def init(self, params: torch.Tensor) -> State:
        """The state for a node whose model starts at ``params`` (flat)."""
        ...

    def params(self, state: State) -> torch.Tensor:
        """The model parameters (flat) to compute gradients at and to evaluate."""
        ...

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        """A local step with the gradient of the loss, taken at ``params(state)``."""
        ...

    def payload(self, state: State, now: float) -> Payload:
        """What to send a neighbour: new tensors, not views of the state."""
        ...

    def mix(self, state: State, sent: Payload, received: Payload, now: float) -> State:
        """Apply an exchange in which this node sent ``sent`` and got ``received``."""
        ...


@dataclass(frozen=True, slots=True)
class Gossip:
    """Local SGD plus pairwise gossip averaging of the parameters (asynchronous D-SGD)."""

    name: ClassVar[str] = "gossip"
    lr: float

    def init(self, params: torch.Tensor) -> State:
        return {"x": params.clone()}

    def params(self, state: State) -> torch.Tensor:
        return state["x"]

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        state["x"].add_(grad, alpha=-self.lr)
        return state

    def payload(self, state: State, now: float) -> Payload:
        return (state["x"].clone(),)

    def mix(self, state: State, sent: Payload, received: Payload, now: float) -> State:
        # x += (x_j - x_i) / 2 with the exchanged pair: if neither end moved meanwhile, both
        # land on the average; either way the sum over nodes is unchanged.
        state["x"].add_(received[0], alpha=0.5).sub_(sent[0], alpha=0.5)
        return state


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {"gossip": Gossip}


def make_algorithm(name: str, *, lr: float) -> Algorithm:
    """The algorithm called ``name``. Raises ValueError naming the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](lr=lr)
