"""``gossipnode report``: plots of one or more simulation runs, from their trace.jsonl.

For each metric the samples carry (consensus distance, and the mean over live nodes of the
task's metrics: loss, accuracy, suboptimality...) it draws the metric against virtual time,
against gradients computed and against exchanges made, every run as one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossipnode.sim import TRACE_FILE

AXES = {
    "t": "virtual time (s)",
    "gradients": "gradients (all nodes)",
    "exchanges": "exchanges (all nodes)",
}
LOG_SCALE = {"consensus_distance", "suboptimality", "loss"}


class ReportError(Exception):
    """A run directory cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Run:
    name: str
    samples: list[dict[str, Any]]

    def series(self, metric: str) -> dict[str, list[float]]:
        """Columns t, gradients, exchanges and ``metric`` over the samples that have it."""
        rows = [s for s in self.samples if _value(s, metric) is not None]
        columns = {axis: [float(s[axis]) for s in rows] for axis in AXES}
        columns[metric] = [float(_value(s, metric)) for s in rows]
        return columns


def _value(sample: dict[str, Any], metric: str) -> Any:
    return sample.get(metric, sample.get("mean", {}).get(metric))


def load_run(directory: Path) -> Run:
    path = directory / TRACE_FILE
    if not path.is_file():
        raise ReportError(
            f"{directory} has no {TRACE_FILE}; give a `gossipnode simulate --out` directory"
        )
    samples = []
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if '"event":"sample"' not in line:
                continue  # most lines are gradients and exchanges: skip them unparsed
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{number} is not JSON: {exc}") from None
    if not samples:
        raise ReportError(f"{path} has no samples")
    return Run(directory.name or str(directory), samples)


def metrics(runs: Sequence[Run]) -> list[str]:
    names = ["consensus_distance"]
    for run in runs:
        for key in run.samples[-1].get("mean", {}):
            if key not in names:
                names.append(key)
    return names


def plot(runs: Sequence[Run], out: Path) -> list[Path]:
    """Write one PNG per metric and x axis; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics(runs):
        for axis, label in AXES.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for run in runs:
                series = run.series(metric)
                if series[metric]:
                    ax.plot(series[axis], series[metric], label=run.name)
            values = [v for run in runs for v in run.series(metric)[metric]]
            if metric in LOG_SCALE and values and min(values) > 0:
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out / f"{metric}-vs-{'time' if axis == 't' else axis}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
