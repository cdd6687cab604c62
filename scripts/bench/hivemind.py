"""Averaging one 10M-parameter tensor: hivemind's DecentralizedAverager vs gossipnode's gossip.

    .venv/bin/python scripts/bench/hivemind.py [--peers 2 4] [--rounds 5] [--repeats 5]

Both sides run n separate processes on 127.0.0.1, peer i holding the float32 tensor
``c_i * v`` (c_i = (i + 2)^2 / 4, v one fixed random vector of ``--numel`` entries; see
``hivemind_peer.py``).

hivemind (1.1.x, in its own venv, made on the first run: ``python -m venv``, then
``pip install torch==2.13.0`` first, since an unpinned torch is a multi-GB CUDA build, then
``pip install hivemind``; later runs reuse it): each peer runs a DHT (libp2p's TLS off unless
``--hivemind-tls``, as gossipnode runs --insecure) and a DecentralizedAverager with
target_group_size = min_group_size = n (settings: ``--help``). A round: every peer resets
its tensor to its start, waits for a common wall-clock start time and calls ``step()``; the
round takes from that time until the last peer has its averaged tensor. One warm-up round is
not counted (it pays for the first DHT look-ups); the median of ``--rounds`` is. After each
round each peer reads its tensor off v over all coordinates (c = <x, v>/<v, v> and the
residual |x - c v|^2) and the consensus distance (1/n) sum_i |x_i - mean x|^2 over its start
value is computed from those (an upper bound; exact if the residuals are 0).

gossipnode: n ``gossipnode run`` processes on a complete graph (algorithm gossip, no gradient
steps, membership off, --insecure), their task ``hivemind_peer:LineTask``: the model is the
same tensor. Every node waits until all are built, then all start together. Pairwise averaging
is linear, so every model stays a multiple of v; the task's ``evaluate`` reads that multiple
off every 1009th coordinate and stamps it with the wall clock, and the nodes print it every
``--progress-every`` seconds (--json progress lines). Merging the nodes' readouts in time order
gives the consensus distance over time (exact while the models are on the line; a readout is
at most one sampling gap late). The time to a target is from the moment two nodes run (the
earliest any exchange can start; a node's start is its readout's time minus its uptime) until
the distance is at most the target for good (so a mix of one node's fresh and another's stale
readout cannot end it early). Once the readouts have stayed below the smallest target for
``--hold`` seconds, the script fetches every node's model over the wire (as ``gossipnode
merge`` does) and checks over all coordinates that the models are still on the line and how far
apart they are, exactly; if they are above the target (an exchange begun before the consensus
landed after it), it follows on, and a target the last fetched models miss counts as not
reached.

A hivemind round ends with every peer holding the average (up to float32 rounding), so its
distance after one round is at rounding level; gossip approaches the average geometrically.
Both are compared at common targets (``--targets``, relative to the start); gossip at several
``--gossip-rates``, since overlapping exchanges make its speed depend on the rate. A random pairwise
exchange on the complete graph shrinks the expected distance by the factor 1 - 1/(n-1) for
any starting configuration, so models on one line converge like any others.
Prints a table and writes hivemind.json and hivemind.md into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import trio
from hivemind_peer import NUMEL, coefficient, direction, readout, relative_distance
from quiet import wait_quiet

from gossipnode.cluster import free_ports
from gossipnode.learner import consensus_distance
from gossipnode.merge import NodeMerge, _Client
from gossipnode.transport import Address, TcpTransport
from gossipnode.wire import Limits

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VENV = REPO / ".bench" / "venv-hivemind"
TORCH_PIN = "torch==2.13.0"  # first: an unpinned torch (hivemind's dependency) is a CUDA build
INSTALL_TIMEOUT = 1800.0
STARTUP_TIMEOUT = 300.0  # seconds for processes to import torch etc. on a busy machine
ROUND_LEAD = 0.5  # seconds between telling hivemind peers a start time and that time
GO_LEAD = 0.3  # the same for gossipnode nodes
STOP_TIMEOUT = 30.0
FETCH_TIMEOUT = 60.0
MAX_CHECKS = 5  # fetches of a cluster's models to confirm its consensus


@dataclass(frozen=True)
class Settings:
    numel: int
    # hivemind
    min_matchmaking_time: float
    request_timeout: float
    part_size_bytes: int
    hivemind_tls: bool
    warmup: int
    rounds: int
    round_timeout: float
    # gossipnode
    gossip_rates: tuple[float, ...]
    progress_every: float
    repeats: int
    targets: tuple[float, ...]
    hold: float
    gossip_timeout: float


# ---------------------------------------------------------------------------- the venv


def ensure_venv(venv: Path) -> Path:
    """The python of ``venv``, made with torch (CPU) and hivemind if it is not there yet."""
    python = venv / "bin" / "python"
    if _has_hivemind(python):
        print(f"hivemind venv: reusing {venv}")
        return python
    if not python.exists():
        print(f"hivemind venv: creating {venv}")
        _install([sys.executable, "-m", "venv", str(venv)])
    print(f"hivemind venv: pip install {TORCH_PIN}")
    _install([str(python), "-m", "pip", "install", "--disable-pip-version-check", TORCH_PIN])
    print("hivemind venv: pip install hivemind")
    _install([str(python), "-m", "pip", "install", "--disable-pip-version-check", "hivemind"])
    if not _has_hivemind(python):
        raise SystemExit(f"hivemind does not import in {venv}")
    return python


def _has_hivemind(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import hivemind, torch"], capture_output=True, timeout=300
    )
    return probe.returncode == 0


def _install(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, timeout=INSTALL_TIMEOUT)


def hivemind_version(python: Path) -> str:
    code = "import hivemind, torch; print(f'{hivemind.__version__} (torch {torch.__version__})')"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    return out.stdout.strip()


# ---------------------------------------------------------------------------- processes


class Child:
    """A process this script started: its stdout's JSON lines on a queue, stderr in a file.
    With ``group`` it leads its own process group (hivemind's p2pd daemons are in it)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, *, group: bool) -> None:
        self.log, self.group = log, group
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=group,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue  # not ours (a library printing)
        self.lines.put(None)  # end of output

    def next(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; RuntimeError (with the log's tail) on exit or timeout."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"nothing within {timeout:g}s: {self.tail()}") from None
        if line is None:
            raise RuntimeError(f"exited with {self.proc.wait(10)}: {self.tail()}")
        return line

    def drain(self) -> list[dict[str, Any]]:
        """The JSON lines that arrived so far."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_exit(self, timeout: float) -> None:
        """Give it ``timeout`` seconds to exit by itself (``reap`` then ends what is left)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"warning: pid {self.proc.pid} did not exit within {timeout:g}s")

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def reap(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the exit, SIGKILL after ``timeout``; nothing of it is left after."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout)
        if self.group:
            self._signal(signal.SIGKILL)  # any child (p2pd) that outlived its parent
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):  # the reader is gone
                self.proc.stdin.close()

    def _signal(self, sig: signal.Signals) -> None:
        try:
            if self.group:
                os.killpg(self.proc.pid, sig)  # our session: the pgid is the leader's pid
            elif self.proc.poll() is None:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass  # already gone


def stop_all(children: list[Child]) -> None:
    """SIGTERM to all at once (each finishes its exchange in flight), then reap each."""
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.reap()
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop pid {child.proc.pid}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------- hivemind


def run_hivemind(python: Path, n: int, s: Settings, tmp: Path) -> dict[str, Any]:
    """Start n peers, run warm-up and timed rounds, stop them."""
    env = dict(os.environ)  # torch's defaults (gossipnode's cli turns huge pages on for itself)
    peers: list[Child] = []
    try:
        peers.append(_start_peer(python, 0, n, [], s, env, tmp))
        maddrs = peers[0].next(STARTUP_TIMEOUT)["maddrs"]
        peers += [_start_peer(python, i, n, maddrs, s, env, tmp) for i in range(1, n)]
        for i, peer in enumerate(peers):
            if i > 0:
                peer.next(STARTUP_TIMEOUT)  # its maddrs
            if not peer.next(STARTUP_TIMEOUT).get("ready"):
                raise RuntimeError(f"hivemind peer {i} did not get ready: {peer.tail()}")
        rounds = [_hivemind_round(peers, k < s.warmup, s) for k in range(s.warmup + s.rounds)]
        for peer in peers:
            peer.send({"quit": True})  # shuts its averager and DHT (and p2pd) down itself
        for peer in peers:
            peer.wait_exit(STOP_TIMEOUT)
    finally:
        stop_all(peers)
    timed = [r for r in rounds if not r["warmup"] and r["ok"]]
    return {
        "rounds": rounds,
        "round_median_s": _median([r["seconds"] for r in timed]),
        "first_round_s": rounds[0]["seconds"] if rounds[0]["ok"] else None,  # cold
        "matchmaking_median_s": _median([r["matchmaking_s"] for r in timed]),
        "distance_max": max((r["distance"] for r in timed), default=None),
        "failed_rounds": sum(not r["ok"] for r in rounds if not r["warmup"]),
    }


def run_hivemind_retrying(python: Path, n: int, s: Settings, tmp: Path) -> dict[str, Any]:
    """``run_hivemind``, once more if it fails (the failure is kept in the figures)."""
    failures: list[str] = []
    for attempt in range(1, 3):
        try:
            return {**run_hivemind(python, n, s, tmp), "failed_attempts": failures}
        except RuntimeError as exc:
            print(f"  hivemind n={n}: attempt {attempt} failed: {exc}")
            failures.append(str(exc)[-2000:])
    raise SystemExit(f"hivemind with {n} peers failed twice")


def _start_peer(
    python: Path, i: int, n: int, maddrs: list[str], s: Settings, env: dict[str, str], tmp: Path
) -> Child:
    cmd = [
        str(python),
        "-P",  # keeps this directory, and so this file, from shadowing the hivemind package
        str(HERE / "hivemind_peer.py"),
        "--peer",
        str(i),
        "--peers",
        str(n),
        "--numel",
        str(s.numel),
        "--min-matchmaking-time",
        str(s.min_matchmaking_time),
        "--request-timeout",
        str(s.request_timeout),
        "--part-size-bytes",
        str(s.part_size_bytes),
        "--tls" if s.hivemind_tls else "--no-tls",
        "--initial-peers",
        *maddrs,
    ]
    return Child(cmd, env, tmp / f"hivemind-{n}-{i}.log", group=True)


def _hivemind_round(peers: list[Child], warmup: bool, s: Settings) -> dict[str, Any]:
    at = time.time() + ROUND_LEAD
    for peer in peers:
        peer.send({"at": at, "timeout": s.round_timeout})
    results = [peer.next(s.round_timeout + 60) for peer in peers]
    errors = [r["error"] for r in results if r["error"]]
    matched = [r["matched"] for r in results]
    row = {
        "warmup": warmup,
        "ok": not errors,
        "errors": errors,
        "seconds": max(r["end"] for r in results) - at,
        "matchmaking_s": max(matched) - at if None not in matched else None,
        "late_start_s": max(r["begin"] for r in results) - at,
        "distance": relative_distance(
            [r["c"] for r in results],
            [r["residual"] for r in results],
            [coefficient(i) for i in range(len(peers))],
            _v_norm2(s.numel),
        ),
        "mean_drift": _mean_drift([r["c"] for r in results]),
    }
    label = "warm-up" if warmup else "round"
    match = row["matchmaking_s"]
    print(
        f"  hivemind n={len(peers)} {label}: {row['seconds']:.3f} s "
        f"(matchmaking {'?' if match is None else f'{match:.3f}'} s), "
        f"distance {row['distance']:.2e}" + (f", errors {errors}" if errors else "")
    )
    return row


def _v_norm2(numel: int) -> float:
    return float(direction(numel).double().pow(2).sum())


def _mean_drift(coefs: list[float]) -> float:
    """|mean c - mean c0| over the spread of c0: averaging must keep the mean."""
    start = [coefficient(i) for i in range(len(coefs))]
    mean0 = sum(start) / len(start)
    spread0 = math.sqrt(sum((c - mean0) ** 2 for c in start) / len(start))
    return abs(sum(coefs) / len(coefs) - mean0) / spread0


# ---------------------------------------------------------------------------- gossipnode


def run_gossip(n: int, rate: float, s: Settings, tmp: Path) -> dict[str, Any]:
    """One fresh cluster: start n nodes together, follow their readouts to the target,
    fetch the final models, stop them."""
    sync = Path(tempfile.mkdtemp(prefix=f"gossip-{n}-", dir=tmp))
    ports = free_ports(n)
    nodes: list[Child] = []
    try:
        nodes = [_start_node(i, ports, rate, s, sync) for i in range(n)]
        _wait_ready(nodes, sync)
        go = time.time() + GO_LEAD
        (sync / "go.tmp").write_text(repr(go))
        (sync / "go.tmp").rename(sync / "go")  # atomically: a node never reads half a time
        trace, final, checks = _follow_and_fetch(nodes, ports, s)
    finally:
        stop_all(nodes)
    summaries = [e for node in nodes for e in node.drain() if e.get("event") == "summary"]
    figures = _gossip_figures(s, go, trace, final, summaries)
    for t in s.targets:  # a target the fetched models missed was not reached for good
        if checks[-1] > t:
            figures["to_target_s"][str(t)] = None
    return {**figures, "fetch_checks": checks}


def _start_node(i: int, ports: list[int], rate: float, s: Settings, sync: Path) -> Child:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "BENCH_NODE": str(i),
        "BENCH_NUMEL": str(s.numel),
        "BENCH_SYNC": str(sync),
    }
    peers = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i)
    cmd = [
        sys.executable,
        "-m",
        "gossipnode",
        "run",
        *("--id", str(i), "--num-nodes", str(len(ports))),
        *("--listen", f"127.0.0.1:{ports[i]}", "--peers", peers),
        "--insecure",  # plain TCP, as hivemind's libp2p without TLS (the default here)
        *("--task", "hivemind_peer:LineTask", "--algorithm", "gossip"),
        *("--grad-rate", "0", "--gossip-rate", str(rate)),
        *("--probe-interval", "0", "--torch-threads", "1"),
        *("--progress-every", str(s.progress_every), "--exchange-timeout", "30"),
        *("--duration", str(s.gossip_timeout + STARTUP_TIMEOUT)),  # a bound if we die
        *("--json", "--log-level", "warning"),
    ]
    return Child(cmd, env, sync / f"node-{i}.log", group=False)


