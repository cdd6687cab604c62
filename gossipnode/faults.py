"""The fault suite: 16 nodes through crashes, a partition, packet loss, a straggler and churn,
each run against the fault-free run of the same mode.

    scripts/faults [--mode sim|real|both] [--only FAULT ...] [--out DIR]

Faults (times are seconds of training, from when every node is up; a run trains 120 s, in
virtual time as for real, so the last fault ends more than a minute before the end):

- ``kill``: a quarter of the nodes, at random times, SIGKILLed and restarted 5 s later (real
  nodes resume from their checkpoint, written every 2 s);
- ``partition``: the nodes split in two halves for 30 s, then healed;
- ``loss``: 5 % of the packets every node sends are dropped, all run long;
- ``straggler``: one node 5x slower (real: it runs one tenth of a second in every half second,
  SIGSTOP/SIGCONT, so it computes and answers 5x slower);
- ``churn``: half of the nodes leave (real: SIGTERM, so they save and say goodbye), and rejoin
  with ``--resume`` later.

Modes: ``sim`` runs the node code in virtual time (``gossipnode.sim``; 4x4 torus, every step
50 ms of compute, a crash and a leave are alike there, restarts start fresh); ``real`` runs
``gossipnode run`` processes, one per network namespace (``gossipnode.netns``; needs root), with
membership on (two seeds, 4 random neighbours each), and the faults for real: kill -9,
nftables rules for the loss and the partition.

For each fault it reports: did training finish (every node's last process exited 0 with a
summary, or in virtual time every node is alive at the end), the final accuracy (mean and the
worst node) against the fault-free run, exchanges completed and lost (begun, not completed:
failed, timed out, one-sided), whether every checkpoint loads, and what shows the fault took
effect (packets the rules dropped, the straggler's and the downed nodes' share of gradients).

Invariants, any broken one makes the exit code 1: training finished, every checkpoint
readable, every restarted real node resumed from its checkpoint, mean accuracy at most
``ACCURACY_DROP`` below the fault-free run, every node at least ``MIN_ACCURACY``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gossipnode import checkpoint, graphs, netns
from gossipnode.cluster import NodeResult
from gossipnode.netmodel import LinkSpec
from gossipnode.netns import NetnsCluster, NodeSpec
from gossipnode.scenario import Crash, PartitionFault, Scenario
from gossipnode.sim import SimOptions, simulate

# Wall-clock waits of a harness around real processes: the monotonic clock is the right one.
_clock = time.monotonic  # noqa: TID251
_sleep = time.sleep  # noqa: TID251

FAULTS = ("none", "kill", "partition", "loss", "straggler", "churn")
ACCURACY_DROP = 0.05  # the mean final accuracy may be this much below the fault-free run's
MIN_ACCURACY = 0.75  # every node's final accuracy (digits: chance is 0.1)
DOWNTIME = 5.0  # seconds a killed node stays down
PARTITION = 30.0  # seconds
LOSS = 0.05
SLOWDOWN = 5.0
MIN_DURATION = PARTITION / 0.6  # the partition, from 20% of the run, ends by 80% of it
LOST = ("failed", "timed_out", "one_sided")  # exchanges begun and not completed
TASK, SEED = "digits", 1
STEP_TIME = 0.05  # virtual seconds per gradient step (sim: each node computes back to back)
START_TIMEOUT = 120.0  # seconds for every real node to print progress (16 torch imports)


# ---------------------------------------------------------------------------- what goes wrong


@dataclass(frozen=True)
class Plan:
    """One fault, as times from the start of training."""

    fault: str
    downs: tuple[tuple[int, float, float], ...] = ()  # node, down at, back at
    graceful: bool = False  # downs are leaves (SIGTERM), not crashes (SIGKILL)
    partition: tuple[tuple[frozenset[int], ...], float, float] | None = None
    loss: float = 0.0  # fraction of packets dropped
    straggler: tuple[int, float] | None = None  # node, slowdown


def plan(fault: str, n: int, duration: float, seed: int = SEED) -> Plan:
    """The plan of ``fault`` for ``n`` nodes trained for ``duration`` seconds."""
    rng = random.Random(f"{fault}-{seed}")
    if fault == "none":
        return Plan(fault)
    if fault == "kill":
        nodes = rng.sample(range(n), max(1, n // 4))
        at = [rng.uniform(0.15, 0.6) * duration for _ in nodes]
        return Plan(fault, tuple((i, t, t + DOWNTIME) for i, t in zip(nodes, at, strict=True)))
    if fault == "partition":
        start = 0.2 * duration
        halves = (frozenset(range(n // 2)), frozenset(range(n // 2, n)))
        return Plan(fault, partition=(halves, start, start + PARTITION))
    if fault == "loss":
        return Plan(fault, loss=LOSS)
    if fault == "straggler":
        return Plan(fault, straggler=(rng.randrange(n), SLOWDOWN))
    if fault == "churn":
        leaving = sorted(rng.sample(range(n), n // 2))
        return Plan(fault, tuple((i, 0.25 * duration, 0.5 * duration) for i in leaving), True)
    raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")


@dataclass
class Row:
    """What one run of one fault showed."""

    mode: str
    fault: str
    finished: bool
    accuracy_mean: float | None
    accuracy_min: float | None
    exchanges: int
    lost: int
    checkpoints: tuple[int, int] | None = None  # readable, present (real mode)
    evidence: str = ""  # what shows the fault happened
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # broken invariants found while running
    broken: list[str] = field(default_factory=list)


def judge(row: Row, baseline: Row | None) -> list[str]:
    """The invariants ``row`` breaks, as sentences (``baseline``: the fault-free run)."""
    broken = list(row.notes)
    if not row.finished:
        broken.append("training did not finish on every node")
    if row.checkpoints is not None and row.checkpoints[0] < row.checkpoints[1]:
        broken.append(f"{row.checkpoints[1] - row.checkpoints[0]} checkpoint(s) unreadable")
    if row.accuracy_min is None or row.accuracy_mean is None:
        broken.append("no final accuracy")
        return broken
    if row.accuracy_min < MIN_ACCURACY:
        broken.append(f"a node ended at accuracy {row.accuracy_min:.3f} < {MIN_ACCURACY}")
    base = baseline.accuracy_mean if baseline is not None else None
    if base is not None and row.accuracy_mean < base - ACCURACY_DROP:
        broken.append(
            f"mean accuracy {row.accuracy_mean:.3f} is more than {ACCURACY_DROP} below "
            f"the fault-free {base:.3f}"
        )
    return broken


def _accuracy(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return None, min(known, default=None)
    return sum(known) / len(known), min(known)


def _count(outcomes: Sequence[dict[str, int]]) -> tuple[int, int]:
    ok = sum(o.get("ok", 0) + o.get("reconciled", 0) for o in outcomes)
    return ok, sum(o.get(k, 0) for o in outcomes for k in LOST)


def evidence(p: Plan, summaries: Sequence[Mapping[str, Any]], dropped: int | None = None) -> str:
    """What shows that ``p`` took effect, from each node's summary (its last process's under
    ``real``) and the packets the nftables rules dropped (``real`` only)."""
    gradients = [s.get("gradients") for s in summaries]
    parts = []
    if p.straggler:
        node = p.straggler[0]
        others = [g for i, g in enumerate(gradients) if i != node and g is not None]
        mine = gradients[node]
        if others and mine is not None:
            parts.append(f"node {node} did {mine / statistics.median(others):.2f}x the gradients")
    if p.downs:
        down = {i for i, _, _ in p.downs}
        ratio = _ratio(
            [g for i, g in enumerate(gradients) if i in down],
            [g for i, g in enumerate(gradients) if i not in down],
        )
        verb = "left and rejoined" if p.graceful else "killed and restarted"
        parts.append(f"{len(down)} {verb}, {ratio} the others' gradients")
    if p.partition:
        unreachable = sum(s.get("exchanges", {}).get("skipped_unreachable", 0) for s in summaries)
        parts.append(f"{unreachable:,} exchanges skipped, peer unreachable")
    if p.loss:
        times = [t for s in summaries if (t := s.get("exchange_seconds_median")) is not None]
        if times:
            parts.append(f"exchange median {1000 * statistics.median(times):.0f} ms")
    if dropped is not None and (p.loss or p.partition):
        parts.append(f"{dropped:,} packets dropped")
    return "; ".join(parts)


def _ratio(part: Sequence[int | None], rest: Sequence[int | None]) -> str:
    a, b = [g for g in part if g is not None], [g for g in rest if g is not None]
    if not a or not b or not statistics.median(b):
        return "?"
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


# ---------------------------------------------------------------------------- virtual time


def run_sim(p: Plan, n: int, duration: float) -> Row:
    """``p`` in virtual time: the node code on a memory network, a 4x4 torus for 16 nodes."""
    scenario = Scenario(
        link=LinkSpec(loss=p.loss),
        step_time=STEP_TIME,
        step_times={p.straggler[0]: STEP_TIME * p.straggler[1]} if p.straggler else {},
        crashes=tuple(Crash(i, down, back) for i, down, back in p.downs),
        partitions=(PartitionFault(*p.partition),) if p.partition else (),
    )
    options = SimOptions(
        topology=graphs.generate("torus", n, SEED),
        task=TASK,
        duration=duration,
        grad_rate=None,  # back to back: compute-bound nodes, so a straggler is slower
        gossip_rate=1.0,
        lr=0.1,
        seed=SEED,
        scenario=scenario,
    )
    started = _clock()
    summary = simulate(options, None)
    per_node = summary["per_node"]
    mean, worst = _accuracy([m.get("accuracy") for m in per_node])
    ok, lost = _count([m.get("exchanges", {}) for m in per_node])
    finished = all("accuracy" in m for m in per_node) and len(per_node) == n
    seen = evidence(p, per_node)
    return Row(
        "sim", p.fault, finished, mean, worst, ok, lost, None, seen, seconds=_clock() - started
    )


# ---------------------------------------------------------------------------- real processes

SUBNET = "198.18.0"
PORT = 7000
ENV = {
    "GOSSIPNODE_TASK": TASK,
    "GOSSIPNODE_SEED": str(SEED),
    "GOSSIPNODE_LISTEN": f"0.0.0.0:{PORT}",
    "GOSSIPNODE_DEGREE": "4",
    "GOSSIPNODE_GRAD_RATE": "10",
    "GOSSIPNODE_GOSSIP_RATE": "1",
    "GOSSIPNODE_LR": "0.1",
    "GOSSIPNODE_TORCH_THREADS": "1",
    "GOSSIPNODE_PROGRESS_EVERY": "5",
    "GOSSIPNODE_EXCHANGE_TIMEOUT": "2",
    "GOSSIPNODE_CHECKPOINT_EVERY": "2",
    "GOSSIPNODE_RESUME": "true",
    "GOSSIPNODE_DURATION": "0",  # until the suite stops it
    "GOSSIPNODE_LOG_LEVEL": "info",
}


def node_specs(n: int) -> list[NodeSpec]:
    """``n`` hosts on one subnet; the seeds are the first node of each half (so each half of a
    partition has one, and the halves find each other again through them)."""
    seeds = sorted({0, n // 2})
    address = [f"{SUBNET}.{10 + i}" for i in range(n)]
    return [
        NodeSpec(
            i,
            address[i],
            {
                "GOSSIPNODE_ID": str(i),
                "GOSSIPNODE_NUM_NODES": str(n),
                "GOSSIPNODE_ADVERTISE": f"{address[i]}:{PORT}",
                "GOSSIPNODE_PEERS": ",".join(f"{address[s]}:{PORT}" for s in seeds if s != i)
                or f"{address[1]}:{PORT}",
            },
        )
        for i in range(n)
    ]


def run_real(p: Plan, n: int, duration: float, out: Path, prefix: str = "gf") -> Row:
    """``p`` for real: ``n`` processes, each in its network namespace, faults injected live."""
    started = _clock()
    with NetnsCluster(prefix, node_specs(n), out, env=ENV) as cluster:
        if p.loss:
            for i in range(n):
                cluster.loss(i, 100 * p.loss)
        cluster.start_all()
        _wait_started(cluster, range(n))
        t0 = _clock()
        dropped = [0]  # by the partition, counted before healing removes its rules
        with _straggling(cluster, p.straggler):
            for at, action in _timeline(p, cluster, dropped):
                _sleep(max(0.0, t0 + at - _clock()))
                action()
            _sleep(max(0.0, t0 + duration - _clock()))
        if p.loss:
            dropped[0] += sum(cluster.dropped(i) for i in range(n))
        codes = cluster.stop_all(timeout=60)
        return _real_row(p, cluster, codes, dropped[0], _clock() - started)


def _timeline(
    p: Plan, cluster: NetnsCluster, dropped: list[int]
) -> list[tuple[float, Callable[[], None]]]:
    sig = signal.SIGTERM if p.graceful else signal.SIGKILL
    events: list[tuple[float, Callable[[], None]]] = []
    for i, down, back in p.downs:
        events.append((down, partial(cluster.kill, i, sig)))
        events.append((back, partial(_restart, cluster, i)))
    if p.partition:
        groups, start, end = p.partition

        def heal() -> None:
            dropped[0] += sum(cluster.dropped(i, netns.NFT_SPLIT) for i in cluster.nodes)
            cluster.heal()

        events += [(start, lambda: cluster.partition(groups)), (end, heal)]
    return sorted(events, key=lambda e: e[0])


def _restart(cluster: NetnsCluster, i: int) -> None:
    if cluster.wait(i, 30) is None:  # a leaving node saves first; 30 s is the compose grace
        cluster.kill(i, signal.SIGKILL)
        cluster.wait(i, netns.KILL_TIMEOUT)
    cluster.start(i)


def _wait_started(cluster: NetnsCluster, nodes: Sequence[int]) -> None:
    deadline = _clock() + START_TIMEOUT
    while not all(cluster.events(i) for i in nodes):
        dead = [i for i in nodes if not cluster.running(i)]
        if dead or _clock() > deadline:
            i = (dead or [i for i in nodes if not cluster.events(i)])[0]
            tail = cluster.log(i).read_text()[-2000:] if cluster.log(i).exists() else ""
            raise RuntimeError(
                f"node {i} did not start ({'exited' if dead else 'timeout'}):\n{tail}"
            )
        _sleep(1.0)


@contextmanager
def _straggling(cluster: NetnsCluster, straggler: tuple[int, float] | None) -> Iterator[None]:
    """Let the straggler run one part in ``slowdown`` of the time (SIGSTOP/SIGCONT)."""
    if straggler is None:
        yield
        return
    node, slowdown = straggler
    period, done = 0.5, threading.Event()

    def cycle() -> None:
        while not done.is_set():
            cluster.kill(node, signal.SIGCONT)
            _sleep(period / slowdown)
            if not done.is_set():
                cluster.kill(node, signal.SIGSTOP)
                done.wait(period * (1 - 1 / slowdown))
        cluster.kill(node, signal.SIGCONT)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _real_row(
    p: Plan, cluster: NetnsCluster, codes: dict[int, int | None], dropped: int, seconds: float
) -> Row:
    notes = []
    expected = -signal.SIGKILL if not p.graceful else 0
    for i, procs in cluster.procs.items():
        early = [q.returncode for q in procs[:-1]]
        if any(code != expected for code in early):
            notes.append(f"node {i}: an earlier process exited {early}, expected {expected}")
        restarts = len(procs) - 1
        if restarts and cluster.log(i).read_text().count("resuming from") < restarts:
            notes.append(f"node {i} was restarted {restarts}x but did not resume every time")
    results = [NodeResult.read(i, codes.get(i), cluster.out) for i in cluster.nodes]
    summaries = [r.summary or {} for r in results]
    mean, worst = _accuracy([s.get("accuracy") for s in summaries])
    ok, lost = _count([s.get("exchanges", {}) for s in summaries])
    present = [cluster.node_out(i) / checkpoint.FILE for i in cluster.nodes]
    present = [path for path in present if path.exists()]
    readable = sum(_readable(path) for path in present)
    if len(present) < len(cluster.nodes):
        notes.append(f"{len(cluster.nodes) - len(present)} node(s) left no checkpoint")
    finished = all(r.ok for r in results)
    seen = evidence(p, summaries, dropped)
    cps = (readable, len(present))
    return Row("real", p.fault, finished, mean, worst, ok, lost, cps, seen, seconds, notes)


def _readable(path: Path) -> bool:
    try:
        checkpoint.load(path)
    except checkpoint.CheckpointError:
        return False
    return True


# ---------------------------------------------------------------------------- the suite


def run_suite(
    modes: Sequence[str],
    faults: Sequence[str],
    *,
    n: int = 16,
    sim_duration: float = 120.0,
    real_duration: float = 120.0,
    out: Path,
    report: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """Every fault of ``faults`` in every mode, the fault-free run first; judged rows."""
    rows = []
    for mode in modes:
        baseline: Row | None = None
        for fault in ("none", *[f for f in faults if f != "none"]):
            if mode == "sim":
                row = run_sim(plan(fault, n, sim_duration), n, sim_duration)
            else:
                row = run_real(plan(fault, n, real_duration), n, real_duration, out / fault)
            row.broken = judge(row, baseline)
            baseline = baseline or row
            rows.append(row)
            report(row)
    return rows


def table(rows: Sequence[Row]) -> list[str]:
    """A markdown table of ``rows``; the accuracy difference is against each mode's first."""
    lines = [
        "| mode | fault | finished | accuracy mean (vs fault-free) | worst node | exchanges "
        "| lost | checkpoints | the fault took effect | invariants | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base: dict[str, float | None] = {}
    for r in rows:
        base.setdefault(r.mode, r.accuracy_mean)
        ref = base[r.mode]
        diff = f" ({r.accuracy_mean - ref:+.3f})" if r.accuracy_mean is not None and ref else ""
        cps = f"{r.checkpoints[0]}/{r.checkpoints[1]} readable" if r.checkpoints else "-"
        lines.append(
            f"| {r.mode} | {r.fault} | {'yes' if r.finished else 'NO'} | {_f(r.accuracy_mean)}"
            f"{diff} | {_f(r.accuracy_min)} | {r.exchanges:,} | {r.lost:,} | {cps} | "
            f"{r.evidence or '-'} | "
            f"{'hold' if not r.broken else 'BROKEN: ' + '; '.join(r.broken)} | {r.seconds:.0f} |"
        )
    return lines


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/faults", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("sim", "real", "both"), default="both")
    parser.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--sim-duration", type=float, default=120.0, help="virtual seconds")
    parser.add_argument("--real-duration", type=float, default=120.0, help="seconds of training")
    parser.add_argument("--out", type=Path, help="write faults.json and faults.md here")
    args = parser.parse_args(argv)
    if args.nodes < 4:
        parser.error(f"--nodes must be at least 4 (a quarter killed, halves), got {args.nodes}")
    for flag, seconds in (
        ("--sim-duration", args.sim_duration),
        ("--real-duration", args.real_duration),
    ):
        if seconds < MIN_DURATION:
            parser.error(
                f"{flag} must be at least {MIN_DURATION:g} s (the partition, {PARTITION:g} s, "
                f"starts at a fifth of the run and must end before it), got {seconds:g}"
            )
    modes = ["sim", "real"] if args.mode == "both" else [args.mode]
    reason = netns.unavailable("nft") if "real" in modes else None
    if reason:
        print(f"faults: real mode needs network namespaces: {reason}; or use --mode sim")
        return 2
    # The simulated nodes' warnings (peers unreachable while down, ...) are not the report.
    logging.basicConfig(level=logging.ERROR)
    done: list[Row] = []

    def report(row: Row) -> None:
        done.append(row)
        print(table(done)[-1], flush=True)

    with tempfile.TemporaryDirectory(prefix="gossipnode-faults-") as tmp:
        rows = run_suite(
            modes,
            args.only,
            n=args.nodes,
            sim_duration=args.sim_duration,
            real_duration=args.real_duration,
            out=Path(tmp),
            report=report,
        )
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faults.md").write_text("\n".join(lines) + "\n")
        data = [asdict(r) for r in rows]
        (args.out / "faults.json").write_text(json.dumps(data, indent=2) + "\n")
    broken = [r for r in rows if r.broken]
    for r in broken:
        print(f"BROKEN {r.mode} {r.fault}: {'; '.join(r.broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
