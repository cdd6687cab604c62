"""Memory per node: RSS and PSS of 1, 8 and 32 real ``gossipnode run`` processes on one machine.

    .venv/bin/python scripts/bench/memory.py [--sizes 1 8 32] [--seconds 20] [--out benchmarks]

Each size starts that many nodes on a ring on 127.0.0.1 (digits MLP, 5 gradients/s, gossip 1/s
per edge, one torch thread, membership on, a cluster key), lets them run ``--seconds`` after the
last one has printed progress, then reads every node's VmRSS (/proc/PID/status) and Pss
(/proc/PID/smaps_rollup: shared pages divided among the processes sharing them, so PSS is what
one more node costs this machine) and stops them. The baseline in the same run is a bare
``python -c "import torch, gossipnode.node"`` process: what any torch process costs before it
holds a model. Prints the medians and writes memory.json and memory.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gossipnode.cluster import free_ports, node_command, ring

OPTIONS = {
    "task": "digits",
    "grad_rate": 5,
    "gossip_rate": 1,
    "torch_threads": 1,
    "progress_every": 1,
    "duration": 0,  # until stopped
}


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of process ``pid`` in MB."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def baseline() -> tuple[float, float]:
    code = "import sys, torch, gossipnode.node; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return memory_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)


def cluster(n: int, seconds: float) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="gossipnode-memory-") as tmp:
        out = Path(tmp)
        ports = free_ports(n)
        neighbours = ring(n)
        procs = []
        try:
            for i in range(n):
                cmd = node_command(i, ports, neighbours[i], out, OPTIONS)
                with (out / f"node-{i}.log").open("wb") as log:
                    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 60 + 5 * n  # start-up: torch imports on shared cores
            while not all("grads=" in (out / f"node-{i}.log").read_text() for i in range(n)):
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    tail = (out / f"node-{(dead or [0])[0]}.log").read_text()[-2000:]
                    raise RuntimeError(f"{n} nodes did not all start: {tail}")
                time.sleep(1)
            time.sleep(seconds)
            return [memory_mb(p.pid) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    base_rss, base_pss = baseline()
    print(f"baseline (python, torch, gossipnode): RSS {base_rss:.0f} MB, PSS {base_pss:.0f} MB")
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        mem = cluster(n, args.seconds)
        rss = [m[0] for m in mem]
        pss = [m[1] for m in mem]
        row = {
            "nodes": n,
            "rss_median": statistics.median(rss),
            "rss_max": max(rss),
            "pss_median": statistics.median(pss),
            "pss_total": sum(pss),
        }
        rows.append(row)
        print(
            f"{n:>3} nodes: RSS median {row['rss_median']:.0f} MB (max {row['rss_max']:.0f}), "
            f"PSS median {row['pss_median']:.0f} MB, all nodes {row['pss_total']:.0f} MB "
            f"(PSS / baseline {row['pss_median'] / base_pss:.2f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"baseline": {"rss": base_rss, "pss": base_pss}, "options": OPTIONS, "rows": rows}
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| nodes | RSS median MB | RSS max MB | PSS median MB | PSS all MB | PSS / baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['nodes']} | {r['rss_median']:.0f} | {r['rss_max']:.0f} | {r['pss_median']:.0f} | "
        f"{r['pss_total']:.0f} | {r['pss_median'] / base_pss:.2f} |"
        for r in rows
    ]
    lines.append(
        f"\nBaseline (python + torch + gossipnode imported): RSS {base_rss:.0f} MB, "
        f"PSS {base_pss:.0f} MB."
    )
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
