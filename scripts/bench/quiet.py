"""Measure on a shared machine only while it is otherwise idle, and say how idle it was.

``quietly(run)`` waits until other work keeps under ``NOISE`` cores busy, runs, and runs again
(twice at most) if other work took more than that meanwhile; the figures carry what it took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOISE = 0.3  # cores of other work during a run above which it is run again


def quietly(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` with the machine otherwise idle, as far as we can tell (it is shared): wait
    for quiet first, and run again (twice at most) if other work took more than NOISE cores
    meanwhile. The last attempt counts; what other work took is kept with it."""
    for attempt in range(1, 4):
        wait_quiet()
        machine, own, start = _cpu_ticks(), _own_cpu(), time.monotonic()
        result = run()
        wall = time.monotonic() - start
        busy, total = (b - a for a, b in zip(machine, _cpu_ticks(), strict=True))
        machine_cores = busy / max(total, 1) * (os.cpu_count() or 1)
        others = max(0.0, machine_cores - (_own_cpu() - own) / wall)
        if others < NOISE or attempt == 3:
            return {**result, "other_cores": others, "attempts": attempt}
        print(f"  (other work took {others:.1f} cores during the run; again)", flush=True)
    raise AssertionError("unreachable")


def wait_quiet(patience: float = 300.0) -> None:
    """Wait, at most ``patience`` s, until other work keeps under NOISE cores busy."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        before = _cpu_ticks()
        time.sleep(2)
        busy, total = (b - a for a, b in zip(before, _cpu_ticks(), strict=True))
        if busy / max(total, 1) * (os.cpu_count() or 1) < NOISE:
            return
        print("  (waiting for other work to finish)", flush=True)
        time.sleep(8)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs: busy is all but idle and iowait."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
