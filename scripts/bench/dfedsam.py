"""DFedSAM and DFedSAM-MGS in simulation: Q = 4 against Q = 1, SAM against local-SGD gossip.

    .venv/bin/python scripts/bench/dfedsam.py [--out benchmarks] [--quick] [--seeds 3]
        [--cnn-seeds 1] [--jobs 2]

The issue's acceptance: "DFedSAM-MGS on a 16-node ring, Dirichlet 0.3: Q = 4 gives a lower
consensus distance than Q = 1 at equal local steps, and DFedSAM is not worse than plain
local-SGD gossip" (reference/mixing.md 4.4-4.5).

1. Training: ring:16, digits(alpha=0.3) (the MLP; with --cnn-seeds also model=cnn), shared
   initial model, one gradient per node per second (Poisson), batch 32, lr 0.1, K = 10 local
   steps per round, the same edge rate (4 exchanges per edge per second) for every run.
   Runs: DFedSAM Q = 1 and DFedSAM-MGS Q = 4 (rho 0.05), the same with rho = 0 (DFedAvg,
   DFedAvg-MGS), and the foundation's ``gossip`` (pairwise averaging on every exchange) at
   the same edge rate and at 0.2 per edge (as many mixes per node as MGS Q = 4 makes), and
   DFedSAM-MGS with rho 0.01 and 0.2. The seeds fix the data split, the models, the clocks
   and the minibatches, so every algorithm of one seed takes the same local steps at the
   same times. Reported: final mean test
   accuracy of the 16 models (and its mean over the last 10% of the run), the accuracy of
   their average (the single global merge), the consensus distance (1/n) sum |x_i - mean|^2
   time-averaged over the second half and at the end, gradients, gradient evaluations (SAM
   costs two), exchanges, and whether Q mixes fitted in every round: mixes done per round,
   and when the Q-th came, in rounds; the mean norm of the (SAM) gradients stepped along.
2. Mixing alone (reference/mixing.md 4.4's cheap check): the same ring with independent
   initial models and lr 0 (the K local steps still happen and still end the rounds, but
   move nothing): the consensus distance per round with Q = 1 and Q = 4, against synchronous
   mixing (the same initial models times W^Q per round, W Metropolis-Hastings) and its
   asymptotic lambda_2(W)^(2Q). And Q = 4 at edge rates 1, 2, 4 and 8: whether Q mixes with
   newer neighbour models fit in a round, and how many of the models mixed carried a mix of
   the neighbour's that the node had not used yet.

Writes dfedsam.md (tables; a hand-written "## Discussion" section already in the file is
kept), dfedsam.json (every run, with its samples) and dfedsam.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

K = 10  # local steps per round
GRAD_RATE = 1.0  # per node per second: a round is K / GRAD_RATE seconds
EDGE_RATE = 4.0  # exchanges per edge per second, both ends together
LR = 0.1
RHO = 0.05
GRAPH = "ring:16"


@dataclass(frozen=True)
class Spec:
    """One run: an algorithm setting on one task and seed."""

    label: str
    algorithm: str  # dfedsam or gossip
    task: str
    seed: int
    duration: float
    gossip_steps: int = 1  # Q
    rho: float = RHO
    edge_rate: float = EDGE_RATE
    lr: float = LR
    init: str = "shared"
    sample_every: float | None = None

    @property
    def node_options(self) -> dict[str, Any]:
        if self.algorithm != "dfedsam":
            return {}
        return {"local_steps": K, "gossip_steps": self.gossip_steps, "rho": self.rho}


def training_specs(task: str, seed: int, duration: float) -> list[Spec]:
    return [
        Spec("DFedSAM Q=1", "dfedsam", task, seed, duration, 1),
        Spec("DFedSAM-MGS Q=4", "dfedsam", task, seed, duration, 4),
        Spec("DFedAvg Q=1 (rho 0)", "dfedsam", task, seed, duration, 1, rho=0.0),
        Spec("DFedAvg-MGS Q=4 (rho 0)", "dfedsam", task, seed, duration, 4, rho=0.0),
        # The SAM radius: the paper's choice is about 0.01; 0.05 is the default.
        Spec("DFedSAM-MGS Q=4, rho 0.01", "dfedsam", task, seed, duration, 4, rho=0.01),
        Spec("DFedSAM-MGS Q=4, rho 0.2", "dfedsam", task, seed, duration, 4, rho=0.2),
        Spec("gossip, same edge rate", "gossip", task, seed, duration),
        # 2 edges x 0.2 = 0.4 pairwise mixes per node per second = Q / K x GRAD_RATE, Q = 4.
        Spec("gossip, 0.2 per edge", "gossip", task, seed, duration, edge_rate=0.2),
    ]


def mixing_specs(duration: float) -> list[Spec]:
    """lr 0 from independent models: Q = 1 and 4 at EDGE_RATE, and Q = 4 at other rates."""
    return [
        Spec(
            f"lr 0, Q={q}, edge rate {rate:g}",
            "dfedsam",
            "digits(alpha=0.3)",
            0,
            duration,
            q,
            rho=0.0,
            edge_rate=rate,
            lr=0.0,
            init="independent",
            sample_every=K / GRAD_RATE / 5,
        )
        for q, rate in ((1, EDGE_RATE), (4, EDGE_RATE), (4, 1.0), (4, 2.0), (4, 8.0))
    ]


class Recorder:
    """A DFedSam that notes, per node, when a round ends and each mix: its time, the versions
    of the neighbour models it used, and the node's version after it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps = 0
        self.grad_norm = 0.0  # summed over the steps
        self.round_ends: list[float] = []
        self.mixes: list[tuple[float, dict[int, float], float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply_gradient(self, state: Any, grad: Any, now: float) -> Any:
        self.grad_norm += float(grad.norm())  # before the rule writes the step into grad
        new = self.inner.apply_gradient(state, grad, now)
        self.steps += 1
        if self.steps % self.inner.local_steps == 0:
            self.round_ends.append(now)
        return new

    def mix(self, state: Any, sent: Any, received: Any, now: float, peer: int) -> Any:
        from gossipnode import cache

        new = self.inner.mix(state, sent, received, now, peer)
        if float(new["v"]) > float(state["v"]):
            # What the mix used: every neighbour model live now (the rule mixes them all).
            live = cache.usable(new, now, self.inner.max_age, fresh_only=False)
            used = {e.peer: e.version for e in live}
            self.mixes.append((now, used, float(new["v"])))
        return new


def run(spec: Spec) -> dict[str, Any]:
    """One simulation, as ``gossipnode simulate`` runs it, with a Recorder on each node."""
    import torch
    import trio
    import trio.testing

    from gossipnode.graphs import from_spec
    from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling

    torch.set_num_threads(1)
    options = SimOptions(
        from_spec(GRAPH),
        task=spec.task,
        algorithm=spec.algorithm,
        duration=spec.duration,
        seed=spec.seed,
        grad_rate=GRAD_RATE,
        gossip_rate=spec.edge_rate,
        lr=spec.lr,
        batch_size=32,
        init=spec.init,
        node_options=spec.node_options,
        sample_every=spec.sample_every or spec.duration / 100,
        merge=spec.init == "shared",
    )
    samples: list[dict[str, Any]] = []

    def keep(_: Any, sample: dict[str, Any]) -> None:
        samples.append(
            {
                "t": trio.current_time(),
                "consensus_distance": sample["consensus_distance"],
                "accuracy": sample["mean"]["accuracy"],
            }
        )

    started = time.perf_counter()
    sim = Simulation(options, on_sample=keep)
    recorders = []
    if spec.algorithm == "dfedsam":
        recorders = [Recorder(a) for a in sim.algorithms]
        sim.algorithms = recorders  # type: ignore[assignment]
    with deterministic_scheduling(spec.seed):
        summary = trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    result: dict[str, Any] = {
        "spec": spec.__dict__,
        "wall_seconds": time.perf_counter() - started,
        "gradients": summary["gradients"],
        "gradient_evaluations": summary["gradients"] * (2 if _sam(spec) else 1),
        "exchanges": summary["exchanges"],
        "accuracy": summary["mean"]["accuracy"],
        "merged_accuracy": summary["merged"]["mean"]["accuracy"] if "merged" in summary else None,
        "consensus_distance": summary["consensus_distance"],
        "samples": samples,
    }
    if recorders:
        result["rounds"] = round_figures(recorders, spec.gossip_steps)
        result["sam_rho"] = sim.instances[0].learner.sam_rho
    if spec.lr == 0:
        result["initial"] = [node.initial_params.double().tolist() for node in sim.instances]
    return result


def _sam(spec: Spec) -> bool:
    return spec.algorithm == "dfedsam" and spec.rho > 0


def round_figures(recorders: list[Recorder], q: int) -> dict[str, Any]:
    """Per round of each node (those followed by another round end): mixes made, and the time
    from the round's end to its Q-th mix, in rounds. And how many mix inputs carried a
    neighbour mix the node had not used yet (fresh by version is also fresh by a local step)."""
    counts, lags = [], []
    for rec in recorders:
        ends = rec.round_ends
        for start, stop in itertools.pairwise(ends):
            inside = [t for t, _, _ in rec.mixes if start <= t < stop]
            counts.append(len(inside))
            if len(inside) >= q:
                lags.append((inside[q - 1] - start) * GRAD_RATE / K)
    # A neighbour's version v carried the mixes it made up to v.
    mix_versions = [[v for _, _, v in rec.mixes] for rec in recorders]
    inputs = new_gossip = 0
    for rec in recorders:
        last: dict[int, float] = {}
        for _, used, _ in rec.mixes:
            for peer, version in used.items():
                made = sum(v <= version for v in mix_versions[peer])
                before = sum(v <= last.get(peer, -1.0) for v in mix_versions[peer])
                inputs += 1
                new_gossip += made > before
                last[peer] = version
    return {
        "rounds": len(counts),
        "mixes_per_round_mean": statistics.fmean(counts) if counts else 0.0,
        "rounds_with_q_mixes": sum(c == q for c in counts) / len(counts) if counts else 0.0,
        "rounds_with_more": sum(c > q for c in counts),
        "qth_mix_lag_rounds_mean": statistics.fmean(lags) if lags else None,
        "qth_mix_lag_rounds_p90": sorted(lags)[int(0.9 * (len(lags) - 1))] if lags else None,
        "mixes": sum(len(r.mixes) for r in recorders),
        "gradient_norm_mean": sum(r.grad_norm for r in recorders) / sum(r.steps for r in recorders),
        "inputs_with_new_neighbour_mix": new_gossip / inputs if inputs else None,
    }


# ---------------------------------------------------------------------------- figures


def second_half(result: dict[str, Any], key: str) -> float:
    end = result["spec"]["duration"]
    return statistics.fmean(s[key] for s in result["samples"] if s["t"] >= end / 2)


def last_tenth(result: dict[str, Any], key: str) -> float:
    end = result["spec"]["duration"]
    return statistics.fmean(s[key] for s in result["samples"] if s["t"] >= 0.9 * end)


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def training_table(results: list[dict[str, Any]], task: str) -> list[str]:
    rows = [
        "| run | rho | Q | edge rate | accuracy (end) | accuracy (last 10%) | merged model "
        "accuracy | consensus distance, 2nd half | consensus distance (end) | gradients | "
        "gradient evaluations | exchanges | MH mixes per round | rounds with Q mixes | "
        "Q-th mix after (rounds) | mean gradient norm |",
        "| --- " * 16 + "|",
    ]
    mine = [r for r in results if r["spec"]["task"] == task]
    labels = list(dict.fromkeys(r["spec"]["label"] for r in mine))
    for label in labels:
        runs = [r for r in mine if r["spec"]["label"] == label]
        s = runs[0]["spec"]
        dfedsam = s["algorithm"] == "dfedsam"
        rounds = [r["rounds"] for r in runs] if dfedsam else []
        rows.append(
            f"| {label} | {s['rho'] if dfedsam else '-'} | {s['gossip_steps'] if dfedsam else '-'} "
            f"| {s['edge_rate']} | {spread([r['accuracy'] for r in runs], '.3f')} "
            f"| {spread([last_tenth(r, 'accuracy') for r in runs], '.3f')} "
            f"| {spread([r['merged_accuracy'] for r in runs], '.3f')} "
            f"| {spread([second_half(r, 'consensus_distance') for r in runs], '.3g')} "
            f"| {spread([r['consensus_distance'] for r in runs], '.3g')} "
            f"| {statistics.fmean(r['gradients'] for r in runs):.0f} "
            f"| {statistics.fmean(r['gradient_evaluations'] for r in runs):.0f} "
            f"| {statistics.fmean(r['exchanges'] for r in runs):.0f} | "
            + (
                f"{spread([x['mixes_per_round_mean'] for x in rounds], '.2f')} "
                f"| {spread([100 * x['rounds_with_q_mixes'] for x in rounds], '.0f')}% "
                f"| {spread([x['qth_mix_lag_rounds_mean'] for x in rounds], '.2f')} "
                f"(p90 {max(x['qth_mix_lag_rounds_p90'] for x in rounds):.2f}) "
                f"| {spread([x['gradient_norm_mean'] for x in rounds], '.3f')} |"
                if dfedsam
                else "- | - | - | - |"
            )
        )
    return rows


def by_seed(results: list[dict[str, Any]], task: str, label: str) -> dict[int, dict[str, Any]]:
    return {
        r["spec"]["seed"]: r
        for r in results
        if r["spec"]["task"] == task and r["spec"]["label"] == label
    }


def verdicts(results: list[dict[str, Any]], task: str) -> list[str]:
    """The acceptance, per seed (paired: the same seed is the same data, clocks, batches)."""
    q1, q4 = by_seed(results, task, "DFedSAM Q=1"), by_seed(results, task, "DFedSAM-MGS Q=4")
    seeds = sorted(q1)
    cd = [
        (second_half(q4[s], "consensus_distance"), second_half(q1[s], "consensus_distance"))
        for s in seeds
    ]
    lines = [
        f"- Q = 4 below Q = 1 in consensus distance (2nd-half mean), per seed {seeds}: "
        + ", ".join(f"{a:.3g} vs {b:.3g}" for a, b in cd)
        + f" -> {'MET' if all(a < b for a, b in cd) else 'NOT MET'} "
        f"(ratio {statistics.fmean(a / b for a, b in cd):.2f}); equal local steps: "
        + ("yes" if all(q1[s]["gradients"] == q4[s]["gradients"] for s in seeds) else "NO")
        + f" ({', '.join(str(q1[s]['gradients']) for s in seeds)} gradients)."
    ]
    pairs = [
        ("DFedSAM Q=1", "DFedAvg Q=1 (rho 0)"),
        ("DFedSAM-MGS Q=4", "DFedAvg-MGS Q=4 (rho 0)"),
        ("DFedSAM Q=1", "gossip, same edge rate"),
        ("DFedSAM-MGS Q=4", "gossip, same edge rate"),
        ("DFedSAM-MGS Q=4", "gossip, 0.2 per edge"),
    ]
    for mine, base in pairs:
        a, b = by_seed(results, task, mine), by_seed(results, task, base)
        diffs = [last_tenth(a[s], "accuracy") - last_tenth(b[s], "accuracy") for s in seeds]
        mean = statistics.fmean(diffs)
        lines.append(
            f"- {mine} minus {base}, accuracy (last 10%), per seed: "
            + ", ".join(f"{100 * d:+.1f}" for d in diffs)
            + f" pp, mean {100 * mean:+.1f} pp -> "
            + ("not worse" if mean > -0.01 else "WORSE")
            + " (threshold: mean > -1 pp)"
        )
    return lines


def metropolis(n: int) -> Any:
    """Metropolis-Hastings weights of the ring (degree 2: 1/3 each, 1/3 self)."""
    import torch

    from gossipnode.graphs import from_spec

    topo = from_spec(GRAPH)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in topo.neighbours(i):
            w[i, j] = 1 / (1 + max(len(topo.neighbours(i)), len(topo.neighbours(j))))
        w[i, i] = 1 - w[i].sum()
    return w


def mixing_table(results: list[dict[str, Any]]) -> list[str]:
    import torch

    from gossipnode.learner import consensus_distance

    rows = [
        "| Q | consensus distance at 0 | after 1 round | after 3 | after 8 | per-round factor, "
        "rounds 1-8 | synchronous W^Q: after 1 | after 3 | after 8 | per-round factor, 1-8 | "
        "lambda_2^(2Q) | MH mixes per round | inputs carrying a new neighbour mix |",
        "| --- " * 13 + "|",
    ]
    for r in results:
        if r["spec"]["edge_rate"] != EDGE_RATE:
            continue
        q = r["spec"]["gossip_steps"]
        x0 = torch.tensor(r["initial"], dtype=torch.float64)
        w = metropolis(len(x0))
        lam = sorted(torch.linalg.eigvalsh(w).abs().tolist())[-2]
        cd = {round(s["t"] * GRAD_RATE / K, 3): s["consensus_distance"] for s in r["samples"]}
        sync = [
            consensus_distance(list(torch.linalg.matrix_power(w, q * k) @ x0)) for k in range(9)
        ]
        got = [cd[float(k)] for k in range(9)]
        rows.append(
            f"| {q} | {got[0]:.3g} | {got[1]:.3g} | {got[3]:.3g} | {got[8]:.3g} "
            f"| {(got[8] / got[1]) ** (1 / 7):.3f} | {sync[1]:.3g} | {sync[3]:.3g} | {sync[8]:.3g} "
            f"| {(sync[8] / sync[1]) ** (1 / 7):.3f} | {lam ** (2 * q):.3f} "
            f"| {r['rounds']['mixes_per_round_mean']:.2f} "
            f"| {100 * r['rounds']['inputs_with_new_neighbour_mix']:.0f}% |"
        )
    return rows


def factor(r: dict[str, Any]) -> float:
    """The consensus distance's mean factor per round from the end of round 1 to round 8."""
    cd = {round(s["t"] * GRAD_RATE / K, 3): s["consensus_distance"] for s in r["samples"]}
    return float((cd[8.0] / cd[1.0]) ** (1 / 7))


def sweep_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| edge rate | exchanges | MH mixes per round | rounds with Q = 4 mixes | Q-th mix after "
        "(rounds), mean | p90 | inputs carrying a new neighbour mix | consensus distance "
        "factor per round |",
        "| --- " * 8 + "|",
    ]
    runs = sorted(
        (r for r in results if r["spec"]["gossip_steps"] == 4), key=lambda r: r["spec"]["edge_rate"]
    )
    for r in runs:
        x = r["rounds"]
        rows.append(
            f"| {r['spec']['edge_rate']:g} | {r['exchanges']} | {x['mixes_per_round_mean']:.2f} "
            f"| {100 * x['rounds_with_q_mixes']:.0f}% | {x['qth_mix_lag_rounds_mean']:.2f} "
            f"| {x['qth_mix_lag_rounds_p90']:.2f} "
            f"| {100 * x['inputs_with_new_neighbour_mix']:.0f}% "
            f"| {factor(r):.3f} |"
        )
    return rows


def plot(results: list[dict[str, Any]], out: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        seed = min(r["spec"]["seed"] for r in results if r["spec"]["task"] == task)
        for r in results:
            if r["spec"]["task"] != task or r["spec"]["seed"] != seed:
                continue
            t = [s["t"] for s in r["samples"]]
            axes[0, col].semilogy(
                t, [s["consensus_distance"] for s in r["samples"]], label=r["spec"]["label"]
            )
            axes[1, col].plot(t, [s["accuracy"] for s in r["samples"]], label=r["spec"]["label"])
        axes[0, col].set_title(f"{GRAPH}, {task}, seed {seed}")
        axes[0, col].set_ylabel("consensus distance")
        axes[1, col].set_ylabel("mean test accuracy")
        for ax in axes[:, col]:
            ax.set_xlabel("virtual seconds (1 gradient per node per second)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dfedsam.png", dpi=80)


def run_all(specs: list[Spec], jobs: int) -> Iterable[dict[str, Any]]:
    if jobs <= 1:
        yield from map(run, specs)
        return
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        yield from pool.imap(run, specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="one seed, 300 s runs, no CNN")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the MLP runs")
    parser.add_argument("--cnn-seeds", type=int, default=1, help="seeds of the CNN runs (0: none)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    duration = 300.0 if args.quick else 600.0
    tasks = {"digits(alpha=0.3)": 1 if args.quick else args.seeds}
    if not args.quick and args.cnn_seeds:
        tasks["digits(alpha=0.3,model=cnn)"] = args.cnn_seeds
    specs = [
        s
        for task, n in tasks.items()
        for seed in range(n)
        for s in training_specs(task, seed, duration)
    ]
    specs += mixing_specs(9 * K / GRAD_RATE)
    results = []
    for result in run_all(specs, args.jobs):
        s = result["spec"]
        print(
            f"{s['label']:26} {s['task']:28} seed {s['seed']} acc {result['accuracy']:.3f} "
            f"cd {result['consensus_distance']:.3g} wall {result['wall_seconds']:.0f}s",
            flush=True,
        )
        results.append(result)
    training = [r for r in results if r["spec"]["lr"] > 0]
    mixing = [r for r in results if r["spec"]["lr"] == 0]
    report = [
        "# DFedSAM / DFedSAM-MGS on a 16-node ring, Dirichlet 0.3",
        "",
        "Generated by `scripts/bench/dfedsam.py` (`.venv/bin/python scripts/bench/dfedsam.py "
        + " ".join(
            x
            for x in (
                "--quick" if args.quick else "",
                f"--seeds {args.seeds}" if not args.quick else "",
                f"--cnn-seeds {args.cnn_seeds}" if not args.quick else "",
                f"--jobs {args.jobs}",
            )
            if x
        )
        + "`); every figure below is from that run. Virtual time, 1 gradient per node per "
        f"second, K = {K} local steps per round (a round is {K / GRAD_RATE:.0f} s), "
        f"{duration:.0f} s = {duration * GRAD_RATE / K:.0f} rounds, lr {LR}, batch 32, "
        f"shared initial model, rho {RHO} unless 0. Edge rate: exchanges per edge per second. "
        "Mean ± standard deviation over seeds.",
        "",
    ]
    for task, n in tasks.items():
        report += [
            f"## Training: {task}, {n} seed(s)",
            "",
            *training_table(training, task),
            "",
            "Acceptance:",
            "",
            *verdicts(training, task),
            "",
        ]
    report += [
        "## Mixing alone: lr 0, independent initial models, seed 0",
        "",
        "Consensus distance at the end of rounds (virtual time k x 10 s), asynchronous",
        "DFedSAM against synchronous W^Q mixing of the same initial models:",
        "",
        *mixing_table(mixing),
        "",
        "Q = 4, lr 0, by edge rate: do Q mixes with newer neighbour models fit in a round? A",
        "neighbour's model is newer after its next local step or mix, so above about 2 per",
        "edge the neighbours' own clocks, not the edges, set the pace:",
        "",
        *sweep_table(mixing),
        "",
    ]
    md = args.out / "dfedsam.md"
    if md.exists() and "## Discussion" in md.read_text():
        report.append(md.read_text()[md.read_text().index("## Discussion") :].rstrip())
    md.write_text("\n".join(report) + "\n")
    (args.out / "dfedsam.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "initial"} for r in results], indent=1)
        + "\n"
    )
    plot(training, args.out, list(tasks))


if __name__ == "__main__":
    main()
