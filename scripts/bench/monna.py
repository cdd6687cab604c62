"""MoNNA under Byzantine attack, in simulation (mixing.md section 2.5).

    .venv/bin/python scripts/bench/monna.py [--out benchmarks] [--seeds 1 2 3] [--quick]

digits (Dirichlet(1) over the 10 nodes, the 64-64-10 MLP, batch 25), n = 10 on the complete
graph (everyone hears everyone), nodes 8 and 9 Byzantine. Every node takes one gradient step
per virtual second for 600 s with gamma_t = 0.5 / (1 + floor(t / 50)) and L2 1e-4; every edge
exchanges models at 2 per second, so each node's cache holds every neighbour's latest model.
Rules: plain averaging (MoNNA's update with b = 0, momentum 0.99), MoNNA (b = 2, momentum 0.99)
and NNA (b = 2, no momentum). Attacks: none (nodes 8 and 9 honest), sign flipping, ALIE and
FOE (line-searched against the rule in use), label flipping. The figure is the mean final test
accuracy of the 8 honest nodes; writes benchmarks/monna.md and benchmarks/monna.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from gossipnode.graphs import from_spec
from gossipnode.scenario import Byzantine, Scenario
from gossipnode.sim import SimOptions, simulate

ATTACKS = ("none", "sign-flip", "alie", "foe", "label-flip")
RULES = {  # name -> (byzantine budget, momentum)
    "plain averaging": (0, 0.99),
    "MoNNA": (2, 0.99),
    "NNA": (2, 0.0),
}
BYZANTINE = (8, 9)


def run(attack: str, rule: str, seed: int, steps: float) -> dict[str, Any]:
    budget, momentum = RULES[rule]
    byzantine = () if attack == "none" else tuple(Byzantine(i, attack) for i in BYZANTINE)
    options = SimOptions(
        topology=from_spec("complete:10", seed),
        task="digits(alpha=1)",
        algorithm="monna",
        duration=steps,
        seed=seed,
        grad_rate=1.0,
        gossip_rate=2.0,
        lr=0.5,
        batch_size=25,
        init="shared",
        node_options={"byzantine_budget": budget, "momentum": momentum},
        scenario=Scenario(byzantine=byzantine),
        sample_every=steps / 10,
    )
    started = time.perf_counter()
    summary = simulate(options, None)
    honest = [m for m in summary["per_node"] if m["node"] not in BYZANTINE]
    return {
        "attack": attack,
        "rule": rule,
        "seed": seed,
        "accuracy": statistics.fmean(m["accuracy"] for m in honest),
        "worst": min(m["accuracy"] for m in honest),
        "rejected": summary["outcomes"]["rejected"],
        "wall": time.perf_counter() - started,
    }


def table(results: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    def cell(attack: str, rule: str) -> str:
        accs = [r["accuracy"] for r in results if r["attack"] == attack and r["rule"] == rule]
        if not accs:
            return "-"
        spread = f" ({min(accs) * 100:.1f}-{max(accs) * 100:.1f})" if len(accs) > 1 else ""
        return f"{statistics.median(accs) * 100:.1f}{spread}"

    lines = [
        f"| attack (2 of 10) | {' | '.join(RULES)} |",
        "| --- |" + " --- |" * len(RULES),
    ]
    lines += [f"| {a} | {' | '.join(cell(a, r) for r in RULES)} |" for a in ATTACKS]
    lines.append("")
    lines.append(
        f"Mean final test accuracy (%) of the 8 honest nodes; median over seeds {seeds}"
        + (" (min-max)." if len(seeds) > 1 else ".")
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="150 steps instead of 600")
    args = parser.parse_args()
    steps = 150.0 if args.quick else 600.0
    jobs = [(a, r, s, steps) for s in args.seeds for a in ATTACKS for r in RULES]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs, strict=True)))
    for r in results:
        print(
            f"{r['attack']:>10}  {r['rule']:<16} seed {r['seed']}: "
            f"{r['accuracy'] * 100:5.1f}% (worst {r['worst'] * 100:.1f}%)  {r['wall']:.0f} s"
        )
    lines = table(results, args.seeds)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = " ".join(map(str, args.seeds))
    command = f".venv/bin/python scripts/bench/monna.py --seeds {seeds}" + (
        " --quick" if args.quick else ""
    )
    (args.out / "monna.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "monna.md").write_text(
        "\n".join(
            [
                "# MoNNA under Byzantine attack",
                "",
                f"`{command}` ({time.perf_counter() - started:.0f} s).",
                "",
                *lines,
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
