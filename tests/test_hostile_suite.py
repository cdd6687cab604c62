"""The hostile-input suite: a live node (a real process) under attack while it gossips with a
good peer. ``scripts/hostile`` runs it (it is slow-marked: minutes, not seconds).

Each attack is bounded in count and time. After each, the invariants: the target is still
running, it went on serving its good peer during the attack, and its memory stayed bounded.
A table of counts (what was sent, what the node counted) is printed at the end.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipnode import auth
from gossipnode.cluster import cluster_key, free_ports, node_command
from gossipnode.credentials import load_key
from gossipnode.messages import Challenge, Hello, Message, Proof, to_frame
from gossipnode.wire import encode_bytes

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RSS_GROWTH_MB = 300  # what the target may grow by over the whole suite (its model is tiny)
ATTACKER = 77  # the node id the attacker claims
OPTIONS = {
    "task": "logreg",
    "grad_rate": 20,
    "gossip_rate": 10,
    "torch_threads": 1,
    "progress_every": 0,
    "handshake_timeout": 2,
    "exchange_timeout": 2,
    "max_connections": 64,
    "probe_interval": 0,  # a pair with static neighbours: the counters are all gossip's
}
ROWS: list[dict[str, Any]] = []


@dataclass
class Target:
    proc: subprocess.Popen[bytes]
    port: int
    metrics: int
    key: bytes
    baseline_rss: float
    hello: dict[str, Any]  # what a member must say in its Hello (learnt as a client)

    def counters(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/status", timeout=5) as r:
            status: dict[str, Any] = json.loads(r.read())
        stats: dict[str, Any] = status["stats"]
        return stats

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    out = tmp_path_factory.mktemp("hostile")
    ports = free_ports(3)
    procs = []
    for i in (0, 1):
        options = {**OPTIONS, "metrics": f"127.0.0.1:{ports[2]}"} if i == 0 else OPTIONS
        cmd = node_command(i, ports[:2], [1 - i], out, options)
        with (out / f"node-{i}.log").open("wb") as log:  # the child keeps its copy
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    try:
        node = Target(procs[0], ports[0], ports[2], load_key(cluster_key(out)), 0.0, {})
        deadline = time.monotonic() + 60
        while True:  # until it serves its good peer
            try:
                if node.counters()["exchanges"]["served"] > 10:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (out / "node-0.log").read_text()[-3000:]
            time.sleep(0.5)
        node.baseline_rss = node.rss_mb()
        node.hello = learn_hello(node)
        yield node
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        print_report()


def print_report() -> None:
    if not ROWS:
        return
    print("\nattack                      sent     rejected  handshake  over-limit  served  RSS MB")
    for r in ROWS:
        print(
            f"{r['attack']:<28}{r['sent']:<9}{r['rejected']:<10}{r['handshake']:<11}"
            f"{r['over_limit']:<12}{r['served']:<8}{r['rss']:.0f}"
        )


def under_attack(target: Target, name: str, attack: Callable[[], int]) -> None:
    """Run ``attack`` (it returns what it sent) and check the invariants around it."""
    before = target.counters()
    started = time.monotonic()
    sent = attack()
    elapsed = time.monotonic() - started
    time.sleep(max(0.0, 2.0 - elapsed))  # at least two seconds of gossip to count
    assert target.proc.poll() is None, f"{name}: the target died"
    after = target.counters()
    served = after["exchanges"]["served"] - before["exchanges"]["served"]
    rss = target.rss_mb()
    ROWS.append(
        {
            "attack": name,
            "sent": sent,
            "rejected": after["exchanges"]["rejected"] - before["exchanges"]["rejected"],
            "handshake": after["handshake_failures"] - before["handshake_failures"],
            "over_limit": after["over_limit"] - before["over_limit"],
            "served": served,
            "rss": rss,
        }
    )
    # The good peer initiates ~5 exchanges a second; at least a few must have been served.
    assert served >= 3, (name, served, elapsed)
    assert rss < target.baseline_rss + RSS_GROWTH_MB, (name, rss, target.baseline_rss)


# ---------------------------------------------------------------------------- wire helpers


def frame(msg: Message, seq: int, sender: int = ATTACKER, alg: str = "gossip") -> bytes:
    fields, tensors = to_frame(msg)
    return encode_bytes({"sender": sender, "seq": seq, "alg": alg, **fields}, tensors)


def connect(target: Target) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", target.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's streams do
    s.settimeout(10)
    return s


def read_frame(s: socket.socket) -> dict[str, Any]:
    (length,) = struct.unpack(">I", recv_exact(s, 4))
    header: dict[str, Any] = msgpack.unpackb(recv_exact(s, length), raw=False)
    return header


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def drain(s: socket.socket) -> None:
    """Read until the node hangs up (it says why first, or just closes)."""
    with s:
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def authenticate(target: Target, sender: int, alg: str) -> socket.socket:
    s = connect(target)
    ours = auth.nonce()
    s.sendall(frame(Challenge(ours), 0, sender, alg))
    theirs = read_frame(s)["nonce"]
    s.sendall(
        frame(Proof(auth.proof(target.key, auth.DIALER, ours, theirs, sender, 0)), 1, sender, alg)
    )
    return s


def learn_hello(target: Target) -> dict[str, Any]:
    """The task, signature and payload spec a member must present, from the node's Hello to a
    merge client (for gossip the payload is the model)."""
    s = authenticate(target, -1, "*")
    with s:
        s.sendall(frame(Hello(-1, 1, "", "", (), role="client"), 2, -1, "*"))
        hello = read_frame(s)
    return {k: hello[k] for k in ("task", "signature", "payload_spec")}


def member(target: Target) -> tuple[socket.socket, int]:
    """A connection that authenticated with the key and said a proper Hello: a Byzantine
    member. Returns it and the next sequence number."""
    s = authenticate(target, ATTACKER, "gossip")
    fields = {"type": "hello", "node_id": ATTACKER, "session": 1, "role": "peer", **target.hello}
    header = {"sender": ATTACKER, "seq": 2, "alg": "gossip", **fields}
    s.sendall(encode_bytes(header, ()))
    answer = read_frame(s)  # as a member does: nothing more until the node's Hello
    assert answer["type"] == "hello", answer
    return s, 3


# ---------------------------------------------------------------------------- attacks


INT64 = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack can carry


@st.composite
def fuzzed(draw: st.DrawFn) -> bytes:
    """A frame with a random header (sometimes a plausible one) and a random body."""
    header = draw(
        st.one_of(
            st.dictionaries(st.text(max_size=8), INT64 | st.text(max_size=8), max_size=6),
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["exchange", "reply", "hello", "ping", "sync", "x"]),
                    "sender": st.integers(-5, 100),
                    "seq": st.integers(0, 5),
                    "alg": st.just("gossip"),
                    "v": st.integers(0, 2),
                    "tensors": st.lists(
                        st.tuples(
                            st.sampled_from(["float32", "float64", "int8", "bogus"]),
                            st.lists(st.integers(-1, 1 << 20), max_size=3),
                            st.integers(0, 1 << 40),
                        ).map(list),
                        max_size=3,
                    ),
                }
            ),
        )
    )
    packed = msgpack.packb(header)
    length = draw(st.one_of(st.just(len(packed)), st.integers(0, 1 << 32 - 1)))
    body = draw(st.binary(max_size=256))
    return struct.pack(">I", min(length, (1 << 32) - 1)) + packed + body


def test_10000_fuzzed_frames_before_and_after_authenticating(target: Target) -> None:
    count = {"sent": 0}

    @settings(
        max_examples=10_000,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=fuzzed(), authenticated=st.booleans())
    def one(data: bytes, authenticated: bool) -> None:
        if authenticated:
            s, _ = member(target)
        else:
            s = connect(target)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it hung up on us already
        drain(s)
        count["sent"] += 1

    def attack() -> int:
        one()
        return count["sent"]

    under_attack(target, "10,000 fuzzed frames", attack)


def test_truncated_frames_and_huge_declared_lengths(target: Target) -> None:
    good = frame(Challenge(auth.nonce()), 0)

    def attack() -> int:
        sent = 0
        for cut in range(1, len(good)):  # every proper prefix of a valid first frame
            s = connect(target)
            s.sendall(good[:cut])
            s.shutdown(socket.SHUT_WR)
            drain(s)
            sent += 1
        for length in (1 << 31, (1 << 32) - 1, 1 << 20, 65 * 1024):
            s = connect(target)
            s.sendall(struct.pack(">I", length) + b"\x80" * 16)
            drain(s)
            sent += 1
        s, seq = member(target)  # a member declaring a 1 TB body
        header = {"type": "exchange", "sender": ATTACKER, "seq": seq, "alg": "gossip", "v": 1}
        header |= {"exchange_id": 1, "tensors": [["float32", [1 << 38], 1 << 40]]}
        packed = msgpack.packb(header)
        s.sendall(struct.pack(">I", len(packed)) + packed)
        drain(s)
        return sent + 1

    under_attack(target, "truncated / huge lengths", attack)


def test_slow_senders_are_cut_off(target: Target) -> None:
    good = frame(Challenge(auth.nonce()), 0)

    def slow(_: int) -> None:
        s = connect(target)
        with s:
            try:
                for byte in good:  # one byte a second: the handshake deadline ends it
                    s.sendall(bytes([byte]))
                    time.sleep(1.0)
            except OSError:
                return
        raise AssertionError("a one-byte-a-second sender was never cut off")

    def attack() -> int:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(slow, range(8)))
        return 8

    under_attack(target, "8 slow senders (1 B/s)", attack)


def test_a_connection_flood_is_capped(target: Target) -> None:
    def attack() -> int:
        flood: list[socket.socket] = []
        try:
            flood.extend(connect(target) for _ in range(500))
            time.sleep(3)  # held open, silent
        finally:
            for s in flood:
                s.close()
        return len(flood)

    under_attack(target, "500 silent connections", attack)
    assert ROWS[-1]["over_limit"] > 0, ROWS[-1]


def test_wrong_keys_and_replayed_handshakes(target: Target) -> None:
    def attack() -> int:
        sent = 0
        for _ in range(100):  # a dialer with another key
            s = connect(target)
            ours = auth.nonce()
            s.sendall(frame(Challenge(ours), 0))
            theirs = read_frame(s)["nonce"]
            wrong = auth.proof(os.urandom(32), auth.DIALER, ours, theirs, ATTACKER, 0)
            s.sendall(frame(Proof(wrong), 1))
            drain(s)
            sent += 1
        for _ in range(100):  # a replay of a real member's proof on a new connection
            s, _ = member(target)
            s.close()
            replay = connect(target)
            ours = b"r" * 16
            replay.sendall(frame(Challenge(ours), 0))
            read_frame(replay)
            old = auth.proof(target.key, auth.DIALER, ours, b"an old nonce 16b", ATTACKER, 0)
            replay.sendall(frame(Proof(old), 1))
            drain(replay)
            sent += 2
        return sent

    under_attack(target, "wrong keys, replayed proofs", attack)
    assert ROWS[-1]["handshake"] >= 200, ROWS[-1]  # every one of them refused
