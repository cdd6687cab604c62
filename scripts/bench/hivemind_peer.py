"""The tensors of ``hivemind.py``, its hivemind peer and its gossipnode task, in one file.

Imported by both sides: the benchmark (gossipnode's venv) reads the tensors from here, a
hivemind peer runs this file with the hivemind venv's python (``python -P hivemind_peer.py``:
``-P`` keeps ``scripts/bench``, which holds ``hivemind.py``, off ``sys.path``, so ``import
hivemind`` finds the library), and every ``gossipnode run`` loads ``hivemind_peer:LineTask``.
Nothing here imports gossipnode at module level, so the hivemind venv needs only torch.

Peer i starts at ``coefficient(i) * v``, v one fixed random vector. Averaging is linear, so every
model stays a multiple of v; the multiple is the readout.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

NUMEL = 10_000_000  # parameters, float32
DIRECTION_SEED = 20_240_601
PROBE_STRIDE = 1009  # gossipnode's readout uses every 1009th coordinate (~10k of 10M)
GO_TIMEOUT = 600.0  # seconds a node waits for the benchmark to start it


# ---------------------------------------------------------------------------- tensors


@functools.cache
def direction(numel: int) -> torch.Tensor:
    """The shared random direction v (float32); cached: a task may be built twice."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(DIRECTION_SEED))


def coefficient(peer: int) -> float:
    """Peer ``peer`` starts at this multiple of v: 1, 2.25, 4, 6.25, ... With 4 peers no two
    pairs have equal sums, so no lucky pairing of gossip averages exactly in one step (1, 2,
    3, 4 did: 1+4 = 2+3)."""
    return (peer + 2) ** 2 / 4


def initial_tensor(peer: int, numel: int) -> torch.Tensor:
    """Peer ``peer``'s starting tensor, the same on both sides."""
    return direction(numel) * coefficient(peer)


