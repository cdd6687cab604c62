"""Planner scale: solve time and objective vs n, SDP and first-order, on random geometric graphs.

    .venv/bin/python scripts/bench/plan.py [--sizes 16 32 48 64 100 200 500] [--sdp-max 100]

For each n, a random geometric graph (seed 1, radius grown until connected), planned under the
global budget with the SDP (Clarabel; up to --sdp-max nodes) and with the first-order method.
The baseline is uniform rates at the same budget: "gain" is how much lower the planned
sqrt(2 chi_1 chi_2) is. "gap" is the first-order objective relative to the SDP's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gossipnode import planner
from gossipnode.graphs import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64, 100, 200, 500])
    parser.add_argument("--sdp-max", type=int, default=100)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    print("    n  edges  uniform    sdp (s)             first-order (s)       gap     gain")
    for n in args.sizes:
        topo = generate("random-geometric", n, seed=1)
        row: dict[str, Any] = {"n": n, "edges": len(topo.edges)}
        first = planner.plan(topo, 1.0, method="first-order")
        row |= {
            "uniform": first.uniform.objective,
            "first_order": first.figures.objective,
            "first_order_s": first.seconds,
        }
        sdp_text = "-"
        if n <= args.sdp_max:
            sdp = planner.plan(topo, 1.0, method="sdp")
            row |= {
                "sdp": sdp.figures.objective,
                "sdp_s": sdp.seconds,
                "gap": first.figures.objective / sdp.figures.objective - 1,
            }
            sdp_text = f"{sdp.figures.objective:9.2f} ({sdp.seconds:6.1f})"
        best = row.get("sdp", first.figures.objective)
        gap = f"{row['gap']:+.4%}" if "gap" in row else "-"
        print(
            f"{n:5d} {row['edges']:6d} {row['uniform']:8.1f}  {sdp_text:>20}  "
            f"{first.figures.objective:9.2f} ({first.seconds:6.1f})  {gap:>9}  "
            f"{row['uniform'] / best:5.2f}x",
            flush=True,
        )
        rows.append(row)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
