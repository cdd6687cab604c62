"""Real ``gossipnode run`` processes on a ring on 127.0.0.1 (bounded in time; all stopped)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from gossipnode.cluster import NodeResult, cluster_key, free_ports, start_nodes, wait_all
from gossipnode.graphs import generate
from gossipnode.learner import consensus_distance
from gossipnode.topology import Topology, save

from .helpers import eventually

pytestmark = pytest.mark.integration

OPTIONS = {
    "task": "digits",
    "grad_rate": 50,
    "gossip_rate": 8,
    "torch_threads": 1,
    "progress_every": 1,
    "json": True,
    "seed": 1,
}


class Watch:
    """Reads the nodes' JSON lines; keeps each node's latest progress and all output."""

    def __init__(self, n: int) -> None:
        self.latest: list[dict[str, Any]] = [{} for _ in range(n)]
        self.output: list[list[str]] = [[] for _ in range(n)]

    async def read(self, i: int, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buffer = b""
        async for chunk in proc.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.output[i].append(text)
                if text.startswith("{"):
                    event = json.loads(text)
                    if event["event"] == "progress":
                        self.latest[i] = event

    def dump(self) -> str:
        return "\n".join(f"[{i}] {line}" for i, out in enumerate(self.output) for line in out)


async def trained_or_exited(condition: Any, procs: list[trio.Process], seconds: float) -> bool:
    """Whether ``condition`` holds before ``seconds`` pass or any node exits."""
    stop = lambda: condition() or any(p.returncode is not None for p in procs)  # noqa: E731
    return await eventually(stop, seconds, poll=0.5) and bool(condition())


def options(**changes: Any) -> dict[str, Any]:
    return {**OPTIONS, **changes}


async def test_a_ring_of_four_trains_to_consensus_and_stops_on_sigterm(tmp_path: Path) -> None:
    procs = await start_nodes(4, tmp_path, options(duration=0), stdout=subprocess.PIPE)
    watch = Watch(4)
    try:
        async with trio.open_nursery() as nursery:
            for i, proc in enumerate(procs):
                nursery.start_soon(watch.read, i, proc)
            trained = await trained_or_exited(
                lambda: all(
                    p.get("accuracy", 0) > 0.92 and p["elapsed"] > 30 for p in watch.latest
                ),
                procs,
                seconds=120,
            )
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            codes = await wait_all(procs, trio.current_time() + 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    assert trained, watch.dump()
    assert codes == [0, 0, 0, 0], watch.dump()
    results = [NodeResult.read(i, code, tmp_path) for i, code in enumerate(codes)]
    for r in results:
        assert r.summary is not None
        assert r.summary["accuracy"] > 0.85, r.summary
        assert r.summary["exchanges"]["ok"] > 10, r.summary
        # Only while the nodes stop, one after another, can an exchange fail.
        assert r.summary["exchanges"]["failed"] <= 4, r.summary
    start = consensus_distance([r.initial for r in results if r.initial is not None])
    end = consensus_distance([r.final for r in results if r.final is not None])
    assert end < start / 10, (start, end)


# Slow-marked to keep the default suite under ten minutes: test_node's crashed-neighbour test
# (virtual time) and test_netns's SIGKILL test (real processes, as root) cover it.
@pytest.mark.slow
async def test_the_others_train_on_when_a_node_is_killed(tmp_path: Path) -> None:
    procs = await start_nodes(4, tmp_path, options(duration=20), stdout=subprocess.PIPE)
    watch = Watch(4)
    try:
        async with trio.open_nursery() as nursery:
            for i, proc in enumerate(procs):
                nursery.start_soon(watch.read, i, proc)
            started = await trained_or_exited(lambda: all(watch.latest), procs, seconds=60)
            await trio.sleep(3)
            procs[2].kill()  # SIGKILL: no goodbye
            codes = await wait_all(procs, trio.current_time() + 80)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    assert started, watch.dump()
    assert codes[2] == -signal.SIGKILL
    assert [codes[i] for i in (0, 1, 3)] == [0, 0, 0], watch.dump()
    results = {i: NodeResult.read(i, codes[i], tmp_path) for i in (0, 1, 3)}
    for i, r in results.items():
        assert r.summary is not None
        assert r.summary["gradients"] > 0.7 * 50 * 20, (i, r.summary)
        assert r.summary["accuracy"] > 0.7, (i, r.summary)
    for i in (1, 3):  # the dead node's neighbours noticed, and carried on
        lost = results[i].summary["exchanges"]  # type: ignore[index]
        assert lost["skipped_unreachable"] + lost["failed"] + lost["timed_out"] > 0
        assert lost["ok"] > 0


def dadao_ring(tmp_path: Path, n: int, grad_rate: float) -> tuple[Path, list[int]]:
    """A ring topology on free ports with DADAO-normalised uniform rates (per second)."""
    ports = free_ports(n)
    ring = generate("ring", n)
    m = len(ring.edges)
    chi1, chi2 = ring.chis(1.0 / m)
    per_edge = math.sqrt(2 * chi1 * chi2) / m * grad_rate  # per time unit -> per second
    topo = Topology(
        n,
        ring.edges,
        dict.fromkeys(ring.edges, per_edge),
        {i: f"127.0.0.1:{ports[i]}" for i in range(n)},
    )
    path = tmp_path / "ring.json"
    save(topo, path)
    return path, ports


def dadao_command(i: int, topo: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gossipnode",
        "run",
        "--id",
        str(i),
        "--topology",
        str(topo),
        "--algorithm",
        "dadao",
        "--task",
        "linreg",
        "--batch-size",
        "0",
        "--grad-rate",
        "10",
        "--torch-threads",
        "1",
        "--progress-every",
        "1",
        "--json",
        "--cluster-key",
        str(cluster_key(out)),
        "--out",
        str(out / f"node-{i}"),
    ]


@pytest.mark.parametrize("restart", [False, True], ids=["steady", "one-node-killed-and-restarted"])
async def test_dadao_nodes_reach_1e_6_over_tcp(tmp_path: Path, restart: bool) -> None:
    n = 8
    topo, _ = dadao_ring(tmp_path, n, grad_rate=10.0)
    procs = [
        await trio.lowlevel.open_process(
            dadao_command(i, topo, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for i in range(n)
    ]
    watch = Watch(n)
    try:
        async with trio.open_nursery() as nursery:
            for i, proc in enumerate(procs):
                nursery.start_soon(watch.read, i, proc)
            if restart:  # once everyone runs and has gossiped a little
                assert await trained_or_exited(lambda: all(watch.latest), procs, seconds=60)
                await trio.sleep(3)
                procs[3].kill()
                await procs[3].wait()
                await trio.sleep(2)
                procs[3] = await trio.lowlevel.open_process(
                    dadao_command(3, topo, tmp_path),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                watch.latest[3] = {}
                nursery.start_soon(watch.read, 3, procs[3])
            converged = await trained_or_exited(
                lambda: all(p.get("error", 1.0) < 1e-6 for p in watch.latest), procs, seconds=150
            )
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            codes = await wait_all(procs, trio.current_time() + 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    assert converged, watch.dump()
    assert codes == [0] * n, watch.dump()
    for i in range(n):
        summary = NodeResult.read(i, codes[i], tmp_path).summary
        assert summary is not None
        assert summary["error"] < 1e-6, (i, summary)
    if restart:
        assert any(
            "node 3 restarted; resetting the edge" in line
            for line in watch.output[2] + watch.output[4]
        ), watch.dump()
