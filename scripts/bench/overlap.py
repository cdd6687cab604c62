"""Compute/communication overlap: gradient steps/s with gossip off vs on, same run.

    .venv/bin/python scripts/bench/overlap.py [--rates 1 5 20] [--seconds 20] [--warmup 5]
        [--repeats 5] [--out benchmarks]

Two ``gossipnode run`` processes on 127.0.0.1, one edge between them. The workload is this
file's task: the digits deep MLP (five hidden layers of 1,024: 4.3 M parameters, a 17 MB
model, so an exchange moves 34 MB) with minibatches of 64, 25-30 ms a gradient step on
one torch thread, minus the held-out evaluation (the progress lines read here would pay for a
forward pass over the test set each). Gradients run back to back (``--grad-rate max``): the
node computes each one in a worker thread on a snapshot of the model and applies it on its
event loop when it returns, then starts the next, while exchanges run on the event loop on
their own Poisson clocks. Each run is one gossip rate (``--gossip-rate``, exchanges/s of the
edge, both ends together); rate 0 (gossip off), run before the rates and again after them,
is the baseline of every repeat (the mean of the two). Two set-ups:

* ``both``: both nodes train. Each has one torch thread, so the two gradient threads alone
  fill the machine's 2 cores: every cycle the exchanges spend (socket copies, checks, mixing)
  is taken from the gradients. This measures what communication costs here, not only
  whether it overlaps.
* ``one``: node 0 trains, node 1 only gossips. Node 0's gradient thread has a core; the
  other core carries both event loops and node 1. This measures whether exchanges block
  the gradient steps (event loop, GIL), with spare cores as a real machine would have.

Steps/s of a node = gradients between its first progress line after ``--warmup`` s and its
last, over that time. Ratio = steps/s(gossip on) / steps/s(off), same set-up and repeat;
target >= 0.9. Medians over ``--repeats``; overlap.json and overlap.md go into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from quiet import quietly

from gossipnode.cluster import free_ports, node_command, ring
from gossipnode.tasks import Digits

HERE = Path(__file__).resolve().parent
HIDDEN = 1024
BATCH = 64
SETUPS = {"both": 2, "one": 1}  # set-up -> how many nodes train (the first ones)


class DeepDigits(Digits):
    """digits with the deep MLP and no held-out evaluation (it would compete for the cores)."""

    name = "bench-overlap"

    def __init__(self, *, seed: int, num_nodes: int, hidden: int = HIDDEN) -> None:
        super().__init__(seed=seed, num_nodes=num_nodes, hidden=hidden, model="deep")

    def evaluate(self, model: Any) -> dict[str, float]:
        return {}


def options(trains: bool, rate: float, seconds: float) -> dict[str, Any]:
    return {
        "task": "overlap:DeepDigits",
        "grad_rate": "max" if trains else 0,
        "gossip_rate": rate,
        "batch_size": BATCH,
        "torch_threads": 1,
        "progress_every": 1,
        "duration": seconds,
        "checkpoint_every": 0,  # a checkpoint mid-run would take cycles from the gradients
        "exchange_timeout": 30,
        "insecure": True,  # the handshake is not what is measured
        "json": True,
        "log_level": "error",
    }


def run_pair(trainers: int, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    """Two nodes for ``seconds``: the figures of each of the first ``trainers``, and the CPU
    each node used (cores) from about ``warmup`` s in to about the end."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="gossipnode-overlap-") as tmp:
        out = Path(tmp)
        ports = free_ports(2)
        procs = []
        try:
            start = time.monotonic()
            for i, peers in enumerate(ring(2)):
                cmd = node_command(i, ports, peers, out, options(i < trainers, rate, seconds))
                with (out / f"node-{i}.log").open("wb") as log:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log))
            # A node's clock starts after its imports (seconds): these stay inside its run.
            cpu = cpu_cores(procs, start + warmup + 2, start + seconds)
            deadline = time.monotonic() + seconds + 90  # start-up and the final save
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError(f"a node failed: {[p.returncode for p in procs]}")
        return {
            "nodes": [node_figures(out, i, warmup) for i in range(trainers)],
            "cpu_cores": cpu,
        }


def cpu_cores(procs: list[subprocess.Popen[bytes]], t0: float, t1: float) -> list[float]:
    """CPU (user + system, all threads) each process used between monotonic t0 and t1, in
    cores."""
    time.sleep(max(0.0, t0 - time.monotonic()))
    before, at = [_cpu_seconds(p.pid) for p in procs], time.monotonic()
    time.sleep(max(0.0, t1 - at))
    after, now = [_cpu_seconds(p.pid) for p in procs], time.monotonic()
    return [(b - a) / (now - at) for a, b in zip(before, after, strict=True)]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def node_figures(out: Path, node: int, warmup: float) -> dict[str, Any]:
    """Steps/s and exchanges/s of ``node`` over its progress lines after ``warmup`` s."""
    text = (out / f"node-{node}.log").read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    lines = [e for e in events if e["event"] == "progress" and e["elapsed"] >= warmup]
    if len(lines) < 2:
        raise RuntimeError(f"node {node}: too few progress lines after {warmup:g}s")
    first, last = lines[0], lines[-1]
    summary = json.loads((out / f"node-{node}" / "summary.json").read_text())
    return {
        "steps_per_s": (last["gradients"] - first["gradients"])
        / (last["elapsed"] - first["elapsed"]),
        "exchanges_per_s": statistics.mean(e["exchanges_per_s"] for e in lines[1:]),
        "exchange_median_s": summary["exchange_seconds_median"],
        "staleness_mean": summary["staleness_mean"],
    }


# ---------------------------------------------------------------------------- report


