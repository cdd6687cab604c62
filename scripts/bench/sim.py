"""Simulator scale: hundreds to a thousand real nodes in virtual time, on one core.

    .venv/bin/python scripts/bench/sim.py [--sizes 256 1000] [--seconds 100] [--graph torus]

For each size, one ``gossipnode simulate``-equivalent run (logreg, gossip, one gradient and
about one initiated exchange per node per virtual second, trace written to a temporary
directory), in a fresh process so peak memory is per run. Prints wall time, events (gradients
+ exchanges) per wall-second, the speed-up over real time (virtual s / wall s: the baseline
is running the same nodes for real, where it is 1) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def graph_for(kind: str, n: int) -> str:
    if kind == "torus":
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        return f"torus:{rows}x{n // rows}"
    return f"{kind}:{n}"


def one_run(n: int, seconds: float, kind: str) -> dict[str, Any]:
    """Run in this process (called in a child) and return the figures."""
    from gossipnode.graphs import from_spec
    from gossipnode.sim import SimOptions, simulate

    options = SimOptions(
        from_spec(graph_for(kind, n)),
        task="logreg",
        duration=seconds,
        grad_rate=1.0,
        gossip_rate=1.0,
        batch_size=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(options, Path(tmp))
        trace_mb = (Path(tmp) / "trace.jsonl").stat().st_size / 1e6
    return {
        "nodes": n,
        "graph": graph_for(kind, n),
        "virtual_seconds": seconds,
        "wall_seconds": summary["wall_seconds"],
        "events": summary["events"],
        "events_per_wall_second": summary["events_per_wall_second"],
        "speedup_over_real_time": seconds / summary["wall_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trace_mb": trace_mb,
        "consensus_distance": summary["consensus_distance"],
        "mean_suboptimality": summary["mean"]["suboptimality"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--graph", default="torus", help="ring, torus, complete, star ...")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child, args.seconds, args.graph)))
        return

    results = []
    for n in args.sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--seconds",
                str(args.seconds),
                "--graph",
                args.graph,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{r['nodes']:5d} nodes ({r['graph']}), {r['virtual_seconds']:g} virtual s: "
            f"{r['wall_seconds']:.1f} s wall, {r['events']} events, "
            f"{r['events_per_wall_second']:.0f} events/s, "
            f"{r['speedup_over_real_time']:.1f}x real time, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"trace {r['trace_mb']:.1f} MB"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
