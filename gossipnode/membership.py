"""Who is in the cluster, as one node believes: SWIM with suspicion and refutation. Pure.

Each member has an advertised address, an incarnation (only the member itself raises it) and
a status. What one node learns it passes on as ``Update``s, piggybacked on its probes and
their acks a bounded number of times, plus full-state syncs now and then (joins, healing
partitions). An update wins over what is known when (SWIM's precedence):

* ``alive`` at incarnation i   beats  alive or suspect at < i;
* ``suspect`` at i             beats  alive at <= i and suspect at < i;
* ``dead`` at i                beats  alive or suspect at <= i;
* only ``alive`` at > i brings back a member dead at i.

A member that hears it is suspected or dead at its incarnation refutes: it raises its
incarnation and spreads ``alive`` (so a restarted node, even one declared dead, comes back
by announcing a higher incarnation). A probe that goes unanswered, directly and through
others, makes the target ``suspect``; if no refutation comes within the suspicion timeout,
``dead``. Like Lifeguard, a node that is likely the slow one itself (
busy training, say) stretches its probe timing: when not even the members it asks to help
answer, or when it has to refute a suspicion of itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Status(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Update:
    """What is said about one member."""

    node: int
    address: str  # where the member says it can be reached (host:port)
    incarnation: int
    status: Status


@dataclass(slots=True)
class Member:
    node: int
    address: str
    incarnation: int
    status: Status
    since: float  # when the status last changed (suspicion timeouts run from here)

    @property
    def live(self) -> bool:
        return self.status != Status.DEAD

    def update(self) -> Update:
        return Update(self.node, self.address, self.incarnation, self.status)


MAX_HEALTH = 8  # Lifeguard's awareness: timing stretches up to (1 + 8)x


@dataclass
class Membership:
    me: int
    address: str
    probe_interval: float = 1.0
    suspicion_mult: float = 4.0  # suspicion timeout: mult * log10(n + 1) * interval (>= 1)
    retransmit_mult: int = 4  # each update is piggybacked mult * ceil(log10(n + 1)) times
    incarnation: int = 0
    members: dict[int, Member] = field(default_factory=dict)  # everyone but this node
    health: int = 0  # 0 = fine; each failed own probe or refutation adds one
    _queue: dict[int, tuple[Update, int]] = field(default_factory=dict)  # node -> (update, left)
    _probe_order: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ learning

    def apply(self, update: Update, now: float) -> bool:
        """Take in what someone said; whether it changed this node's view (then it is
        passed on)."""
        if update.node == self.me:
            self._about_me(update)
            return False
        known = self.members.get(update.node)
        if known is not None and not _beats(update, known):
            return False
        status_changed = known is None or known.status != update.status
        if known is None:
            self.members[update.node] = Member(
                update.node, update.address, update.incarnation, update.status, now
            )
        else:
            known.address, known.incarnation, known.status = (
                update.address,
                update.incarnation,
                update.status,
            )
            if status_changed:
                known.since = now
        self._spread(update)
        return True

    def apply_all(self, updates: Iterable[Update], now: float) -> list[Update]:
        """``apply`` each; the ones that changed something."""
        return [u for u in updates if self.apply(u, now)]

    def _about_me(self, update: Update) -> None:
        if update.status != Status.ALIVE and update.incarnation >= self.incarnation:
            self.incarnation = update.incarnation + 1  # refute: "I am alive, and newer"
            self.health = min(MAX_HEALTH, self.health + 1)
            self._spread(self.myself())

    # ------------------------------------------------------------------ probing outcomes

    def healthier(self) -> None:
        """A probe of ours was answered: our own messages get through."""
        self.health = max(0, self.health - 1)

    def sicker(self) -> None:
        """Not even the members asked to help answered: the slow one is likely us."""
        self.health = min(MAX_HEALTH, self.health + 1)

    def probe_failed(self, node: int, now: float) -> None:
        """No ack, directly or through others: suspect ``node``."""
        known = self.members.get(node)
        if known is not None and known.status == Status.ALIVE:
            self.apply(Update(node, known.address, known.incarnation, Status.SUSPECT), now)

    def expire(self, now: float) -> list[int]:
        """Declare dead the suspects whose suspicion timed out; their ids."""
        timeout = self.suspicion_timeout()
        dead = [
            m
            for m in self.members.values()
            if m.status == Status.SUSPECT and now - m.since >= timeout
        ]
        for m in dead:
            self.apply(Update(m.node, m.address, m.incarnation, Status.DEAD), now)
        return [m.node for m in dead]

    # ------------------------------------------------------------------ what to say

    def myself(self) -> Update:
        return Update(self.me, self.address, self.incarnation, Status.ALIVE)

    def full_state(self) -> list[Update]:
        return [self.myself(), *(m.update() for m in self.members.values())]

    def piggyback(self, limit: int = 8) -> list[Update]:
        """Up to ``limit`` recent updates to attach to a message, the least sent first."""
        chosen = sorted(self._queue.items(), key=lambda item: -item[1][1])[:limit]
        for node, (update, left) in chosen:
            if left <= 1:
                del self._queue[node]
            else:
                self._queue[node] = (update, left - 1)
        return [update for _, (update, _) in chosen]

    def _spread(self, update: Update) -> None:
        self._queue[update.node] = (update, self._retransmits())

    # ------------------------------------------------------------------ timing and choice

    def size(self) -> int:
        """Members believed live, this node included."""
        return 1 + sum(m.live for m in self.members.values())

    def _retransmits(self) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(self.size() + 1)))

    def suspicion_timeout(self) -> float:
        scale = max(1.0, math.log10(self.size() + 1))
        return self.suspicion_mult * scale * self.probe_interval

    def stretch(self) -> float:
        """How much slower than nominal to probe, from this node's own health."""
        return 1.0 + self.health

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.live]

    def dead(self) -> list[Member]:
        return [m for m in self.members.values() if not m.live]

    def next_probe(self, rng: random.Random) -> Member | None:
        """The next live member to probe: each once per round, in a fresh random order."""
        while True:
            if not self._probe_order:
                self._probe_order = [m.node for m in self.live()]
                rng.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            member = self.members.get(self._probe_order.pop())
            if member is not None and member.live:
                return member

    def helpers(self, target: int, k: int, rng: random.Random) -> list[Member]:
        """Up to ``k`` live members (not ``target``) to probe ``target`` for us."""
        others = [m for m in self.live() if m.node != target and m.status == Status.ALIVE]
        return rng.sample(others, min(k, len(others)))

    def status_of(self, node: int | None = None, address: str | None = None) -> Status | None:
        """What is known of a member by id, else by address; None if nothing."""
        if node is not None and node in self.members:
            return self.members[node].status
        if address is not None:
            for m in self.members.values():
                if m.address == address:
                    return m.status
        return None


def _beats(new: Update, old: Member) -> bool:
    if old.status == Status.DEAD:  # only the member itself, newer, brings it back
        return new.status == Status.ALIVE and new.incarnation > old.incarnation
    match new.status:
        case Status.ALIVE:
            return new.incarnation > old.incarnation
        case Status.SUSPECT:
            if old.status == Status.ALIVE:
                return new.incarnation >= old.incarnation
            return new.incarnation > old.incarnation
        case Status.DEAD:
            return new.incarnation >= old.incarnation
