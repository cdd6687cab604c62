"""The neighbour cache of the deep-model mixing rules: the latest payload of each neighbour.

Rules such as MoNNA and variance-corrected averaging do not average on the exchange itself:
an exchange only delivers each end's latest model into the other's cache, and the node mixes
with what its cache holds when its own trigger fires (a local step, or a gossip phase). One
slot per neighbour id (the id proven at the handshake), so a neighbour never gets more than
one vote per mix however often it sends.

The cache lives in the algorithm's state, as tensors like the rest of it (it is checkpointed
with it): slot ``c/<peer>`` holds the model, ``cm/<peer>`` what is known of it,
[version, init id, degree, received at, version last used]. Memory is degree x model size.

Payloads of these rules are ``(model, card)`` where the card is float64 [version, init id,
degree]: the sender's version (it grows with every change of its model), a hash of its
initial model, and its number of neighbours (for Metropolis-Hastings weights).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from gossipnode.wire import Payload

State = dict[str, torch.Tensor]

_SLOT, _META = "c/", "cm/"
_VERSION, _INIT, _DEGREE, _RECEIVED, _USED = range(5)


@dataclass(frozen=True, slots=True)
class Entry:
    """One neighbour's latest model, as cached."""

    peer: int
    model: torch.Tensor
    version: float
    init_id: float
    degree: float
    received: float  # the receiver's clock
    used: float  # the version the last mix used (-1: none)

    @property
    def fresh(self) -> bool:
        """Not used by a mix yet."""
        return self.version > self.used


def init_id(params: torch.Tensor) -> float:
    """A 48-bit hash of an initial model (exact in float64): equal for a shared init."""
    digest = hashlib.blake2b(params.detach().contiguous().numpy().tobytes(), digest_size=6)
    return float(int.from_bytes(digest.digest(), "big"))


def card(version: float, init: float, degree: float) -> torch.Tensor:
    return torch.tensor([version, init, degree], dtype=torch.float64)


def store(state: State, peer: int, received: Payload, now: float) -> State:
    """``state`` with ``received`` (a neighbour's (model, card)) in the neighbour's slot,
    unless the slot already holds that version or a newer one."""
    model, info = received
    meta = state.get(_META + str(peer))
    if meta is not None and float(info[_VERSION]) <= float(meta[_VERSION]):
        return state
    used = float(meta[_USED]) if meta is not None else -1.0
    new = dict(state)
    new[_SLOT + str(peer)] = model
    new[_META + str(peer)] = torch.tensor(
        [float(info[_VERSION]), float(info[_INIT]), float(info[_DEGREE]), now, used],
        dtype=torch.float64,
    )
    return new


def entries(state: State) -> list[Entry]:
    """Every cached neighbour, by peer id."""
    out = []
    for key, meta in state.items():
        if key.startswith(_META):
            peer = int(key[len(_META) :])
            v, init, degree, received, used = (float(x) for x in meta)
            out.append(Entry(peer, state[_SLOT + str(peer)], v, init, degree, received, used))
    return sorted(out, key=lambda e: e.peer)


def usable(state: State, now: float, max_age: float, *, fresh_only: bool) -> list[Entry]:
    """The entries received within ``max_age`` of ``now`` (and not used yet, if fresh_only)."""
    return [
        e for e in entries(state) if now - e.received <= max_age and (e.fresh or not fresh_only)
    ]


def mark_used(state: State, used: list[Entry]) -> State:
    """``state`` with these entries marked as used by a mix."""
    new = dict(state)
    for e in used:
        meta = new[_META + str(e.peer)].clone()
        meta[_USED] = e.version
        new[_META + str(e.peer)] = meta
    return new


def forget(state: State, peer: int) -> State:
    """``state`` without ``peer``'s slot (it restarted: its versions start again)."""
    return {k: v for k, v in state.items() if k not in (_SLOT + str(peer), _META + str(peer))}


def without_cache(state: State) -> State:
    """The node's own part of the state."""
    return {k: v for k, v in state.items() if not k.startswith((_SLOT, _META))}