def readout(x: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(c, |x - c v|^2) with c = <x, v> / <v, v>, over all coordinates, in float64."""
    x64, v64 = x.double(), v.double()
    c = float(torch.dot(x64, v64) / torch.dot(v64, v64))
    return c, float((x64 - c * v64).pow(2).sum())


def relative_distance(
    coefs: list[float], residuals: list[float], initial: list[float], v_norm2: float
) -> float:
    """An upper bound on (1/n) sum_i |x_i - mean x|^2 over its value at the start, for
    x_i = c_i v + r_i (r_i orthogonal to v, |r_i|^2 = residuals[i]); exact when r = 0."""

    def spread(c: list[float]) -> float:
        mean = sum(c) / len(c)
        return sum((ci - mean) ** 2 for ci in c) / len(c)

    return (v_norm2 * spread(coefs) + sum(residuals) / len(residuals)) / (v_norm2 * spread(initial))


# ---------------------------------------------------------------------------- gossipnode


class LineTask:
    """A gossipnode task: node BENCH_NODE's model is ``initial_tensor(BENCH_NODE)``, no data,
    no training. ``evaluate`` reads c off every PROBE_STRIDE-th coordinate (microseconds, so
    progress lines can come every few ms) and stamps it with the wall clock. ``make_model``
    waits for the benchmark's go (in directory BENCH_SYNC) so all nodes begin together."""

    name = "bench-hivemind"

    def __init__(self, *, seed: int, num_nodes: int) -> None:
        self.node = int(os.environ["BENCH_NODE"])
        self.numel = int(os.environ.get("BENCH_NUMEL", NUMEL))
        self.initial = initial_tensor(self.node, self.numel)
        probe = direction(self.numel)[::PROBE_STRIDE].double()
        self.probe, self.probe_norm2 = probe, float(probe.dot(probe))
        self.sync = Path(os.environ["BENCH_SYNC"])

    def make_model(self, seed: int) -> nn.Module:
        model = _LineModel()
        model.weight = nn.Parameter(self.initial)  # no copy: nothing trains it in place
        # The last hook before the node listens: wait here, so the start-up left is brief.
        _wait_for_go(self.sync, self.node)
        return model

    def shard(self, node: int) -> Any:
        # (Like wire.BigModel's: this file cannot import a sibling, since a hivemind peer runs
        # it with -P, lest the bench's hivemind.py shadow the hivemind package.)
        from gossipnode.tasks import Dataset  # the node's venv has it; the peer's does not

        return Dataset(torch.zeros(1, 1), torch.zeros(1))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return next(model.parameters()).sum() * 0.0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        wall = time.time()
        x = next(model.parameters()).detach()[::PROBE_STRIDE].double()
        return {"bench_c": float(x.dot(self.probe)) / self.probe_norm2, "bench_wall": wall}


class _LineModel(nn.Module):
    """The model: one vector. A deep copy (the node's evaluation module, into which the node
    always loads the model to evaluate first) gets uninitialised memory: no 40 MB copy
    between the go and the node's start."""

    weight: nn.Parameter

    def __deepcopy__(self, memo: dict[int, Any]) -> _LineModel:
        twin = _LineModel()
        twin.weight = nn.Parameter(torch.empty_like(self.weight))
        return twin


def _wait_for_go(sync: Path, node: int) -> None:
    """Say ready, wait for the file ``go`` (a wall-clock start time), sleep until then."""
    (sync / f"ready-{node}").touch()
    deadline = time.monotonic() + GO_TIMEOUT
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go in {sync} within {GO_TIMEOUT:g}s")
        time.sleep(0.005)
    time.sleep(max(0.0, float((sync / "go").read_text()) - time.time()))


# ---------------------------------------------------------------------------- hivemind


def peer_main(args: argparse.Namespace) -> None:
    """One hivemind peer: a DHT and a DecentralizedAverager, then averaging rounds on
    command. Reads JSON lines on stdin ({"at": wall time, "timeout": s} or {"quit": true}),
    writes JSON lines on stdout."""
    torch.set_num_threads(args.threads)
    hivemind: Any = importlib.import_module("hivemind")  # untyped; see the module docstring
    v = direction(args.numel)
    start = initial_tensor(args.peer, args.numel)
    tensor = start.clone()
    dht = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=args.initial_peers,
        tls=args.tls,  # libp2p's TLS 1.3 channel security, on by default
    )
    averager = None
    try:
        _emit(maddrs=[str(m) for m in dht.get_visible_maddrs()])
        averager = hivemind.DecentralizedAverager(
            [tensor],
            dht,
            prefix="bench",
            start=True,
            target_group_size=args.peers,
            min_group_size=args.peers,
            min_matchmaking_time=args.min_matchmaking_time,
            request_timeout=args.request_timeout,
            part_size_bytes=args.part_size_bytes,
        )
        _emit(ready=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("quit"):
                break
            _emit(**_round(averager, start, v, command))
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def _round(averager: Any, start: torch.Tensor, v: torch.Tensor, command: Any) -> dict[str, Any]:
    """Reset to the starting tensor, wait for the common start time, average once."""
    with averager.get_tensors() as (t,):
        t.copy_(start)  # every round averages the same tensors from the start
    time.sleep(max(0.0, command["at"] - time.time()))
    begin = time.time()
    matched = None  # when the all-reduce began: matchmaking is what came before
    error = None
    try:
        control = averager.step(timeout=command["timeout"], wait=False)
        deadline = begin + command["timeout"]
        while not control.done() and time.time() < deadline:
            if control.began_allreduce:
                matched = time.time()
                break
            time.sleep(0.005)  # resolution of the split only; the end is taken exactly
        control.result(timeout=max(1.0, deadline - time.time()))
    except Exception as exc:  # a failed round is reported, not fatal
        error = repr(exc)
    end = time.time()
    with averager.get_tensors() as (t,):
        c, residual = readout(t, v)
    return {
        "begin": begin,
        "matched": matched,
        "end": end,
        "c": c,
        "residual": residual,
        "error": error,
    }


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="one hivemind peer of scripts/bench/hivemind.py")
    parser.add_argument("--peer", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--min-matchmaking-time", type=float, required=True)
    parser.add_argument("--request-timeout", type=float, required=True)
    parser.add_argument("--part-size-bytes", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    peer_main(parser.parse_args())


if __name__ == "__main__":
    main()
