"""Variance-corrected averaging in simulation: the vanishing-variance effect (mixing.md 3.5).

    .venv/bin/python scripts/bench/variance.py [--out benchmarks] [--quick] [--seeds 0 1]
        [--jobs 2] [--no-noniid]

The set-up of mixing.md 7.2 in ``gossipnode simulate`` (``SimOptions``/``Simulation``, virtual
time; one tick = one virtual second):

* 16 nodes; the graph is a ring lattice (each node linked to i+-1 and i+-2) plus one random
  chord per node (to a node it is not linked to yet, drawn with ``random.Random(seed)``):
  48 edges, mean degree 6. No family in ``graphs`` matches, so it is built here (``lattice``).
* task ``digits(model=deep,alpha=1000)``: the 64-64-64-64-64-64-10 ReLU MLP with He init,
  and a Dirichlet(1000) split, i.e. practically IID (every node gets about 1/16 of each class).
  A second table repeats the run with the default non-IID split, Dirichlet(0.5).
* algorithm ``variance-corrected``: "plain" is ``variance_target="none"`` (the 0.5/0.5 blend of
  the own model with the mean of the neighbour models received since the last mix, no
  rescaling); "corrected" is the default target "others" (every weight matrix rescaled to the
  mean variance of the received ones). Blend 0.5; a mix needs >= 2 fresh neighbour models
  and happens right after a local step.
* clocks: a Poisson gradient clock of 0.5 steps per tick per node (the calibration's "a step
  every 1-3 ticks", mean 2) and a gossip rate of 0.5 exchanges per tick per edge: every
  exchange delivers each end's latest model to the other, so each node gets a model from each
  neighbour about as often as that neighbour steps (the calibration pushed after every step).
  SGD lr 0.05, batch 32, 1500 ticks (about 750 local steps per node); --quick: 300 ticks.
* init ``independent`` (a seed per node) vs ``shared``; seeds 0 and 1 (the run seed picks the
  test split, the data split, the graph's chords, the inits and every clock).

Reported per run: the mean test accuracy over the 16 nodes at a few times and at the end, the
highest mean accuracy seen in any sample, the first-layer weight variance (population variance
of the 64x64 matrix, averaged over the nodes) relative to its He-init value 2/fan_in = 2/64,
and the wall time of the simulation. Writes ``variance.md``, ``variance.json`` and
``variance.png`` into --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import trio
import trio.testing

from gossipnode.factory import weight_segments
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling
from gossipnode.topology import Topology, from_edges

NODES = 16
HE_VARIANCE = 2 / 64  # kaiming_normal_, fan_in 64, ReLU gain sqrt(2)
IID_ALPHA = 1000.0
NONIID_ALPHA = 0.5
INITS = ("independent", "shared")
RULES = {"plain": "none", "corrected": "others"}
SETUP = (
    "16 nodes on a ring lattice (i~i+-1, i~i+-2) plus one random chord per node (48 edges, "
    "mean degree 6); task `digits(model=deep)` (64-64x5-10 ReLU MLP, He init); algorithm "
    "`variance-corrected`, blend 0.5, a mix after a local step once >= 2 fresh neighbour "
    "models are cached; *plain* = `variance_target=none`, *corrected* = `others` (the default: "
    "every weight matrix rescaled to the mean variance of the received ones); Poisson gradient "
    "clock 0.5 steps/tick/node, gossip 0.5 exchanges/tick/edge, SGD lr 0.05, batch 32, "
    "{duration:g} ticks (about {steps:g} steps per node). Accuracy: mean over the 16 nodes on "
    "the common test set (359 images). Variance: population variance of the first 64x64 "
    "weight matrix, mean over nodes, over its He-init value 2/64."
)


def lattice(n: int, seed: int) -> Topology:
    """A ring lattice (i~i+-1, i~i+-2) plus, for each node in turn, one chord to a random node
    it is not linked to yet: 3n edges."""
    edges = {(min(i, (i + d) % n), max(i, (i + d) % n)) for i in range(n) for d in (1, 2)}
    rng = random.Random(f"variance-chords/{seed}")
    for i in range(n):
        choices = [j for j in range(n) if j != i and (min(i, j), max(i, j)) not in edges]
        j = rng.choice(choices)
        edges.add((min(i, j), max(i, j)))
    return from_edges(n, edges)


def options(init: str, rule: str, seed: int, duration: float, alpha: float) -> SimOptions:
    return SimOptions(
        lattice(NODES, seed),
        task=f"digits(model=deep,alpha={alpha:g})",
        algorithm="variance-corrected",
        duration=duration,
        seed=seed,
        grad_rate=0.5,
        gossip_rate=0.5,
        lr=0.05,
        batch_size=32,
        init=init,
        node_options={"variance_target": RULES[rule]},
        sample_every=duration / 20,
    )


def run(job: tuple[str, str, int, float, float]) -> dict[str, Any]:
    """One simulation, as ``simulate`` runs it (seeded scheduling, MockClock), with a sample
    hook that also reads every node's first-layer weight variance."""
    init, rule, seed, duration, alpha = job
    torch.set_num_threads(1)
    opts = options(init, rule, seed, duration, alpha)
    samples: list[dict[str, float]] = []

    def on_sample(sim: Simulation, sample: dict[str, Any]) -> None:
        start, end = weight_segments(sim.task)[0]
        ratios = [
            float(node.params()[start:end].var(unbiased=False)) / HE_VARIANCE for node in sim.live()
        ]
        samples.append(
            {
                "t": trio.current_time(),
                "accuracy": sample["mean"]["accuracy"],
                "loss": sample["mean"]["loss"],
                "min_accuracy": min(m["accuracy"] for m in sample["nodes"]),
                "variance_ratio": statistics.fmean(ratios),
                "gradients": sample["gradients"],
                "exchanges": sample["exchanges"],
            }
        )

    sim = Simulation(opts, on_sample=on_sample)
    started = time.perf_counter()
    with deterministic_scheduling(seed):
        summary = trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    wall = time.perf_counter() - started
    final = samples[-1]
    result = {
        "init": init,
        "rule": rule,
        "seed": seed,
        "alpha": alpha,
        "duration": duration,
        "edges": len(opts.topology.edges),
        "accuracy": final["accuracy"],
        "min_accuracy": final["min_accuracy"],
        "max_mean_accuracy": max(s["accuracy"] for s in samples),
        "variance_ratio": final["variance_ratio"],
        "gradients": summary["gradients"],
        "exchanges": summary["exchanges"],
        "wall_seconds": wall,
        "samples": samples,
    }
    print(
        f"{init:11} {rule:9} seed {seed} alpha {alpha:g}: accuracy {final['accuracy']:.3f} "
        f"variance x{final['variance_ratio']:.3f} ({wall:.0f} s)",
        flush=True,
    )
    return result


