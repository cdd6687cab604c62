"""A real node SIGKILLed again and again, often while writing its checkpoint, resumes each time."""

from __future__ import annotations

import json
import random
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from gossipnode import checkpoint
from gossipnode.cluster import NodeResult, free_ports, node_command, wait_all

from .helpers import eventually

pytestmark = pytest.mark.integration

OPTIONS = {
    "task": "digits",
    "grad_rate": 50,
    "gossip_rate": 4,
    "torch_threads": 1,
    "progress_every": 0,
    "seed": 1,
    "checkpoint_every": 0.05,  # writing nearly all the time: kills land mid-write
}


async def start(i: int, ports: list[int], out: Path, **options: object) -> trio.Process:
    cmd = node_command(i, ports, [1 - i], out, {**OPTIONS, **options})
    with (out / f"node-{i}.log").open("ab") as log:
        return await trio.lowlevel.open_process(cmd, stdout=log, stderr=subprocess.STDOUT)


def rewritten(path: Path, since: int) -> bool:
    return path.exists() and path.stat().st_mtime_ns != since


async def test_a_node_killed_during_checkpoints_resumes_every_time(tmp_path: Path) -> None:
    ports = free_ports(2)
    path = tmp_path / "node-0" / checkpoint.FILE
    rng = random.Random(0)
    procs = [await start(1, ports, tmp_path, duration=0)]
    steps = []
    try:
        for _ in range(4):
            written = path.stat().st_mtime_ns if path.exists() else 0
            node = await start(0, ports, tmp_path, duration=0, resume=True)
            procs.append(node)
            # Once this incarnation has written a checkpoint of its own, it is up and running.
            assert await eventually(partial(rewritten, path, written), 90, poll=0.05)
            await trio.sleep(1 + rng.random())
            node.kill()
            await node.wait()
            steps.append(checkpoint.load(path).meta["stats"]["gradients"])  # never torn
        last = await start(0, ports, tmp_path, duration=5, resume=True)
        procs.append(last)
        codes = await wait_all([last], trio.current_time() + 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        await wait_all(procs, trio.current_time() + 10)
    log = (tmp_path / "node-0.log").read_text()
    assert codes == [0], log
    assert steps == sorted(steps), steps  # the step counter never goes back
    assert steps[0] > 20, steps
    summary = NodeResult.read(0, 0, tmp_path).summary
    assert summary is not None
    assert summary["gradients"] > steps[-1] + 100, (summary, steps)
    assert summary["accuracy"] > 0.8, summary  # it went on training, not from scratch
    assert log.count("resuming from") == 4, log
    events = (tmp_path / "node-0" / "events.jsonl").read_text().splitlines()
    assert json.loads(events[-1]) == {"event": "summary", **summary}  # the JSONL event log
