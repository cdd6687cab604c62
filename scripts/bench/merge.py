"""A single global merge after sparse gossip (mixing.md 5.4): merged model vs local models.

    .venv/bin/python scripts/bench/merge.py [--out benchmarks] [--quick] [--jobs 2]

Setup (mixing.md 7.3, in our simulator): 16 nodes on a complete graph, digits with a
Dirichlet(0.1) split, shared init, the ``gossip`` algorithm (plain SGD, no momentum and no
weight decay: our Gossip has neither), lr 0.05, batch 32, 300 rounds of k = 10 local steps.
Gradients run on a Poisson clock of rate 1 per node, so a round is k = 10 virtual seconds.
Pairwise gossip on an edge of rate lambda fires lambda/2 from each end and averages both ends,
so a node initiates 15 lambda / 2 exchanges per second. "Sparse, r" sets lambda so that every
node initiates r exchanges per round (lambda = 2 r / (15 k)); it then takes part in 2r of them.
The paper's r = 0.2 pull changes a node's model 0.2 times per round and moves one model per
pull, so r = 0.1 initiated is the paper's schedule in model updates per node and in bytes;
r = 0.2 initiated (the issue's mapping) communicates twice as much. Both are run.

Schedules, 3 seeds each (MLP 64-64-10): no communication; sparse r = 0.2 and r = 0.1, each
alone, with a dense window early (5-10% of the run) and late (90-95%); all-reduce (the exact
average of all models, ``allreduce_every`` = k seconds). A dense window multiplies the gossip
rate by F = 15 / r, so inside it every node initiates 15 = N - 1 exchanges per round, the
paper's r_end = N - 1 (an all-to-all average per round); early and late spend the same budget.
The merged model is the simulator's single global merge (``merge=True``): the exact average of
the 16 models, BatchNorm re-estimated on each node's own data, evaluated per node, averaged.

The CNN (two conv + BatchNorm blocks) repeats no communication, both sparse schedules and
all-reduce (1 seed) and evaluates the merged model four ways: with each node's own running
statistics (no recalibration), re-estimated on each node's data (the simulator's merge), with
the running statistics averaged over nodes, and re-estimated on all training data (an oracle).
A sensitivity run (seed 0) repeats sparse and all-reduce at lr 0.5 = 0.05 / (1 - 0.9), the
step that heavy-ball momentum 0.9 (the calibration's optimiser) takes in steady state.

Curves are probed 1 us after every 10th round boundary, and the final figures 1 us after the
last one (duration = 300 k + 1e-6). The offset makes the final evaluation come after the last
all-reduce: at exactly t = duration the simulator's final sample and its last all-reduce tie,
and trio's seeded shuffle picks the order, so the all-reduce run's final local accuracy and
consensus distance would depend on the seed's coin flip. Writes merge.md, merge.json and
merge.png into --out (--report-only rebuilds the last two from merge.json). About 16 minutes
with --jobs 2 on 2 shared cores; --quick (60 rounds, seed 0, fewer runs) in about 4.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import trio
import trio.testing
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import vector_to_parameters

from gossipnode.graphs import from_spec
from gossipnode.learner import consensus_distance
from gossipnode.node import Node
from gossipnode.sim import SimOptions, Simulation, deterministic_scheduling, merged_params
from gossipnode.stats import Outcome

N = 16
K = 10  # local steps per round = virtual seconds per round (one gradient per node per second)
LR = 0.05
BATCH = 32
ALPHA = 0.1
EPS = 1e-6  # probe offset after a round boundary (see the docstring)
PROBE_EVERY = 10  # rounds between curve points


@dataclass(frozen=True)
class Spec:
    """One run: a schedule on a model with a seed."""

    name: str  # the schedule, e.g. "sparse r=0.2 + late"
    model: str = "mlp"
    seed: int = 0
    rounds: int = 300
    r: float = 0.0  # exchanges each node initiates per round (0: none)
    window: tuple[float, float] | None = None
    allreduce: bool = False
    lr: float = LR
    momentum: float = 0.0  # local heavy-ball momentum, never averaged

    @property
    def gossip_rate(self) -> float:
        """Per edge: 15 edges per node, each end initiating lambda/2, give r per k seconds."""
        return 2 * self.r / ((N - 1) * K)

    @property
    def dense_factor(self) -> float:
        """Inside the window every node initiates N - 1 exchanges per round."""
        return (N - 1) / self.r

    def options(self) -> SimOptions:
        return SimOptions(
            from_spec(f"complete:{N}"),
            task=f"digits(alpha={ALPHA},model={self.model})",
            algorithm="gossip",
            duration=self.rounds * K + EPS,
            seed=self.seed,
            grad_rate=1.0,
            gossip_rate=self.gossip_rate,
            lr=self.lr,
            batch_size=BATCH,
            init="shared",
            allreduce_every=float(K) if self.allreduce else None,
            merge=True,
            sample_every=self.rounds * K + EPS,  # only t = 0 and the final sample
            node_options={
                "momentum": self.momentum,
                **(
                    {"dense_window": self.window, "dense_factor": self.dense_factor}
                    if self.window
                    else {}
                ),
            },
        )


def schedules(model: str, seeds: Iterable[int], rounds: int, quick: bool) -> list[Spec]:
    specs = []
    for seed in seeds:
        runs = [Spec("no communication", model, seed, rounds)]
        for r in (0.2, 0.1):
            runs.append(Spec(f"sparse r={r}", model, seed, rounds, r))
            if model == "mlp":
                for label, window in (("early", (0.05, 0.10)), ("late", (0.90, 0.95))):
                    runs.append(Spec(f"sparse r={r} + {label}", model, seed, rounds, r, window))
        runs.append(Spec("all-reduce", model, seed, rounds, allreduce=True))
        if quick and model == "cnn":
            runs = [s for s in runs if s.name in ("sparse r=0.1", "all-reduce")]
        specs += runs
    return specs


def sensitivity(rounds: int) -> list[Spec]:
    lr = LR / (1 - 0.9)
    return [
        Spec(f"{name} (lr {lr:g})", "mlp", 0, rounds, r, allreduce=r == 0, lr=lr)
        for name, r in (("sparse r=0.2", 0.2), ("sparse r=0.1", 0.1), ("all-reduce", 0.0))
    ]


# ---------------------------------------------------------------------------- one run


def run(spec: Spec) -> dict[str, Any]:
    """One simulation, in this process; returns the final figures and the curve."""
    torch.set_num_threads(1)
    options = spec.options()
    curve: list[dict[str, float]] = []
    final: dict[str, Any] = {}

    def on_sample(sim: Simulation, sample: dict[str, Any]) -> None:
        if trio.current_time() >= options.duration:  # the final sample, before the merge
            final.update(
                local=sample["mean"]["accuracy"],
                consensus_distance=sample["consensus_distance"],
                **bn_variants(sim),
            )

    sim = Simulation(options, on_sample=on_sample)

    async def probe() -> None:
        for j in range(1, spec.rounds // PROBE_EVERY):
            await trio.sleep_until(j * PROBE_EVERY * K + EPS)
            curve.append({"round": j * PROBE_EVERY, **observe(sim)})

    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            summary = await sim.run()
            nursery.cancel_scope.cancel()
        return summary

    started = time.perf_counter()
    with deterministic_scheduling(spec.seed):
        summary = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    merged = summary["merged"]["mean"]["accuracy"]
    # Our recalibrated merge and the simulator's are the same computation.
    assert math.isclose(final["merged_recal_local"], merged, abs_tol=1e-9), (final, merged)
    curve.append(
        {
            "round": spec.rounds,
            "local": final["local"],
            "merged": merged,
            "consensus_distance": final["consensus_distance"],
            "exchanges": summary["exchanges"],
        }
    )
    return {
        "spec": asdict(spec),
        "gossip_rate": spec.gossip_rate,
        "dense_factor": spec.dense_factor if spec.window else None,
        "merged": merged,
        "merged_per_node": [m["accuracy"] for m in summary["merged"]["per_node"]],
        **final,
        "exchanges": summary["exchanges"],
        "gradients": summary["gradients"],
        "curve": curve,
        "wall_seconds": time.perf_counter() - started,
    }


def observe(sim: Simulation) -> dict[str, float]:
    """Mean local accuracy, merged accuracy (BatchNorm re-estimated per node, as the final
    merge), consensus distance and exchanges so far."""
    live = sim.live()
    params = [node.params() for node in live]
    mean = merged_params(params)
    return {
        "local": _mean(
            n.learner.evaluate(p)["accuracy"] for n, p in zip(live, params, strict=True)
        ),
        "merged": _mean(recalibrated(n, mean) for n in live),
        "consensus_distance": consensus_distance(params),
        "exchanges": sum(
            s.stats.exchanges[o] for s in sim.instances for o in (Outcome.OK, Outcome.RECONCILED)
        ),
    }


def recalibrated(node: Node, params: torch.Tensor) -> float:
    return node.learner.evaluate(params, node.learner.recalibrate(params))["accuracy"]


def bn_variants(sim: Simulation) -> dict[str, Any]:
    """The merged model's accuracy with four sources of BatchNorm statistics (one for a model
    without BatchNorm: then they coincide)."""
    live = sim.live()
    mean = merged_params([node.params() for node in live])
    own = [n.learner.evaluate(mean)["accuracy"] for n in live]  # each node's running stats
    recal = [recalibrated(n, mean) for n in live]
    averaged = torch.stack([n.learner.buffers() for n in live]).mean(0)
    return {
        "merged_no_recal": _mean(own),
        "merged_no_recal_per_node": own,
        "merged_recal_local": _mean(recal),
        "merged_recal_local_per_node": recal,
        "merged_avg_running_stats": _mean(
            n.learner.evaluate(mean, averaged)["accuracy"] for n in live
        ),
        "merged_recal_all_data": recal_all_data(sim, mean),
    }


def recal_all_data(sim: Simulation, params: torch.Tensor) -> float:
    """BatchNorm statistics re-estimated on the union of all nodes' training data."""
    model = sim.task.make_model(0)
    vector_to_parameters(params, model.parameters())
    x = torch.cat([sim.task.shard(i).x for i in range(sim.n)])
    for m in model.modules():
        if isinstance(m, _NormBase):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average; one batch: the data's statistics
    with torch.no_grad():
        model.train()
        model(x)
    model.eval()
    return sim.task.evaluate(model)["accuracy"]


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(values)


