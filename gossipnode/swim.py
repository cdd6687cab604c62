"""The trio side of membership: probing, syncing and answering (``membership`` decides).

Every ``probe_interval`` (stretched while this node is unhealthy) the node pings the next
live member; with no ack within half an interval it asks up to ``indirect`` others to ping
it (PingReq) and waits to the end of the interval; if none got an ack, the member becomes
suspect. Every ``sync_every`` seconds it swaps full state with a live member, and also with
a seed or a dead member: that is how it joins through one seed, and how both sides of a
healed partition learn of each other again (each hears that it was declared dead, refutes,
and comes back).

Probes run over their own authenticated connections, one request at a time each, apart from
the gossip connections, so a model in flight never delays a ping. Gradients are computed in
worker threads, so a node busy training still answers in time.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from gossipnode.connection import Connection, RemoteError
from gossipnode.membership import Membership, Status, Update
from gossipnode.messages import Ack, Message, Ping, PingReq, Sync
from gossipnode.transport import Address, TransportError
from gossipnode.wire import ProtocolError

log = logging.getLogger("gossipnode.swim")

Dial = Callable[[Address], Awaitable[Connection]]  # an authenticated peer connection
KEEP = 8  # probe connections kept open between requests


@dataclass(eq=False)
class Swim:
    view: Membership
    dial: Dial
    rng: random.Random
    seeds: Sequence[Address] = ()
    indirect: int = 3  # members asked to probe a silent one
    sync_every: float = 10.0  # seconds between full-state syncs
    on_change: Callable[[], None] = lambda: None  # the view changed (neighbours may follow)
    _conns: dict[Address, Connection] = field(default_factory=dict, init=False)
    _locks: dict[Address, trio.Lock] = field(default_factory=dict, init=False)
    _probe_ids: int = field(default=0, init=False)

    @property
    def interval(self) -> float:
        return self.view.probe_interval * self.view.stretch()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_loop)
            nursery.start_soon(self._sync_loop)

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            await conn.aclose()
        self._conns.clear()

    async def leave(self, seconds: float = 1.0) -> None:
        """Tell a few live members this node is leaving (dead at its incarnation), so the
        cluster need not find out by probing; a later start refutes it."""
        me = self.view.myself()
        farewell = Ping(
            self._next_id(), (Update(me.node, me.address, me.incarnation, Status.DEAD),)
        )
        live = self.view.live()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for member in self.rng.sample(live, min(self.indirect, len(live))):
                    address = Address.parse(member.address)
                    nursery.start_soon(self._request, address, farewell, seconds)

    async def join(self) -> bool:
        """Sync with the seeds, one after another, until one answers; whether one did."""
        for seed in self.rng.sample(list(self.seeds), len(self.seeds)):
            if await self.sync(seed):
                return True
        return False

    # ------------------------------------------------------------------ answering

    async def answer(self, msg: Ping | PingReq | Sync) -> Message:
        """The reply to a membership request from a peer."""
        now = trio.current_time()
        match msg:
            case Ping(probe_id, updates):
                self._learn(updates, now)
                return Ack(probe_id, True, tuple(self.view.piggyback()))
            case PingReq(probe_id, _, address, updates):
                target = _address(address)
                self._learn(updates, now)
                ok = await self.ping(target, self.view.probe_interval)
                return Ack(probe_id, ok, tuple(self.view.piggyback()))
            case Sync(updates):
                self._learn(updates, now)
                return Sync(tuple(self.view.full_state()))

    # ------------------------------------------------------------------ asking

    async def ping(self, address: Address, seconds: float) -> bool:
        reply = await self._request(address, Ping(self._next_id(), self._news()), seconds)
        return isinstance(reply, Ack)

    async def sync(self, address: Address) -> bool:
        full = Sync(tuple(self.view.full_state()))
        reply = await self._request(address, full, 2 * self.view.probe_interval + 5.0)
        return isinstance(reply, Sync)

    async def _ping_via(
        self, helper: Address, target: int, address: str, seconds: float
    ) -> bool | None:
        """Whether ``helper`` reached ``target``; None if the helper did not answer."""
        req = PingReq(self._next_id(), target, address, self._news())
        reply = await self._request(helper, req, seconds)
        return reply.ok if isinstance(reply, Ack) else None

    async def _request(self, address: Address, msg: Message, seconds: float) -> Message | None:
        """``msg``'s answer from ``address`` within ``seconds`` (updates taken in), or None.
        One request at a time per connection; a failed one is closed and dialed anew next time."""
        lock = self._locks.setdefault(address, trio.Lock())
        async with lock:
            conn = self._conns.get(address)
            try:
                with trio.fail_after(seconds):
                    if conn is None:
                        conn = self._conns[address] = await self.dial(address)
                        await self._forget_idle()
                    await conn.send(msg)
                    reply = await conn.receive()
                if not isinstance(reply, Ack | Sync):
                    raise ProtocolError(f"unexpected {type(reply).__name__}")
                self._learn(reply.updates, trio.current_time())
                return reply
            except (trio.TooSlowError, TransportError, ProtocolError, RemoteError) as exc:
                log.debug("membership: %s to %s failed: %s", type(msg).__name__, address, exc)
                await self._drop(address)
                return None

    async def _forget_idle(self) -> None:
        """Keep at most ``KEEP`` probe connections open (the oldest idle ones go): each is an
        inbound connection at the other end, and probing visits every member in turn."""
        idle = [a for a in self._conns if not self._locks[a].locked()]
        for address in idle[: max(0, len(self._conns) - KEEP)]:
            await self._drop(address)

    async def _drop(self, address: Address) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            await conn.aclose()

    # ------------------------------------------------------------------ loops

    async def _probe_loop(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self._expire()
            target = self.view.next_probe(self.rng)
            if target is not None:
                await self._probe(target.node, target.address)

    async def _probe(self, node: int, address: str) -> None:
        interval = self.interval
        if await self.ping(Address.parse(address), interval / 2):
            self.view.healthier()
            return
        helpers = self.view.helpers(node, self.indirect, self.rng)
        answers: list[bool | None] = []
        async with trio.open_nursery() as nursery:

            async def through(helper: Address) -> None:
                answers.append(await self._ping_via(helper, node, address, interval / 2))
                if answers[-1]:
                    nursery.cancel_scope.cancel()

            for h in helpers:
                nursery.start_soon(through, Address.parse(h.address))
        if any(answers):
            return
        if helpers and all(a is None for a in answers):
            self.view.sicker()  # nobody answered us at all: we may be the problem
        was = self.view.status_of(node)
        self.view.probe_failed(node, trio.current_time())
        if was == Status.ALIVE:
            log.warning(
                "node %d: member %d at %s does not answer: suspect", self.view.me, node, address
            )
            self.on_change()

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(self.sync_every * self.rng.uniform(0.5, 1.5))
            live = self.view.live()
            if live:
                await self.sync(Address.parse(self.rng.choice(live).address))
            # Reach out beyond the live view too: to heal a partition, or to join at all.
            lost = [Address.parse(m.address) for m in self.view.dead()] + list(self.seeds)
            known = {m.address for m in live}
            lost = [a for a in lost if str(a) not in known and str(a) != self.view.address]
            if lost:
                await self.sync(self.rng.choice(lost))

    # ------------------------------------------------------------------ helpers

    def _learn(self, updates: Sequence[Update], now: float) -> None:
        """Take in a peer's news; ProtocolError, and nothing taken, if an address is bad."""
        for u in updates:
            _address(u.address)
        incarnation = self.view.incarnation
        changed = self.view.apply_all(updates, now)
        if self.view.incarnation != incarnation:
            log.warning(
                "node %d: reported suspect or dead; refuting as incarnation %d",
                self.view.me,
                self.view.incarnation,
            )
        for u in changed:
            level = logging.INFO if u.status == Status.ALIVE else logging.WARNING
            log.log(
                level,
                "node %d: member %d at %s is %s (incarnation %d)",
                self.view.me,
                u.node,
                u.address,
                u.status.value,
                u.incarnation,
            )
        if changed:
            self.on_change()

    def _expire(self) -> None:
        for node in self.view.expire(trio.current_time()):
            log.warning("node %d: member %d is dead: no refutation in time", self.view.me, node)
            self.on_change()

    def _news(self) -> tuple[Update, ...]:
        return tuple(self.view.piggyback())

    def _next_id(self) -> int:
        self._probe_ids += 1
        return self._probe_ids


def _address(text: str) -> Address:
    """A member's address as a peer gave it; ProtocolError if it is not host:port."""
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise ProtocolError(f"bad member address: {exc}") from None