def at(result: dict[str, Any], t: float) -> float:
    return float(next(s for s in result["samples"] if s["t"] >= t - 1e-9)["accuracy"])


def table(results: list[dict[str, Any]], duration: float) -> list[str]:
    times = [duration / 10, duration / 5, duration / 2]
    seeds = sorted({r["seed"] for r in results})
    rows = [
        "| init | averaging | "
        + " | ".join(f"accuracy @ t={t:g}" for t in times)
        + f" | **accuracy @ t={duration:g}** | min node @ end | best mean in any sample "
        "| first-layer var / He | wall s |",
        "| --- " * (len(times) + 7) + "|",
    ]
    for init in INITS:
        for rule in RULES:
            runs = [r for r in results if r["init"] == init and r["rule"] == rule]
            runs.sort(key=lambda r: r["seed"])
            if not runs:
                continue

            def cell(values: list[float], fmt: str = "{:.1%}") -> str:
                return " / ".join(fmt.format(v) for v in values)

            rows.append(
                f"| {init} | {rule} | "
                + " | ".join(cell([at(r, t) for r in runs]) for t in times)
                + f" | **{cell([r['accuracy'] for r in runs])}**"
                + f" | {cell([r['min_accuracy'] for r in runs])}"
                + f" | {cell([r['max_mean_accuracy'] for r in runs])}"
                + f" | {cell([r['variance_ratio'] for r in runs], '{:.3f}x')}"
                + f" | {cell([r['wall_seconds'] for r in runs], '{:.0f}')} |"
            )
    rows.append("")
    rows.append(f"Cells are seed {' / seed '.join(map(str, seeds))}.")
    return rows