def _wait_ready(nodes: list[Child], sync: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not all((sync / f"ready-{i}").exists() for i in range(len(nodes))):
        for i, node in enumerate(nodes):
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {i} exited: {node.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes not built within {STARTUP_TIMEOUT:g}s")
        time.sleep(0.05)


@dataclass
class Trace:
    """What the nodes' progress lines said, per node: (wall time, readout), (wall time,
    bytes sent and received so far), and when it began running."""

    samples: list[list[tuple[float, float]]]
    traffic: list[list[tuple[float, float]]]
    starts: list[float | None]
    uptimes: list[float]  # each node's uptime at its latest progress line

    @classmethod
    def empty(cls, n: int) -> Trace:
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [None] * n, [0.0] * n)

    def add(self, i: int, event: dict[str, Any]) -> None:
        wall, elapsed = event["bench_wall"], event["elapsed"]
        self.samples[i].append((wall, event["bench_c"]))
        if self.starts[i] is None:  # when its run began, by its own clock's offset
            self.starts[i] = wall - elapsed
        # bytes_per_s covers the node's time since its previous progress line
        moved = event["bytes_per_s"] * (elapsed - self.uptimes[i])
        self.uptimes[i] = elapsed
        before = self.traffic[i][-1][1] if self.traffic[i] else 0.0
        self.traffic[i].append((wall, before + moved))


def _follow(nodes: list[Child], s: Settings, trace: Trace, deadline: float) -> None:
    """Add the nodes' progress to ``trace`` until the distance has stayed below the
    smallest target for ``hold`` seconds, or until ``deadline`` (time.monotonic)."""
    n = len(nodes)
    start0 = [coefficient(i) for i in range(n)]
    below_since = None
    while time.monotonic() < deadline:
        time.sleep(0.02)
        for i, node in enumerate(nodes):
            for event in node.drain():
                if event.get("event") == "progress":
                    trace.add(i, event)
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {i} exited: {node.tail()}")
        if not all(trace.samples):
            continue
        latest = [row[-1][1] for row in trace.samples]
        if relative_distance(latest, [0.0] * n, start0, 1.0) > min(s.targets):
            below_since = None
        elif below_since is None:
            below_since = time.monotonic()
        elif time.monotonic() - below_since >= s.hold:
            return


def _follow_and_fetch(
    nodes: list[Child], ports: list[int], s: Settings
) -> tuple[Trace, list[torch.Tensor], list[float]]:
    """Follow the readouts below the target, then fetch the models and check them. An
    exchange begun before the consensus can still land after it and apply its old difference,
    so the cluster can drift apart again: if the fetched models are above the target, follow
    on (at most ``MAX_CHECKS`` times, within ``gossip_timeout``). Returns the trace, the
    last fetched models and each check's exact relative distance."""
    trace = Trace.empty(len(nodes))
    deadline = time.monotonic() + s.gossip_timeout
    start = consensus_distance([direction(s.numel) * coefficient(i) for i in range(len(nodes))])
    checks: list[float] = []
    while True:
        _follow(nodes, s, trace, deadline)
        final = trio.run(_fetch_models, ports)
        checks.append(consensus_distance(final) / start)
        done = checks[-1] <= min(s.targets) or len(checks) >= MAX_CHECKS
        if done or time.monotonic() >= deadline:
            return trace, final, checks


async def _fetch_models(ports: list[int]) -> list[torch.Tensor]:
    """Every node's current model, fetched as ``gossipnode merge`` does (no merge sent)."""
    client = _Client(TcpTransport(FETCH_TIMEOUT), "gossip", FETCH_TIMEOUT, Limits(), None)
    models = []
    for port in ports:
        node = NodeMerge(Address.parse(f"127.0.0.1:{port}"))
        if not await client.attempt(node, client.meet_and_fetch, node) or node.params is None:
            raise RuntimeError(f"could not fetch the model of {node.address}: {node.error}")
        if node.conn is not None:
            await node.conn.aclose()
        models.append(node.params)
    return models


def _gossip_figures(
    s: Settings,
    go: float,
    trace: Trace,
    final: list[torch.Tensor],
    summaries: list[dict[str, Any]],
) -> dict[str, Any]:
    samples = trace.samples
    began = [t for t in trace.starts if t is not None]
    if len(began) < len(trace.starts):
        raise RuntimeError("a node printed no progress")
    # Gossip can start once two nodes run (an underestimate of when each began: its readout
    # time minus its uptime); a slow starter then costs time, but nothing runs before t0.
    t0 = sorted(began)[1]
    trajectory = _trajectory(samples)
    v = direction(s.numel)
    exact = consensus_distance(final) / consensus_distance(
        [v * coefficient(i) for i in range(len(final))]
    )
    on_line = [readout(x, v) for x in final]
    gaps = [b[0] - a[0] for row in samples for a, b in itertools.pairwise(row)]
    exchange_s = [e["exchange_seconds_median"] for e in summaries]
    reached = {str(t): _reached(trajectory, t) for t in s.targets}
    last = reached[str(min(s.targets))]
    return {
        "to_target_s": {t: None if at is None else at - t0 for t, at in reached.items()},
        "to_target_from_all_up_s": {
            t: None if at is None else at - max(began) for t, at in reached.items()
        },
        "first_node_after_go_s": min(began) - go,
        "start_skew_s": max(began) - min(began),
        "first_mix_seen_s": None if (seen := _first_change(samples)) is None else seen - t0,
        # Each mix moves a node's readout: half the changes bound the exchanges from below.
        "exchanges_to_target_at_least": None if last is None else _changes(samples, last) // 2,
        "mb_per_node_to_target": None if last is None else _moved(trace.traffic, last) / 1e6,
        "sampling_gap_median_s": _median(gaps),
        "sampling_gap_max_s": max(gaps, default=None),
        "final_distance_readout": trajectory[-1][1] if trajectory else None,
        "final_distance_exact": exact,
        "final_residual_max": max(r for _, r in on_line) / _v_norm2(s.numel),
        "final_mean_drift": _mean_drift([c for c, _ in on_line]),
        "exchange_median_s": _median([x for x in exchange_s if x is not None]),
        "mixes_total": sum(e.get("mixes", 0) for e in summaries),
    }


def _first_change(samples: list[list[tuple[float, float]]]) -> float | None:
    """When a readout first left its node's start (None if never); the tolerance covers the
    readout's own rounding (float32 products, ~1e-9 after the readout's averaging); a first
    mix moves c by half a gap between starts, at least 0.6."""
    moved = [t for i, row in enumerate(samples) for t, c in row if abs(c - coefficient(i)) > 1e-6]
    return min(moved, default=None)


def _moved(traffic: list[list[tuple[float, float]]], until: float) -> float:
    """Bytes sent and received per node up to ``until`` (median over nodes; as of each
    node's last progress line by then, so a slight underestimate)."""
    return statistics.median(max((b for t, b in row if t <= until), default=0.0) for row in traffic)


def _changes(samples: list[list[tuple[float, float]]], until: float) -> int:
    """How often the nodes' readouts changed before ``until``."""
    return sum(a[1] != b[1] for row in samples for a, b in itertools.pairwise(row) if b[0] <= until)


def _trajectory(samples: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """(time, relative distance) after each readout, once every node has one."""
    n = len(samples)
    events = sorted((t, i, c) for i, row in enumerate(samples) for t, c in row)
    latest: dict[int, float] = {}
    start0 = [coefficient(i) for i in range(n)]
    out = []
    for t, i, c in events:
        latest[i] = c
        if len(latest) == n:
            coefs = [latest[j] for j in range(n)]
            out.append((t, relative_distance(coefs, [0.0] * n, start0, 1.0)))
    return out


def _reached(trajectory: list[tuple[float, float]], target: float) -> float | None:
    """The first time from which the distance stays at most ``target``; None if never."""
    above = [k for k, (_, d) in enumerate(trajectory) if d > target]
    k = above[-1] + 1 if above else 0
    return trajectory[k][0] if k < len(trajectory) else None


# ---------------------------------------------------------------------------- report


def _min(values: list[Any]) -> float | None:
    return min((v for v in values if v is not None), default=None)


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(
    n: int, hive: dict[str, Any], gossip: dict[float, list[dict[str, Any]]], s: Settings
) -> dict[str, Any]:
    """One size's figures: hivemind's, and per gossip rate the medians and the ratios
    hivemind time / gossipnode time (> 1: gossipnode gets there sooner)."""
    rates = []
    for rate, repeats in gossip.items():
        entry: dict[str, Any] = {"gossip_rate": rate, "repeats": repeats}
        for t in s.targets:
            times = [g["to_target_s"][str(t)] for g in repeats]
            median = statistics.median(times) if None not in times else None  # all reached
            entry[f"to_{t:g}_median_s"] = median
            entry[f"to_{t:g}_range_s"] = [min(times), max(times)] if median else None
            hive_ok = hive["distance_max"] is not None and hive["distance_max"] <= t
            entry[f"ratio_at_{t:g}"] = (
                hive["round_median_s"] / median if hive_ok and median else None
            )
        rates.append(entry)
    return {"peers": n, "hivemind": hive, "gossipnode": rates}


def table(rows: list[dict[str, Any]], s: Settings) -> list[str]:
    heads = ["peers", "hivemind round s", "of it matchmaking s", "hivemind first round s"]
    heads += ["hivemind distance after"]
    heads += ["gossipnode rate /edge/s"]
    heads += [f"gossipnode to {t:g} s [range]" for t in s.targets]
    heads += [f"hivemind / gossipnode at {t:g}" for t in s.targets]
    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for r in rows:
        hive = r["hivemind"]
        for g in r["gossipnode"]:
            cells = [str(r["peers"]), _f(hive["round_median_s"])]
            cells += [_f(hive["matchmaking_median_s"]), _f(hive["first_round_s"])]
            cells.append(_f(hive["distance_max"], ".0e"))
            cells.append(f"{g['gossip_rate']:g}")
            cells += [_with_range(g, t) for t in s.targets]
            cells += [_f(g[f"ratio_at_{t:g}"], ".2f") for t in s.targets]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _with_range(g: dict[str, Any], t: float) -> str:
    span = g[f"to_{t:g}_range_s"]
    median = _f(g[f"to_{t:g}_median_s"])
    return median if span is None else f"{median} [{span[0]:.2f}-{span[1]:.2f}]"


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: list[dict[str, Any]], s: Settings, meta: dict[str, Any]) -> str:
    rates = ", ".join(f"{r:g}" for r in s.gossip_rates)
    lines = [
        "## Averaging one tensor: hivemind's DecentralizedAverager vs gossipnode",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"n processes on 127.0.0.1, each holding a {s.numel:,}-parameter float32 tensor "
        f"({s.numel * 4 / 1e6:g} MB), peer i starting at c_i v with c_i = (i + 2)^2 / 4 = 1, "
        "2.25, 4, 6.25 (v one fixed random vector; no two pairs have equal sums, so no lucky "
        "gossip pairing is exact). "
        "Consensus distance = (1/n) sum_i |x_i - mean x|^2, relative to its start. "
        f"Run of {meta['date']}: {meta['cores']} cores, otherwise idle at the start (load "
        f"average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after, its own "
        f"processes), {meta['versions']}.",
        "",
        f"- **hivemind {meta['hivemind']}**: DHT + DecentralizedAverager per peer, "
        f"target_group_size = min_group_size = n, min_matchmaking_time "
        f"{s.min_matchmaking_time:g} s, request_timeout {s.request_timeout:g} s, "
        f"part_size_bytes {s.part_size_bytes}, libp2p TLS {'on' if s.hivemind_tls else 'off'}, "
        "no compression, 1 torch thread. All peers call "
        "`step()` at one wall-clock time; a round lasts until the last peer has the average. "
        f"Median of {s.rounds} rounds after {s.warmup} warm-up round(s) (the first round is "
        "shown too), each from the initial tensors; distance = the largest after any round "
        "(from each peer's tensor read off v over all coordinates).",
        f"- **gossipnode**: n `gossipnode run`, complete graph, algorithm gossip, --grad-rate 0, "
        f"--gossip-rate {rates} (exchanges per edge per second), --probe-interval 0, "
        "--insecure, --torch-threads 1. Time from the moment two nodes run (the earliest an "
        "exchange can start) until the distance stays at most the target; median [range] of "
        f"{s.repeats} fresh clusters. "
        f"Distance from each node's readout of its model's multiple of v (every "
        f"{s.progress_every:g} s); once it has stayed below the target for {s.hold:g} s, the "
        "models are fetched over the wire and checked exactly (above the target: the run goes "
        "on; a target the final fetch misses counts as not reached).",
        "",
        *table(rows, s),
        "",
        *_notes(rows),
        "",
        *_explanation(rows, s),
    ]
    return "\n".join(lines) + "\n"


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        hive = r["hivemind"]
        skews = _over_runs(r, "start_skew_s")
        notes.append(
            f"- n = {r['peers']}: hivemind's matchmaking took {_f(hive['matchmaking_median_s'])}"
            f" s of its {_f(hive['round_median_s'])} s round ({hive['failed_rounds']} failed "
            f"rounds, {len(hive['failed_attempts'])} failed starts). gossipnode: an exchange "
            "(40 MB each way, checks, mix) took "
            f"{_f(_median(_over_runs(r, 'exchange_median_s')))} s (median over runs); "
            f"readouts came every {_f(_median(_over_runs(r, 'sampling_gap_median_s')))} s; "
            f"the last node was up {_f(_median(skews))} s (median; at worst {_f(max(skews))} "
            "s) after the first; the first mix showed "
            f"{_f(_min(_over_runs(r, 'first_mix_seen_s')))} s after the clock started at the "
            "earliest. After the readouts had stayed below the target, the fetched models were "
            f"above it {sum(len(c) - 1 for c in _over_runs(r, 'fetch_checks'))} times in "
            f"{len(_over_runs(r, 'fetch_checks'))} runs (each time, the run went on). The final "
            "fetched models: exact relative distance at most "
            f"{max(_over_runs(r, 'final_distance_exact')):.0e}, off the line at most "
            f"{max(_over_runs(r, 'final_residual_max')):.0e} (of |v|^2)."
        )
    return notes


def _explanation(rows: list[dict[str, Any]], s: Settings) -> list[str]:
    """What the figures say, from the figures (so a re-run keeps it true)."""
    t = min(s.targets)
    worst = max(r["hivemind"]["distance_max"] or 0.0 for r in rows)
    ideal = [
        f"~{_ideal_exchanges(r['peers'], x)} to {x:g} at n = {r['peers']}"
        for r in rows
        if r["peers"] > 2
        for x in sorted(s.targets, reverse=True)
    ]
    lines = [
        "Why they differ:",
        "",
        "- hivemind's round is one all-reduce: every peer ends with the average up to float32 "
        f"rounding (relative distance at most {worst:.0e}), so one round meets any target "
        "here. Its time is matchmaking through the DHT plus the all-reduce, in which each peer "
        f"reduces 1/n of the tensor and trades parts of {s.part_size_bytes} bytes with all "
        "others over libp2p (protobuf messages through the p2pd daemon).",
        "- gossipnode has no matchmaking: a node dials a neighbour and both swap whole models. "
        "With n = 2 one exchange leaves both with the exact average: the time is the wait for "
        "the first Poisson tick plus one exchange, unless both ends start one at once; two "
        "crossing exchanges on one edge are both applied, which swaps the models instead of "
        "averaging them (the rule that keeps the sum exact when a model moved in flight).",
        "- With more nodes pairwise averaging converges geometrically: an exchange of a random "
        "pair of the complete graph shrinks the expected distance by the factor 1 - 1/(n-1)"
        + (f", so exchanges that never overlap take {', '.join(ideal)}" if ideal else "")
        + ". They do overlap (a node answers others while its own exchange is in flight, on "
        "shared cores) and then mix less than clean averages; an exchange begun before the "
        "consensus that lands after it even adds its old difference back. The runs took at "
        "least (exchanges) "
        + ", ".join(
            f"{_f(_median(_over_runs(r, 'exchanges_to_target_at_least')), '.0f')} at n = "
            f"{r['peers']}"
            for r in rows
        )
        + f" (median, from readout changes) to {t:g}.",
        "- Bytes: hivemind's all-reduce sends and receives 2(n-1)/n of the tensor per peer, "
        + ", ".join(
            f"{4 * (r['peers'] - 1) / r['peers'] * s.numel * 4 / 1e6:.0f} MB in all at n = "
            f"{r['peers']}"
            for r in rows
        )
        + "; a gossipnode exchange moves two models at each end, and the nodes moved "
        + ", ".join(
            f"{_f(_median(_over_runs(r, 'mb_per_node_to_target')), '.0f')} MB each at n = "
            f"{r['peers']}"
            for r in rows
        )
        + f" (median) until {t:g}.",
        "- Neither side counts process start-up. hivemind's median leaves out its first "
        "round (first DHT look-ups and connections; shown as its first round), while every "
        "gossipnode run is cold: its first TCP connections and handshakes count, and so do "
        "retries (with backoff) of dials to a node that was not listening yet. For a cold "
        "start compare gossipnode with hivemind's first round, for a warm one with its median.",
    ]
    for r in rows:
        for g in r["gossipnode"]:
            ratio = g[f"ratio_at_{t:g}"]
            if ratio is not None:
                faster = "gossipnode" if ratio > 1 else "hivemind"
                lines.append(
                    f"- n = {r['peers']}, gossip rate {g['gossip_rate']:g}: {faster} reaches "
                    f"{t:g} {max(ratio, 1 / ratio):.1f}x sooner (medians)."
                )
    return lines


def _over_runs(row: dict[str, Any], key: str) -> list[Any]:
    """``key`` of every gossipnode run of a size, all rates."""
    return [g[key] for entry in row["gossipnode"] for g in entry["repeats"]]


def _ideal_exchanges(n: int, target: float) -> int:
    """Expected sequential random exchanges on K_n to bring the distance to ``target``."""
    return 1 if n == 2 else math.ceil(math.log(target) / math.log(1 - 1 / (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--rounds", type=int, default=5, help="timed hivemind rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed hivemind rounds first")
    parser.add_argument("--repeats", type=int, default=5, help="gossipnode clusters per size")
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-3, 1e-6])
    parser.add_argument("--min-matchmaking-time", type=float, default=1.0)
    parser.add_argument("--request-timeout", type=float, default=0.5)
    # 4 MiB parts: faster than hivemind's 512 KiB default on loopback in trial runs.
    parser.add_argument("--part-size-bytes", type=int, default=4 << 20)
    parser.add_argument(
        "--hivemind-tls",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="libp2p's TLS (hivemind's default); off, like gossipnode's --insecure",
    )
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument(
        "--gossip-rates", type=float, nargs="+", default=[3.0, 20.0], help="per edge, per s"
    )
    parser.add_argument("--progress-every", type=float, default=0.01)
    parser.add_argument("--hold", type=float, default=1.0, help="s below target, then check")
    parser.add_argument("--gossip-timeout", type=float, default=60.0)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--setup-only", action="store_true", help="make the venv and stop")
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    if args.setup_only:
        return
    s = Settings(
        numel=args.numel,
        min_matchmaking_time=args.min_matchmaking_time,
        request_timeout=args.request_timeout,
        part_size_bytes=args.part_size_bytes,
        hivemind_tls=args.hivemind_tls,
        warmup=args.warmup,
        rounds=args.rounds,
        round_timeout=args.round_timeout,
        gossip_rates=tuple(args.gossip_rates),
        progress_every=args.progress_every,
        repeats=args.repeats,
        targets=tuple(sorted(args.targets, reverse=True)),
        hold=args.hold,
        gossip_timeout=args.gossip_timeout,
    )
    wait_quiet()  # both sides are timed in wall-clock seconds on a shared machine
    meta = {
        "command": " ".join([".venv/bin/python scripts/bench/hivemind.py", *sys.argv[1:]]),
        "hivemind": hivemind_version(python),
        "versions": f"torch {torch.__version__}, python {sys.version.split()[0]}",
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": os.getloadavg()[0],
    }
    print(f"hivemind, torch: {meta['hivemind']}; {s.numel:,} float32 parameters per peer")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hivemind-") as tmp:
        for n in args.peers:
            print(f"hivemind, {n} peers")
            hive = run_hivemind_retrying(python, n, s, Path(tmp))
            gossip: dict[float, list[dict[str, Any]]] = {rate: [] for rate in s.gossip_rates}
            for k in range(s.repeats):  # rates interleaved: load drifts alike for all
                for rate in s.gossip_rates:
                    gossip[rate].append(run_gossip(n, rate, s, Path(tmp)))
                    print(f"  gossipnode n={n} rate {rate:g} repeat {k + 1}: ", end="")
                    print(_gossip_line(gossip[rate][-1]))
            rows.append(summarize(n, hive, gossip, s))
    meta["load_after"] = os.getloadavg()[0]
    print("\n".join(table(rows, s)))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"settings": asdict(s), "meta": meta, "rows": rows}
    (args.out / "hivemind.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "hivemind.md").write_text(markdown(rows, s, meta))
    print(f"wrote {args.out / 'hivemind.json'} and {args.out / 'hivemind.md'}")


def _gossip_line(g: dict[str, Any]) -> str:
    reached = ", ".join(f"{t} in {_f(x)} s" for t, x in g["to_target_s"].items())
    reached += f" ({_f(g['mb_per_node_to_target'], '.0f')} MB/node)"
    return (
        f"{reached} (readouts {_f(g['sampling_gap_median_s'])} s apart, nodes up "
        f"{_f(g['first_node_after_go_s'])} s after go and within {_f(g['start_skew_s'])} s, "
        f"exchange {_f(g['exchange_median_s'])} s); fetched final models: distance "
        f"{g['final_distance_exact']:.1e}, off the line {g['final_residual_max']:.1e}"
        + f", first mix seen at {_f(g['first_mix_seen_s'])} s"
        + f"; fetched {len(g['fetch_checks'])}x: "
        + ", ".join(f"{d:.0e}" for d in g["fetch_checks"])
    )


if __name__ == "__main__":
    main()
