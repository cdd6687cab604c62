"""``gossipnode merge`` against four real ``gossipnode run`` processes while they train."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
from typer.testing import CliRunner

from gossipnode.cli import app
from gossipnode.cluster import cluster_key, free_ports, node_command, ring, wait_all
from gossipnode.daemon import MERGED_MODEL_FILE, MODEL_FILE
from gossipnode.learner import flat_buffers, flatten
from gossipnode.tasks import load_task

from .test_integration import Watch, trained_or_exited

pytestmark = pytest.mark.integration

N = 4
TASK = "digits(model=cnn)"  # BatchNorm: the merge must re-estimate its statistics
OPTIONS = {
    "task": TASK,
    "num_nodes": N,
    "grad_rate": 20,
    "gossip_rate": 4,
    "torch_threads": 1,
    "progress_every": 1,
    "json": True,
    "seed": 1,
    "init": "shared",  # mergeable from the start, so a few seconds of training suffice
}


def merge_command(ports: list[int], out: Path, *extra: str) -> list[str]:
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    key = ["--cluster-key", str(cluster_key(out))]
    return [sys.executable, "-m", "gossipnode", "merge", "--peers", peers, *key, *extra]


async def test_merge_a_running_ring_of_four(tmp_path: Path) -> None:
    ports = free_ports(N)
    neighbours = ring(N)
    procs = [
        await trio.lowlevel.open_process(
            node_command(i, ports, neighbours[i], tmp_path, OPTIONS),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(N)
    ]
    watch = Watch(N)
    try:
        with trio.fail_after(58):  # mostly start-up: importing torch is slow on a busy machine
            async with trio.open_nursery() as nursery:
                for i, proc in enumerate(procs):
                    nursery.start_soon(watch.read, i, proc)
                trained = await trained_or_exited(
                    lambda: all(p.get("elapsed", 0) > 2 for p in watch.latest), procs, seconds=40
                )
                assert trained, watch.dump()
                as_json = await trio.run_process(
                    merge_command(ports, tmp_path, "--json", "--timeout", "10"),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                # Again as a table, in this process (no second start-up of torch).
                peers = ",".join(f"127.0.0.1:{port}" for port in ports)
                key = {"GOSSIPNODE_CLUSTER_KEY": str(cluster_key(tmp_path))}
                as_table = await trio.to_thread.run_sync(
                    lambda: CliRunner().invoke(
                        app, ["merge", "--peers", peers, "--timeout", "10"], env=key
                    )
                )
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                codes = await wait_all(procs, trio.current_time() + 15)
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert as_json.returncode == 0, as_json.stderr.decode()
    report = json.loads(as_json.stdout)
    assert report["ok"]
    assert report["merged_nodes"] == N
    assert [n["node"] for n in report["nodes"]] == list(range(N))
    for n in report["nodes"]:
        assert n["error"] is None
        assert 0.3 < n["merged"]["accuracy"] <= 1.0, n
        assert 0.0 <= n["local"]["accuracy"] <= 1.0, n
        assert Path(n["saved"]) == (tmp_path / f"node-{n['node']}" / MERGED_MODEL_FILE).absolute()
    assert report["mean"]["merged"]["accuracy"] > 0.3

    assert as_table.exit_code == 0, as_table.stderr
    table = as_table.stdout
    assert "local accuracy" in table
    assert "merged accuracy" in table
    assert f"merged {N} of {N} nodes" in table

    assert codes == [0] * N, watch.dump()
    # Each node kept both models: its own, and the merged one (the second merge's).
    digits = load_task(TASK, seed=1, num_nodes=N)
    merged = []
    for i in range(N):
        state = torch.load(tmp_path / f"node-{i}" / MERGED_MODEL_FILE, weights_only=True)
        model = digits.make_model(0)
        model.load_state_dict(state)
        merged.append(model)
        assert (tmp_path / f"node-{i}" / MODEL_FILE).exists()
    for model in merged[1:]:
        assert torch.equal(flatten(model), flatten(merged[0]))  # one average everywhere
    # ... with BatchNorm statistics of each node's own data.
    assert not torch.equal(flat_buffers(merged[0]), flat_buffers(merged[1]))
    # A merge client is not a neighbour: no node saw a "restart" or refused anyone.
    assert not any(
        "restarted" in line or "dropping" in line for out in watch.output for line in out
    )