# ---------------------------------------------------------------------------- report


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean [min-max] (in % by default)."""
    v = [x * scale for x in values]
    f = f".{digits}g" if scale == 1 else f".{digits}f"  # raw values: significant digits
    if len(v) == 1:
        return format(v[0], f)
    return f"{format(statistics.fmean(v), f)} [{format(min(v), f)}-{format(max(v), f)}]"


def by_name(results: list[dict[str, Any]], model: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["spec"]["model"] == model:
            groups.setdefault(r["spec"]["name"], []).append(r)
    return groups


# mixing.md 5.4's [Cal] figures (numpy, momentum 0.9, pull r = 0.2): mean local, merged %.
CALIBRATION = {
    "no communication": "33 / 45",
    "sparse": "70 / 93",
    "sparse + early": "70 / 93",
    "sparse + late": "75 / 96",
    "all-reduce": "97 / 97",
}


def calibration(name: str) -> str:
    base = name.split(" (lr")[0]
    key = " + ".join("sparse" if part.startswith("sparse") else part for part in base.split(" + "))
    return CALIBRATION.get(key, "")


def main_table(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [
        "| schedule | exchanges (all nodes) | mean local acc % | merged acc % | "
        "merged - local (pp) | consensus distance | calibration: local / merged % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in groups.items():
        gap = [r["merged"] - r["local"] for r in runs]
        cd = [r["consensus_distance"] for r in runs]
        rows.append(
            f"| {name} | {statistics.fmean(r['exchanges'] for r in runs):.0f} | "
            f"{spread([r['local'] for r in runs])} | {spread([r['merged'] for r in runs])} | "
            f"{spread(gap)} | {spread(cd, 1, 3)} | {calibration(name)} |"
        )
    return rows


def acceptance(groups: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """The issue's criterion per seed: merged >= local + 15 pp, merged >= all-reduce - 5 pp."""
    reduce = {r["spec"]["seed"]: r["merged"] for r in groups.get("all-reduce", [])}
    rows = [
        "| schedule | seed | merged - local (pp) | >= 15? | all-reduce - merged (pp) | <= 5? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for name in ("sparse r=0.2", "sparse r=0.1"):
        runs = groups.get(name, [])
        failed = 0
        for r in runs:
            seed = r["spec"]["seed"]
            gap = 100 * (r["merged"] - r["local"])
            behind = 100 * (reduce[seed] - r["merged"]) if seed in reduce else math.nan
            failed += not (gap >= 15 and behind <= 5)
            rows.append(
                f"| {name} | {seed} | {gap:.1f} | {'yes' if gap >= 15 else '**no**'} | "
                f"{behind:.1f} | {'yes' if behind <= 5 else '**no**'} |"
            )
        verdict = "met on every seed" if not failed else f"not met on {failed} of {len(runs)} seeds"
        verdicts.append(f"- {name}: **{verdict}**.")
    return rows, verdicts


def criteria(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """mixing.md 5.4's four acceptance criteria, as measured."""

    def gap(name: str) -> str:
        return spread([r["merged"] - r["local"] for r in groups.get(name, [])])

    def behind(name: str) -> str:
        reduce = {r["spec"]["seed"]: r["merged"] for r in groups.get("all-reduce", [])}
        return spread([reduce[r["spec"]["seed"]] - r["merged"] for r in groups.get(name, [])])

    lines = []
    for r in (0.2, 0.1):
        name = f"sparse r={r}"
        lines.append(
            f"- {name}: merged - mean local = {gap(name)} pp (1: >= 20); all-reduce - merged "
            f"= {behind(name)} pp (2: a few)."
        )
    lines.append(f"- no communication: merged - mean local = {gap('no communication')} pp (3).")
    for r in (0.2, 0.1):
        early, late = groups.get(f"sparse r={r} + early"), groups.get(f"sparse r={r} + late")
        if early and late:
            wins = sum(b["merged"] >= a["merged"] for a, b in zip(early, late, strict=True))
            lines.append(
                f"- sparse r={r}: late window >= early window on {wins} of {len(early)} seeds (4)."
            )
    return lines


def reading(
    mlp: dict[str, list[dict[str, Any]]],
    sens: dict[str, list[dict[str, Any]]],
    cnn: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """What the tables say, with their numbers (the causes named are hypotheses)."""

    def avg(runs: list[dict[str, Any]] | None, key: str) -> float:
        return 100 * statistics.fmean(r[key] for r in runs) if runs else math.nan

    def gap(runs: list[dict[str, Any]] | None) -> float:
        return avg(runs, "merged") - avg(runs, "local")

    s2, s1 = mlp.get("sparse r=0.2"), mlp.get("sparse r=0.1")
    lines = [
        f"- The merged models land near the calibration's (sparse r=0.1 "
        f"{avg(s1, 'merged'):.1f}% and r=0.2 {avg(s2, 'merged'):.1f}% vs 93%; all-reduce "
        f"{avg(mlp.get('all-reduce'), 'merged'):.1f}% vs 97%; no communication "
        f"{avg(mlp.get('no communication'), 'merged'):.1f}% vs 45%), but the mean local models "
        f"are more accurate ({avg(s1, 'local'):.1f}% and {avg(s2, 'local'):.1f}% vs 70%), so "
        "the gap the criterion measures is smaller. Halving the exchanges (r=0.2 to r=0.1, "
        f"the paper's pull in bytes) takes it from {gap(s2):.1f} to {gap(s1):.1f} pp.",
    ]
    s2_fast = sens.get(f"sparse r=0.2 (lr {LR / 0.1:g})")
    if s2_fast:
        lines.append(
            "- Guesses, not tested: a symmetric exchange mixes both ends, a pull one; and "
            "the calibration's momentum buffers (never averaged) push each node back towards "
            "its own data after every average, which plain SGD does not. Step size alone: at "
            f"lr {LR / 0.1:g} the r=0.2 gap is {gap(s2_fast):.1f} pp (lr {LR:g}: "
            f"{gap(s2):.1f} pp)."
        )
    diffs = [
        100 * (b["merged"] - a["merged"])
        for r in (0.2, 0.1)
        for a, b in zip(
            mlp.get(f"sparse r={r} + early", []), mlp.get(f"sparse r={r} + late", []), strict=True
        )
    ]
    if diffs:
        lines.append(
            f"- Late beats or ties early on {sum(d >= 0 for d in diffs)} of {len(diffs)} "
            f"(seed, r) pairs, late - early = {min(diffs):+.1f} to {max(diffs):+.1f} pp "
            "(calibration: late 96% vs early 93%). Sparse + late minus sparse alone, merged: "
            f"{avg(mlp.get('sparse r=0.2 + late'), 'merged') - avg(s2, 'merged'):+.1f} pp at "
            f"r=0.2, {avg(mlp.get('sparse r=0.1 + late'), 'merged') - avg(s1, 'merged'):+.1f} "
            "pp at r=0.1 (calibration: +3)."
        )
    if cnn:
        effect = {
            name: 100 * (r["merged_recal_local"] - r["merged_no_recal"])
            for name, runs in cnn.items()
            for r in runs[:1]
        }
        lines.append(
            "- CNN: re-estimating BatchNorm on each node's data moves the merged accuracy by "
            + ", ".join(f"{v:+.1f} pp ({k})" for k, v in effect.items())
            + " against each node's own running statistics (one seed). Probably because, "
            "when nodes communicate, those statistics were accumulated at parameters close "
            "to the average. tests/test_sim_merge.py checks that the re-estimated statistics "
            "equal the data's, and that they give the better merged model after 10 steps, "
            "while the running averages are still stale."
        )
    return lines


def early_late(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [
        "| base | early merged % | late merged % | late - early (pp), per seed | "
        "early local % | late local % |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in (0.2, 0.1):
        early, late = groups.get(f"sparse r={r} + early"), groups.get(f"sparse r={r} + late")
        if not early or not late:
            continue
        diffs = ", ".join(
            f"{100 * (b['merged'] - a['merged']):+.1f}" for a, b in zip(early, late, strict=True)
        )
        rows.append(
            f"| sparse r={r} | {spread([x['merged'] for x in early])} | "
            f"{spread([x['merged'] for x in late])} | {diffs} | "
            f"{spread([x['local'] for x in early])} | {spread([x['local'] for x in late])} |"
        )
    return rows


def bn_table(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [
        "| schedule | mean local acc % | consensus distance | merged, own running stats "
        "(no recal) % | merged, recal on own data (sim merge) % [node min-max] | "
        "merged, averaged running stats % | merged, recal on all data % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in groups.items():
        per_node = [a for r in runs for a in r["merged_recal_local_per_node"]]
        rows.append(
            f"| {name} | {spread([r['local'] for r in runs])} | "
            f"{statistics.fmean(r['consensus_distance'] for r in runs):.3g} | "
            f"{spread([r['merged_no_recal'] for r in runs])} | "
            f"{spread([r['merged_recal_local'] for r in runs])} "
            f"[{100 * min(per_node):.1f}-{100 * max(per_node):.1f}] | "
            f"{spread([r['merged_avg_running_stats'] for r in runs])} | "
            f"{spread([r['merged_recal_all_data'] for r in runs])} |"
        )
    return rows


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    mlp = by_name([r for r in results if r["spec"]["lr"] == LR], "mlp")
    names = [n for n in mlp if "+" not in n]
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))

    def mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        rounds = [p["round"] for p in runs[0]["curve"]]
        values = [statistics.fmean(r["curve"][i][key] for r in runs) for i in range(len(rounds))]
        return rounds, values

    for name in names:
        for key, style in (("local", "-"), ("merged", "--")):
            x, y = mean_curve(mlp[name], key)
            label = f"{name}, {'mean local' if key == 'local' else 'merged'}"
            axes[0].plot(x, [100 * v for v in y], style, color=colours[name], label=label)
    axes[0].set_title(f"MLP, {N} nodes, Dirichlet {ALPHA}: accuracy (seed mean)")
    axes[0].set_ylabel("test accuracy %")
    for name, runs in mlp.items():
        if name == "all-reduce":
            continue
        x, y = mean_curve(runs, "consensus_distance")
        axes[1].semilogy(x, y, label=name)
    axes[1].set_title("MLP: consensus distance (1/n) sum |x_i - mean|^2")
    cnn = by_name(results, "cnn")
    for name, runs in cnn.items():
        for key, style in (("local", "-"), ("merged", "--")):
            x, y = mean_curve(runs, key)
            label = f"{name}, {'mean local' if key == 'local' else 'merged'}"
            axes[2].plot(x, [100 * v for v in y], style, color=colours.get(name), label=label)
    axes[2].set_title("CNN + BatchNorm (merged: BN re-estimated per node)")
    axes[2].set_ylabel("test accuracy %")
    for ax in axes:
        ax.set_xlabel(f"round (k = {K} local steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mlp, cnn = by_name(results, "mlp"), by_name(results, "cnn")
    sens = by_name([r for r in results if r["spec"]["lr"] != LR], "mlp")
    main_mlp = {k: v for k, v in mlp.items() if k not in sens}
    seeds = sorted({r["spec"]["seed"] for runs in main_mlp.values() for r in runs})
    rounds = results[0]["spec"]["rounds"]
    rows, verdicts = acceptance(main_mlp)
    lines = [
        "# A single global merge after sparse gossip",
        "",
        "```bash",
        ".venv/bin/python scripts/bench/merge.py --jobs 2" + (" --quick" if meta["quick"] else ""),
        "```",
        "",
        "Reproduction of mixing.md 5.4 (calibration setup 7.3) in `gossipnode simulate`'s "
        f"engine: {N} nodes, complete graph, digits with a Dirichlet({ALPHA}) split, shared "
        f"init, `gossip` (plain SGD: **no momentum, no weight decay**, unlike the calibration's "
        f"momentum 0.9 and weight decay 5e-4), lr {LR}, batch {BATCH}, {rounds} rounds of "
        f"k = {K} local steps (Poisson gradient clock of rate 1 per node: one round = {K} "
        f"virtual s), seeds {', '.join(map(str, seeds))}. Figures are the seed mean "
        "[min-max]. Accuracy is on the 359 held-out digits.",
        "",
        "Schedule mapping. An exchange averages both ends and moves two models; the paper's "
        "pull averages one node and moves one. `sparse r` sets the edge rate "
        f"lambda = 2r / ({N - 1} k) so each node *initiates* r exchanges per round (takes "
        "part in 2r). r = 0.2 is the issue's mapping and communicates twice as much as the "
        "paper's r = 0.2 pull; r = 0.1 matches the paper's pull in model updates per node "
        "(0.2 per round) and in bytes. Dense windows (5% of the run) multiply lambda by "
        f"F = {N - 1}/r: each node initiates {N - 1} exchanges per round inside the window "
        "(the paper's r_end = N - 1); early and late spend the same extra budget. "
        "`all-reduce` = exact average of all models every k seconds (`allreduce_every`). "
        "Merged = the simulator's single global merge (`merge=True`). Consensus distance = "
        "(1/n) sum_i |x_i - mean x|^2 over the flat parameters at the end, before the merge.",
        "",
        "Final figures are taken 1 us after the last round boundary (duration = "
        f"{rounds} k + 1e-6): at exactly t = duration the simulator's final sample ties with "
        "its last all-reduce and trio's seeded shuffle decides which runs first (see the bug "
        "note at the end).",
        "",
        "Verdict on the issue's criterion (merged >= mean local + 15 pp and within 5 pp of "
        "all-reduce, per seed; details below):",
        "",
        *verdicts,
        "",
        "## MLP 64-64-10",
        "",
        *main_table(main_mlp),
        "",
        "![curves](merge.png)",
        "",
        "Left: mean local (solid) and merged (dashed) accuracy every 10 rounds; middle: "
        "consensus distance; right: the CNN.",
        "",
        "### The issue's criterion: merged >= mean local + 15 pp, within 5 pp of all-reduce",
        "",
        *rows,
        "",
        *verdicts,
        "",
        "mixing.md 5.4's criteria (1: merged >= mean local + 20 pp at r about 0.2; 2: merged "
        "within a few pp of all-reduce; 3: no communication, little mergeability; 4: a late "
        "window at least as good as an early one):",
        "",
        *criteria(main_mlp),
        "",
        "### Dense window early (5-10%) vs late (90-95%), same budget",
        "",
        *early_late(main_mlp),
        "",
    ]
    if cnn:
        lines += [
            "## CNN with BatchNorm: where the merged model's statistics come from",
            "",
            "Same schedules, `digits(model=cnn)`; running statistics are local (never "
            "gossiped or all-reduced). Merged accuracy four ways: each node's own running "
            "statistics (no recalibration), re-estimated on the node's own data (the "
            "simulator's merge: the row's merged figure), averaged over nodes, re-estimated "
            "on all training data pooled (an oracle no node has).",
            "",
            *bn_table(cnn),
            "",
        ]
    if sens:
        lines += [
            f"## Sensitivity: lr {LR / 0.1:g} = lr / (1 - momentum), seed 0",
            "",
            "The calibration used heavy-ball momentum 0.9, whose steady-state step is "
            "lr / (1 - 0.9); our Gossip has no momentum, so this is the closest plain-SGD step.",
            "",
            *main_table(sens),
            "",
        ]
    lines += [
        "## Reading",
        "",
        *reading(main_mlp, sens, cnn),
        "",
        "## Simulator issues found while measuring (reported, not fixed here)",
        "",
        "- **All-reduce and the end of the run tie.** `Simulation._allreduce` sleeps until "
        "j * period and `run()` until `duration`; when the duration is a multiple of the period "
        "both wake at the same virtual time and trio's seeded shuffle orders them, so the final "
        "sample (mean local accuracy, consensus distance) is taken before the last average on "
        "some seeds and after it on others (4 nodes, 30 s, period 10: 6 of 8 seeds sample first; "
        "tests/test_sim_merge.py pins it as a strict xfail). "
        "The merge itself is unaffected (the mean of the models is the same either way). "
        "Worked around here by ending 1e-6 s after the last round.",
        "- **A restarted node's dense window is misplaced.** `Node` evaluates "
        "`Schedule.multiplier(self.now())`, the time since *its own* start, against the run's "
        "`duration`, so a node restarted at time s has its window at [s + a D, s + b D) instead "
        "of [a D, b D). No crash happens in these runs, so the figures above are unaffected.",
        "- **All-reduce with DADAO crashes.** `_allreduce` calls `algorithm.with_params`, which "
        "`Dadao` lacks: `simulate --algorithm dadao --allreduce-every 2` dies with an "
        "AttributeError at the first average instead of refusing the options up front.",
        "- Not a bug, a difference from the paper: BatchNorm running statistics are never "
        "gossiped or all-reduced here (the paper mixes them with the weights), so the "
        "all-reduce CNN's local models use their own data's statistics.",
        "",
        f"Wall time {meta['wall_seconds'] / 60:.0f} min for {len(results)} runs "
        f"({meta['jobs']} at a time on 2 shared cores).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--quick", action="store_true", help="60 rounds, seed 0, fewer runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MLP seeds")
    parser.add_argument("--cnn-seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild merge.md and merge.png from merge.json"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((args.out / "merge.json").read_text())
        plot(saved["runs"], args.out / "merge.png")
        (args.out / "merge.md").write_text(report(saved["runs"], saved))
        return
    rounds = 60 if args.quick else 300
    seeds = [0] if args.quick else args.seeds
    # Longest first, so that two workers finish together.
    specs = schedules(
        "cnn", args.cnn_seeds[:1] if args.quick else args.cnn_seeds, rounds, args.quick
    )
    specs += schedules("mlp", seeds, rounds, args.quick)
    if not args.quick:
        specs += sensitivity(rounds)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run, spec): spec for spec in specs}
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            s = r["spec"]
            print(
                f"{s['model']} {s['name']} seed {s['seed']}: local "
                f"{100 * r['local']:.1f}% merged {100 * r['merged']:.1f}% cd "
                f"{r['consensus_distance']:.3g} exchanges {r['exchanges']} "
                f"({r['wall_seconds']:.0f} s)",
                flush=True,
            )
    order = {spec: i for i, spec in enumerate(specs)}
    results.sort(key=lambda r: order[Spec(**{**r["spec"], "window": _window(r["spec"])})])
    wall = time.perf_counter() - started
    saved = {"quick": args.quick, "jobs": args.jobs, "wall_seconds": wall, "runs": results}
    (args.out / "merge.json").write_text(json.dumps(saved, indent=1) + "\n")
    plot(results, args.out / "merge.png")
    (args.out / "merge.md").write_text(report(results, saved))


def _window(spec: dict[str, Any]) -> tuple[float, float] | None:
    return (spec["window"][0], spec["window"][1]) if spec["window"] else None


if __name__ == "__main__":
    main()
