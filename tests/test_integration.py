"""Real ``gossipnode run`` processes on a ring on 127.0.0.1 (bounded in time; all stopped)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from gossipnode.cluster import NodeResult, start_nodes, wait_all
from gossipnode.learner import consensus_distance

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