def verdict(results: list[dict[str, Any]]) -> list[str]:
    """The acceptance criteria of the issue, checked on these runs."""
    iid = [r for r in results if r["alpha"] == IID_ALPHA]
    lines = []
    for seed in sorted({r["seed"] for r in iid}):
        got = {(r["init"], r["rule"]): r for r in iid if r["seed"] == seed}
        plain, corr = got[("independent", "plain")], got[("independent", "corrected")]
        sp, sc = got[("shared", "plain")], got[("shared", "corrected")]
        delta = abs(sc["accuracy"] - sp["accuracy"])
        lines.append(
            f"- seed {seed}: independent init, plain averaging: best mean accuracy in any sample "
            f"{plain['max_mean_accuracy']:.1%} (chance 10%), "
            + ("near chance throughout" if plain["max_mean_accuracy"] < 0.2 else "**NOT** near")
            + f"; corrected: {corr['accuracy']:.1%} at the end ("
            + ("> 90%: met" if corr["accuracy"] > 0.9 else "**<= 90%: missed**")
            + f"); shared init: the correction changes the final accuracy by "
            f"{100 * delta:.2f} points ("
            + ("< 1: met" if delta < 0.01 else "**>= 1: missed**")
            + ")."
        )
    return lines


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, var) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {
        ("independent", "plain"): "C3",
        ("independent", "corrected"): "C2",
        ("shared", "plain"): "C0",
        ("shared", "corrected"): "C1",
    }
    for r in results:
        if r["alpha"] != IID_ALPHA:
            continue
        t = [s["t"] for s in r["samples"]]
        label = f"{r['init']}, {r['rule']}" if r["seed"] == results[0]["seed"] else None
        style = "-" if r["seed"] == results[0]["seed"] else "--"
        colour = styles[(r["init"], r["rule"])]
        acc.plot(t, [s["accuracy"] for s in r["samples"]], style, color=colour, label=label)
        var.semilogy(
            t, [s["variance_ratio"] for s in r["samples"]], style, color=colour, label=label
        )
    acc.set_xlabel("virtual time (ticks)")
    acc.set_ylabel("mean test accuracy over the 16 nodes")
    acc.axhline(0.1, color="grey", lw=0.5)
    var.set_xlabel("virtual time (ticks)")
    var.set_ylabel("first-layer weight variance / He init")
    for ax in (acc, var):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("digits(model=deep), 16 nodes, ring lattice +-1,+-2 + chords (solid: seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="300 ticks, seed 0 only")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    parser.add_argument(
        "--no-noniid", action="store_true", help="skip the Dirichlet(0.5) table (seed 0)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    duration = 300.0 if args.quick else 1500.0
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    jobs = [(i, r, s, duration, IID_ALPHA) for s in seeds for i in INITS for r in RULES]
    if not args.no_noniid:
        jobs += [(i, r, seeds[0], duration, NONIID_ALPHA) for i in INITS for r in RULES]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run, jobs, chunksize=1)
    else:
        results = [run(job) for job in jobs]
    iid = [r for r in results if r["alpha"] == IID_ALPHA]
    noniid = [r for r in results if r["alpha"] == NONIID_ALPHA]
    command = ".venv/bin/python scripts/bench/variance.py" + (" --quick" if args.quick else "")
    if args.seeds:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.jobs > 1:
        command += f" --jobs {args.jobs}"
    report = [
        "# Variance-corrected averaging: independent vs shared initialisation",
        "",
        "```bash",
        command,
        "```",
        "",
        "Set-up (mixing.md 3.5 and 7.2, in `gossipnode simulate`): "
        + SETUP.format(duration=duration, steps=duration / 2),
        "",
        f"## IID-ish split, Dirichlet({IID_ALPHA:g})",
        "",
        *table(iid, duration),
        "",
        *verdict(iid),
    ]
    if noniid:
        report += [
            "",
            f"## Non-IID split, Dirichlet({NONIID_ALPHA:g}) (the task's default)",
            "",
            *table(noniid, duration),
        ]
    text = "\n".join(report) + "\n"
    print(text)
    (args.out / "variance.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "variance.md").write_text(text)
    plot(results, args.out / "variance.png")


if __name__ == "__main__":
    main()
