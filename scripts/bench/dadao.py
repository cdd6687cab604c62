"""DADAO in simulation: its rate against Theorem 4 and gossip SGD, planned rates, star scaling.

    .venv/bin/python scripts/bench/dadao.py [--out benchmarks] [--quick]

1. linreg, n = 16, complete graph and cycle, L/mu about 2 and about 200: DADAO and gossip SGD
   (constant step 1/(2L)) with the same gradient clock (1 per node per time unit) and the same
   DADAO-normalised uniform edge rates. Reports DADAO's log-error slope per time unit against
   Theorem 4's bound, the time, gradients and exchanges to 1e-8, and gossip SGD's floor; plots
   error vs gradients and vs exchanges.
2. Barbell K10-K10 at equal total rate: exchanges for DADAO to reach 1e-6 with planned rates
   (gossipnode plan) and with uniform ones (the baseline).
3. Stars, n = 10..300 (dadao.md Fig. 5, Table 2): decay per time unit and exchanges per time unit
   against sqrt(2) n.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from gossipnode import planner
from gossipnode.dadao import Parameters
from gossipnode.graphs import from_spec
from gossipnode.sim import SimOptions, simulate
from gossipnode.tasks import LinReg
from gossipnode.topology import Topology


def normalised(topo: Topology) -> Topology:
    m = len(topo.edges)
    chi1, chi2 = topo.chis(1.0 / m)
    return topo.with_rates(dict.fromkeys(topo.edges, math.sqrt(2 * chi1 * chi2) / m))


def run(
    topo: Topology, task: str, algorithm: str, duration: float, **changes: Any
) -> list[dict[str, Any]]:
    options = SimOptions(
        topo,
        task=task,
        algorithm=algorithm,
        duration=duration,
        grad_rate=1.0,
        batch_size=0,
        init="shared",
        sample_every=duration / 100,
        **changes,
    )
    with tempfile.TemporaryDirectory() as tmp:
        simulate(options, Path(tmp))
        lines = (Path(tmp) / "trace.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"event":"sample"' in x]


def first_below(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((p for p in points if p["mean"]["error"] < target), None)


def decay(points: list[dict[str, Any]], low: float = 1e-9) -> float:
    """The slope of log(error) per time unit from the 10% point to the last sample above low."""
    usable = [p for p in points[len(points) // 10 :] if p["mean"]["error"] > low]
    a, b = usable[0], usable[-1]
    drop = math.log(a["mean"]["error"]) - math.log(b["mean"]["error"])
    return drop / float(b["t"] - a["t"])


def convergence(out: Path, quick: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        "| graph | L/mu | Theorem 4 bound | DADAO decay | units to 1e-8 | gradients | "
        "exchanges | gossip SGD error at the end |",
        "| --- " * 8 + "|",
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for col, (graph, kappa, duration) in enumerate(
        [
            ("complete:16", 1, 250.0),
            ("ring:16", 1, 250.0),
            ("complete:16", 120, 1800.0),
            ("ring:16", 120, 1800.0),
        ]
    ):
        if quick:
            duration /= 3
        task = f"linreg(kappa={kappa})"
        lin = LinReg(seed=0, num_nodes=16, kappa=kappa)
        topo = normalised(from_spec(graph))
        dadao = run(topo, task, "dadao", duration)
        gossip = run(topo, task, "gossip", duration, lr=0.5 / lin.L)
        bound = Parameters(lin.mu, lin.L, 1.0, 0.5).rate
        hit = first_below(dadao, 1e-8)
        rows.append(
            f"| {graph} | {lin.L / lin.mu:.0f} | {bound:.4f} | {decay(dadao):.4f} | "
            + (
                f"{hit['t']:.0f} | {hit['gradients']} | {hit['exchanges']}"
                if hit
                else "not reached | - | -"
            )
            + f" | {gossip[-1]['mean']['error']:.2e} |"
        )
        print(rows[-1], flush=True)
        for row, axis in enumerate(("gradients", "exchanges")):
            ax = axes[row, col]
            for name, points in (("DADAO", dadao), ("gossip SGD", gossip)):
                ax.semilogy(
                    [p[axis] for p in points], [p["mean"]["error"] for p in points], label=name
                )
            ax.set_title(f"{graph}, L/mu = {lin.L / lin.mu:.0f}")
            ax.set_xlabel(f"{axis} (all nodes)")
            ax.set_ylabel("relative error |x - x*|^2 / |x*|^2")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dadao-vs-gossip.png", dpi=80)
    return rows


def barbell(quick: bool) -> list[str]:
    topo = from_spec("barbell:20")
    plan = planner.plan(topo, 1.0)
    total = plan.figures.objective  # so the planned rates sit at chi_1 chi_2 = 1/2
    planned = topo.with_rates(dict(zip(topo.edges, plan.weights * total, strict=True)))
    uniform = topo.with_rates(dict.fromkeys(topo.edges, total / len(topo.edges)))
    rows = [
        "| rates | total rate | sqrt(2 chi_1 chi_2) | units to 1e-6 | exchanges to 1e-6 |",
        "| --- | --- | --- | --- | --- |",
    ]
    reached = {}
    for name, rated, duration in (("planned", planned, 300.0), ("uniform", uniform, 1200.0)):
        points = run(rated, "linreg", "dadao", duration / (2 if quick else 1))
        hit = first_below(points, 1e-6)
        figures = planner.figures(rated, rated.rate_vector(0.0))
        reached[name] = hit["exchanges"] if hit else math.inf
        rows.append(
            f"| {name} | {total:.2f} | {figures.objective:.2f} | "
            + (f"{hit['t']:.0f} | {hit['exchanges']} |" if hit else "- | - |")
        )
        print(rows[-1], flush=True)
    rows.append(f"\nUniform needs {reached['uniform'] / reached['planned']:.1f}x the exchanges.")
    return rows


def stars(quick: bool) -> list[str]:
    rows = [
        "| n | DADAO decay per time unit | exchanges per time unit | sqrt(2) n | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in (10, 30, 100) if quick else (10, 30, 100, 300):
        topo = normalised(from_spec(f"star:{n}"))
        duration = 150.0
        points = run(topo, "linreg", "dadao", duration)
        per_unit = points[-1]["exchanges"] / points[-1]["t"]
        rows.append(
            f"| {n} | {decay(points):.4f} | {per_unit:.1f} | {math.sqrt(2) * n:.1f} | "
            f"{per_unit / (math.sqrt(2) * n):.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer stars")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = [
        "## convergence",
        *convergence(args.out, args.quick),
        "",
        "## barbell",
        *barbell(args.quick),
        "",
        "## stars",
        *stars(args.quick),
    ]
    (args.out / "dadao.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
