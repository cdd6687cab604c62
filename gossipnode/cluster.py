"""A local cluster of real ``gossipnode run`` processes on 127.0.0.1: start, watch, report.

``gossipnode cluster`` (the README's demo) and the integration tests use it. Each node is its
own process on its own port, neighbours on a ring, each writing its results to
``OUT/node-<i>/``; the report reads those files back, so what it prints is what the nodes
themselves saved.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from torch.nn.utils import vector_to_parameters

from gossipnode.credentials import write_key
from gossipnode.daemon import INITIAL_MODEL_FILE, MODEL_FILE, SUMMARY_FILE, load_model
from gossipnode.learner import consensus_distance
from gossipnode.tasks import load_task

GRACE = 30.0  # seconds a node may take beyond its duration to stop and save
KEY_FILE = "cluster.key"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ring(n: int) -> list[list[int]]:
    """Each node's neighbours on a ring of ``n``."""
    if n <= 2:
        return [[j for j in range(n) if j != i] for i in range(n)]
    return [[(i - 1) % n, (i + 1) % n] for i in range(n)]


def cluster_key(out: Path) -> Path:
    """The cluster key of the nodes writing to ``out``, made there the first time."""
    path = out / KEY_FILE
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_key(path)
    return path


def node_command(
    i: int, ports: Sequence[int], neighbours: Sequence[int], out: Path, options: dict[str, Any]
) -> list[str]:
    """The ``gossipnode run`` command line of node ``i``: a member by ``out``'s cluster key
    unless ``options`` say how else."""
    if not {"insecure", "cluster_key", "tls_cert"} & options.keys():
        options = {**options, "cluster_key": cluster_key(out)}
    cmd = [
        sys.executable,
        "-m",
        "gossipnode",
        "run",
        "--id",
        str(i),
        "--num-nodes",
        str(len(ports)),
        "--listen",
        f"127.0.0.1:{ports[i]}",
        "--out",
        str(out / f"node-{i}"),
    ]
    if neighbours:
        cmd += ["--peers", ",".join(f"127.0.0.1:{ports[j]}" for j in neighbours)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


@dataclass
class NodeResult:
    node: int
    exit_code: int | None
    summary: dict[str, Any] | None = None
    initial: torch.Tensor | None = None
    final: torch.Tensor | None = None

    @classmethod
    def read(cls, node: int, exit_code: int | None, out: Path) -> NodeResult:
        d = out / f"node-{node}"
        result = cls(node, exit_code)
        if (d / SUMMARY_FILE).exists():
            result.summary = json.loads((d / SUMMARY_FILE).read_text())
        if (d / INITIAL_MODEL_FILE).exists():
            result.initial = load_model(d / INITIAL_MODEL_FILE)
        if (d / MODEL_FILE).exists():
            result.final = load_model(d / MODEL_FILE)
        return result

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.summary is not None and self.final is not None


@dataclass
class ClusterReport:
    results: list[NodeResult]
    start_distance: float | None = None
    end_distance: float | None = None
    average_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        return [r.node for r in self.results if not r.ok]

    def lines(self) -> list[str]:
        rows = ["node  exit  accuracy  loss      gradients  applied  sent MB"]
        for r in self.results:
            s = r.summary or {}
            rows.append(
                f"{r.node:<5d} {r.exit_code!s:<5} {_fmt(s.get('accuracy')):<9} "
                f"{_fmt(s.get('loss')):<9} {s.get('gradients', '-')!s:<10} "
                f"{s.get('mixes', '-')!s:<8} {_fmt(s.get('bytes_sent', 0) / 1e6)}"
            )
        if self.start_distance is not None and self.end_distance is not None:
            ratio = self.start_distance / max(self.end_distance, 1e-300)
            rows.append(
                f"consensus distance (mean squared distance to the average model): "
                f"{self.start_distance:.3g} at start, {self.end_distance:.3g} at the end "
                f"({ratio:.3g}x smaller)"
            )
        if self.average_metrics:
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in self.average_metrics.items())
            rows.append(f"the average of the final models: {metrics}")
        return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float | int) else "-"


def report(results: list[NodeResult], task: str, seed: int) -> ClusterReport:
    """Consensus distances and the average model's metrics from the nodes' saved files."""
    rep = ClusterReport(results)
    initial = [r.initial for r in results if r.initial is not None]
    final = [r.final for r in results if r.final is not None]
    if len(initial) == len(results):
        rep.start_distance = consensus_distance(initial)
    if len(final) == len(results):
        rep.end_distance = consensus_distance(final)
        built = load_task(task, seed=seed, num_nodes=len(results))
        model = built.make_model(0)
        mean = torch.stack(final).mean(0)
        vector_to_parameters(mean.to(next(model.parameters()).dtype), model.parameters())
        model.eval()
        with torch.no_grad():
            rep.average_metrics = built.evaluate(model)
    return rep


async def start_nodes(
    n: int, out: Path, options: dict[str, Any], *, stdout: Any = None
) -> list[trio.Process]:
    """Start ``n`` nodes on a ring on 127.0.0.1, writing to ``out/node-<i>``."""
    ports = free_ports(n)
    neighbours = ring(n)
    return [
        await trio.lowlevel.open_process(
            node_command(i, ports, neighbours[i], out, options),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
        )
        for i in range(n)
    ]


async def wait_all(procs: Sequence[trio.Process], deadline: float) -> list[int | None]:
    """Wait for every process, SIGKILLing any still running at ``deadline``; exit codes."""
    with trio.move_on_at(deadline):
        for proc in procs:
            await proc.wait()
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return [proc.returncode for proc in procs]


async def run_local_cluster(
    *,
    nodes: int,
    duration: float,
    task: str,
    gossip_rate: float,
    grad_rate: float,
    seed: int,
    out: Path | None,
    print_line: Callable[[str], None] = print,
) -> ClusterReport:
    """Run a ring of ``nodes`` processes for ``duration`` seconds and print the report.

    SIGINT or SIGTERM stops the nodes early (they save their results and the report follows).
    """
    with tempfile.TemporaryDirectory(prefix="gossipnode-cluster-") as tmp:
        out_dir = out or Path(tmp)
        options = {
            "task": task,
            "duration": duration,
            "seed": seed,
            "gossip_rate": gossip_rate,
            "grad_rate": grad_rate,
            "torch_threads": 1,
        }
        print_line(
            f"starting {nodes} nodes on a ring on 127.0.0.1 for {duration:g}s "
            f"({task}, gossip {gossip_rate:g}/s per edge, {grad_rate:g} gradients/s)"
        )
        procs = await start_nodes(nodes, out_dir, options)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_signals, procs)
            codes = await wait_all(procs, trio.current_time() + duration + GRACE)
            nursery.cancel_scope.cancel()
        results = [NodeResult.read(i, code, out_dir) for i, code in enumerate(codes)]
        rep = report(results, task, seed)
    for line in rep.lines():
        print_line(line)
    if out is not None:
        print_line(f"results of each node are in {out}/node-<i>/")
    return rep


async def _forward_signals(procs: Sequence[trio.Process]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