def combine(pair: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: the trainers' mean (exchange times: None with gossip off)."""
    nodes = pair["nodes"]
    run: dict[str, Any] = {**pair, "cpu_total": sum(pair["cpu_cores"])}
    for key in nodes[0]:
        values = [n[key] for n in nodes]
        run[key] = None if None in values else statistics.mean(values)
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of one set-up and rate (a run's figures: mean over trainers)."""
    keys = ("steps_per_s", "exchanges_per_s", "cpu_total", "other_cores", "ratio")
    row = {key: statistics.median(r[key] for r in runs) for key in keys}
    exchange = [r["exchange_median_s"] for r in runs if r["exchange_median_s"] is not None]
    row["exchange_median_s"] = statistics.median(exchange) if exchange else None
    return {**row, "runs": runs}


def table(setup: str, rows: dict[float, dict[str, Any]]) -> list[str]:
    lines = [
        f"### Set-up `{setup}`: {SETUPS[setup]} of 2 nodes train",
        "",
        "| gossip rate (edge) | exchanges/s done | exchange median | CPU of both nodes "
        "| other work | steps/s per trainer (repeats) | steps/s median "
        "| ratio on/off (repeats) | ratio median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate, row in rows.items():
        each = ", ".join(f"{r['steps_per_s']:.1f}" for r in row["runs"])
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in row["runs"])
        exchange = row["exchange_median_s"]
        lines.append(
            f"| {'off' if rate == 0 else f'{rate:g}/s'} | {row['exchanges_per_s']:.1f} | "
            f"{'-' if exchange is None else f'{exchange * 1e3:.0f} ms'} | "
            f"{row['cpu_total']:.2f} cores | {row['other_cores']:.2f} cores | {each} | "
            f"{row['steps_per_s']:.1f} | {ratios} | **{row['ratio']:.2f}** |"
        )
    return [*lines, ""]


METHOD = """\
Two `gossipnode run` processes on 127.0.0.1, one edge. How a node schedules its work: with
`--grad-rate max` gradients run back to back, one at a time: each is computed in a worker
thread (`trio.to_thread`) on a snapshot of the model and applied on the event loop when it
returns, and the next starts right after. Exchanges run on the event loop, on Poisson clocks
(each end starts half the edge's rate), one of a node's own at a time: ticks that fall during
its own exchange are skipped, so fewer exchanges get done than the rate asks. The baseline is
the same pair with `--gossip-rate 0`, run just before the rates and again just after them in
the same repeat (their mean; the off row shows it). Steps/s: from a trainer's progress
lines after the warm-up. CPU: user + system time of both node processes over the run, in cores
(of 2). Other work: what the rest of the (shared) machine used meanwhile; a run during which
it passed 0.3 cores was run again (twice at most).

Cores: the machine has 2 and each node one torch thread. In `both`, the two gradient threads
alone keep both cores busy, so everything an exchange costs the CPU (the loopback copies in
the kernel at both ends, the NaN check, the mixing) comes out of the gradients: the ratio
measures that cost, not whether compute and communication overlap. In `one`, node 0 trains
on one core and the other core carries the communication of both nodes: the ratio measures
the overlap itself (does an exchange hold up the gradient thread or the event loop)."""


def markdown(command: str, settings: dict[str, Any], result: dict[str, Any]) -> str:
    lines = ["## Compute/communication overlap", "", "```bash", command, "```", "", METHOD, ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines.append("")
    for setup, rows in result.items():
        lines += table(setup, {float(rate): row for rate, row in rows.items()})
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not counted")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", *sys.argv])
    rates = [0.0, *args.rates]
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {
        s: {r: [] for r in rates} for s in args.setups
    }

    def one_run(setup: str, rate: float) -> dict[str, Any]:
        pair = quietly(partial(run_pair, SETUPS[setup], rate, args.seconds, args.warmup))
        return combine(pair)

    for k in range(args.repeats):  # set-ups and rates inside repeats: noise hits them all
        for setup in args.setups:
            # Gossip off before and after the rates: the baseline brackets them, so a machine
            # that drifts during the repeat moves both alike.
            done = {rate: one_run(setup, rate) for rate in rates}
            after = one_run(setup, 0.0)
            off = done[0.0]
            off["steps_per_s_after"] = after["steps_per_s"]
            off["steps_per_s"] = (off["steps_per_s"] + after["steps_per_s"]) / 2
            for rate, run in done.items():
                run["ratio"] = run["steps_per_s"] / off["steps_per_s"]
                runs[setup][rate].append(run)
                print(
                    f"repeat {k + 1}, {setup}, gossip {rate:g}/s: {run['steps_per_s']:.1f} "
                    f"steps/s, {run['exchanges_per_s']:.1f} exchanges/s, CPU "
                    f"{run['cpu_total']:.2f} cores (others {run['other_cores']:.2f}), ratio "
                    f"{run['ratio']:.2f}",
                    flush=True,
                )
    result = {
        s: {str(r): summarise(rs) for r, rs in by_rate.items()} for s, by_rate in runs.items()
    }
    settings = {
        "model": f"digits deep MLP, 5 x {HIDDEN} hidden, 17 MB float32",
        "minibatch": BATCH,
        "gradients": "back to back (--grad-rate max), one torch thread per node",
        "seconds per run": f"{args.seconds:g} (first {args.warmup:g} not counted)",
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "settings": settings, "setups": result}
    (args.out / "overlap.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "overlap.md").write_text(markdown(command, settings, result))
    for setup, rows in result.items():
        ratios = ", ".join(f"{r}/s {row['ratio']:.2f}" for r, row in rows.items() if r != "0.0")
        print(f"median ratio on/off, {setup}: {ratios} (target >= 0.9)")


if __name__ == "__main__":
    main()
