"""Byzantine behaviours for evaluation: what a misbehaving node sends instead of its payload.

A behaviour maps the payload a node would send to the one it does send; the node applies it to
every payload it sends (requests and replies) and mixes honestly itself. Pure functions; the
random ones draw from the generator they are given.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from gossipnode.wire import Payload

Behaviour = Callable[[Payload, random.Random], Payload]


def sign_flip(payload: Payload, rng: random.Random) -> Payload:
    """Send the negated payload."""
    return tuple(-t for t in payload)


def noise(payload: Payload, rng: random.Random) -> Payload:
    """Send the payload plus standard Gaussian noise."""
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return tuple(t + torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in payload)


BEHAVIOURS: dict[str, Behaviour] = {"sign-flip": sign_flip, "noise": noise}
