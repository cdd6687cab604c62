"""Mixing rules for deep models: MoNNA, variance-corrected averaging, DFedSAM/-MGS. Pure.

All three mix with a neighbour cache (``cache``): an exchange only delivers each end's latest
model into the other's cache, and the node mixes when its own trigger fires. Specifications,
with sources: ``reference/mixing.md`` sections 2 (MoNNA), 3 (variance correction) and 4
(DFedSAM). Counters live in the state as 0-d float64 tensors, so the state is tensors only.

Each rule also says how it ``aggregate``s a pivot with received models: that is the defence a
Byzantine evaluator's line search attacks (``byzantine``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from gossipnode import cache
from gossipnode.cache import Entry, State
from gossipnode.wire import Payload

Segments = tuple[tuple[int, int], ...]  # [start, end) of tensors inside the flat model


def nna(pivot: torch.Tensor, received: Sequence[torch.Tensor], drop: int) -> torch.Tensor:
    """Nearest-neighbour averaging: the mean of ``pivot`` and ``received`` without the
    ``drop`` received vectors farthest from ``pivot`` (Euclidean, whole flat vectors)."""
    if not received:
        return pivot
    keep = len(received) - min(drop, len(received))
    distances = torch.stack([torch.dist(v, pivot) for v in received])
    nearest = torch.argsort(distances, stable=True)[:keep].tolist()
    total = pivot.clone()
    for i in nearest:
        total += received[i]
    return total / (keep + 1)


def rescale_variance(
    out: torch.Tensor, segments: Segments, targets: Sequence[float], eps: float = 1e-12
) -> torch.Tensor:
    """Each segment of ``out`` scaled around its own mean to the variance ``targets[i]``."""
    for (start, end), target in zip(segments, targets, strict=True):
        part = out[start:end]
        mean, var = part.mean(), part.var(unbiased=False)
        part.sub_(mean).mul_(math.sqrt((target + eps) / (float(var) + eps))).add_(mean)
    return out


def variances(x: torch.Tensor, segments: Segments) -> list[float]:
    return [float(x[s:e].var(unbiased=False)) for s, e in segments]


def _count(state: State, key: str) -> float:
    return float(state[key])


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


class _Cached:
    """What the cache rules share: the payload, the exchange (fill the cache), the edge reset.

    Subclasses keep the node's model in ``x``, its version in ``v`` (bumped by every change
    of what ``sent`` shows) and a hash of its initial model in ``init``.
    """

    degree: int

    def _start(self, params: torch.Tensor) -> State:
        return {"x": params.clone(), "v": _scalar(0), "init": _scalar(cache.init_id(params))}

    def params(self, state: State, now: float) -> torch.Tensor:
        return state["x"]

    def _shown(self, state: State) -> torch.Tensor:
        return state["x"]

    def payload(self, state: State, now: float) -> Payload:
        info = cache.card(_count(state, "v"), _count(state, "init"), self.degree)
        return (self._shown(state), info)

    def mix(self, state: State, sent: Payload, received: Payload, now: float, peer: int) -> State:
        return cache.store(state, peer, received, now)

    def reset_edge(self, state: State, peer: int, now: float) -> State:
        return cache.forget(state, peer)

    def with_params(self, state: State, params: torch.Tensor) -> State:
        """``state`` with its model replaced (an all-reduce, a model pulled at a join)."""
        return {**state, "x": params.clone(), "v": state["v"] + 1}


@dataclass(frozen=True, slots=True)
class Monna(_Cached):
    """MoNNA (Farhadkhani et al., ICML 2023): local Polyak momentum, half-step sent, and
    nearest-neighbour averaging around the node's own half-step dropping the ``budget``
    farthest received models. ``budget`` 0 is plain averaging (the undefended baseline)."""

    name: ClassVar[str] = "monna"
    signature: ClassVar[str] = ""
    lr: float  # gamma_0 of gamma_t = gamma_0 / (1 + floor(t / decay_every))
    budget: int  # b: received models dropped per mix
    max_age: float  # seconds a cached model counts
    degree: int
    momentum: float = 0.99  # beta of the dampened EMA m = beta m + (1 - beta) g
    decay_every: int = 50
    weight_decay: float = 1e-4  # the L2 penalty of the paper's setup

    @property
    def min_entries(self) -> int:
        return 2 * self.budget + 1  # NNA needs 2b < |R|, own model included

    def init(self, params: torch.Tensor) -> State:
        state = self._start(params)
        return {**state, "m": torch.zeros_like(params), "h": state["x"]}

    def _shown(self, state: State) -> torch.Tensor:
        return state["h"]  # the half-step model; momentum never leaves the node

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        x, t = state["x"], _count(state, "v")
        grad.add_(x, alpha=self.weight_decay)
        m = torch.lerp(grad, state["m"], self.momentum)  # beta m + (1 - beta) g
        half = torch.add(x, m, alpha=-self.lr / (1 + t // self.decay_every))
        received = cache.usable(state, now, self.max_age, fresh_only=False)
        mixed = half
        if len(received) + 1 >= self.min_entries:
            mixed = self.aggregate(half, [e.model for e in received])
        return {**state, "x": mixed, "m": m, "h": half, "v": _scalar(t + 1)}

    def aggregate(self, pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
        return nna(pivot, received, self.budget)


@dataclass(frozen=True, slots=True)
class VarianceCorrected(_Cached):
    """Variance-corrected averaging (Tian et al. 2024): blend the model with the mean of the
    models received since the last mix, then rescale every weight tensor (dim >= 2) around its
    mean to the received models' variance, undoing the shrinkage of averaging uncorrelated
    models. ``target``: "others" (the mean of the received variances, the paper's), "median"
    (robust to one inflated variance) or "clipped" (others, within [0.5, 2] x own)."""

    name: ClassVar[str] = "variance-corrected"
    signature: ClassVar[str] = ""
    lr: float
    segments: Segments  # the weight tensors (dim >= 2) of the flat model
    max_age: float
    degree: int
    blend: float = 0.5  # weight of the node's own model
    target: str = "others"
    min_entries: int = 2  # received models before a mix
    correct: bool = True  # False: plain blended averaging (the baseline)

    def init(self, params: torch.Tensor) -> State:
        return self._start(params)

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        x = torch.add(state["x"], grad, alpha=-self.lr, out=grad)
        state = {**state, "x": x, "v": state["v"] + 1}
        fresh = cache.usable(state, now, self.max_age, fresh_only=True)
        if len(fresh) < self.min_entries:
            return state
        mixed = self.aggregate(x, [e.model for e in fresh])
        return {**cache.mark_used(state, fresh), "x": mixed}

    def aggregate(self, pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
        mean = torch.stack(list(received)).mean(0)
        out = torch.lerp(mean, pivot, self.blend)
        if not self.correct:
            return out
        return rescale_variance(out, self.segments, self._targets(pivot, received))

    def _targets(self, own: torch.Tensor, received: Sequence[torch.Tensor]) -> list[float]:
        per_model = torch.tensor(
            [variances(m, self.segments) for m in received], dtype=torch.float64
        )  # (k, T)
        if self.target == "median":  # the midpoint of the middle two for an even count
            return list(per_model.quantile(0.5, dim=0).tolist())
        targets: list[float] = per_model.mean(0).tolist()
        if self.target == "clipped":
            mine = variances(own, self.segments)
            return [min(max(t, 0.5 * v), 2 * v) for t, v in zip(targets, mine, strict=True)]
        return list(targets)


@dataclass(frozen=True, slots=True)
class DFedSam(_Cached):
    """DFedSAM / DFedSAM-MGS (Shi et al., ICML 2023): K local steps of SAM (the node's learner
    computes the sharpness-aware gradient), then Q mixes with Metropolis-Hastings weights,
    each with neighbour models newer than the ones the previous mix used (MGS is Q mixes with
    fresh states, never Q re-mixes of the same copies). Training goes on during the mixes."""

    name: ClassVar[str] = "dfedsam"
    signature: ClassVar[str] = ""
    lr: float
    local_steps: int  # K
    gossip_steps: int  # Q
    max_age: float
    degree: int

    def init(self, params: torch.Tensor) -> State:
        return {**self._start(params), "k": _scalar(0), "owed": _scalar(0)}

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        x = torch.add(state["x"], grad, alpha=-self.lr, out=grad)
        k = _count(state, "k") + 1
        owed = state["owed"]
        if k >= self.local_steps:  # end of a local phase: Q mixes are due
            k, owed = 0, _scalar(self.gossip_steps)
        return {**state, "x": x, "v": state["v"] + 1, "k": _scalar(k), "owed": owed}

    def mix(self, state: State, sent: Payload, received: Payload, now: float, peer: int) -> State:
        state = cache.store(state, peer, received, now)
        if _count(state, "owed") <= 0:
            return state
        live = cache.usable(state, now, self.max_age, fresh_only=False)
        if not live or not all(e.fresh for e in live):
            return state  # wait until every live neighbour has shown a newer model
        mixed = self._metropolis(state["x"], live)
        return {
            **cache.mark_used(state, live),
            "x": mixed,
            "v": state["v"] + 1,
            "owed": state["owed"] - 1,
        }

    def _metropolis(self, x: torch.Tensor, live: list[Entry]) -> torch.Tensor:
        # x_i + sum_j w_ij (x_j - x_i), w_ij = 1 / (1 + max(deg_i, deg_j)); a neighbour with
        # no fresh model leaves its weight with the node.
        out = x.clone()
        for e in live:
            out.add_(e.model - x, alpha=1 / (1 + max(self.degree, e.degree)))
        return out

    def aggregate(self, pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
        w = 1 / (1 + self.degree)
        return pivot + sum((m - pivot for m in received), torch.zeros_like(pivot)) * w
