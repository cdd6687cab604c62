"""Exchange throughput: a 100 MB model swapped by two real nodes vs a plain socket, same run.

    .venv/bin/python scripts/bench/wire.py [--mb 100] [--seconds 20] [--json-out FILE]

Two ``gossipnode run`` processes on 127.0.0.1 (this file is also their task: a model of
``--mb`` megabytes of float32); node 0 starts exchanges, node 1 only answers. An exchange is
timed by node 0 from taking its payload to having applied the reply: 2 x MB on the wire plus
the payload copy, the checks and the mixing at both ends. The baseline, run in the same
process pair set-up right after, sends the same bytes with plain blocking sockets (``sendall``
of the buffer, ``recv_into`` a preallocated one, then the same back). Prints the medians and
the ratio baseline/exchange (1.0 = as fast as raw sockets).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
MB = 1_000_000


# ---------------------------------------------------------------------------- the task


class BigModel:
    """A task whose model is one float32 vector of BENCH_MB megabytes; no real training."""

    name = "bench-wire"

    def __init__(self, *, seed: int, num_nodes: int) -> None:
        self.numel = int(float(os.environ.get("BENCH_MB", "100")) * MB) // 4

    def make_model(self, seed: int) -> nn.Module:
        model = nn.Module()
        gen = torch.Generator().manual_seed(seed)
        model.weight = nn.Parameter(torch.rand(self.numel, generator=gen))
        return model

    def shard(self, node: int) -> Any:
        from gossipnode.tasks import Dataset

        return Dataset(torch.zeros(1, 1), torch.zeros(1))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return next(model.parameters()).sum() * 0.0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------------------- nodes


def run_nodes(mb: float, seconds: float) -> dict[str, Any]:
    ports = _free_ports(2)
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}",
        "BENCH_MB": str(mb),
    }
    common = [
        "--insecure",  # the handshake is not what is measured
        "--num-nodes",
        "2",
        "--task",
        "wire:BigModel",
        "--grad-rate",
        "0",
        "--exchange-timeout",
        "60",
        "--max-frame-mb",
        str(2 * mb + 16),
        "--progress-every",
        "0",
        "--torch-threads",
        "1",
        "--json",
        "--log-level",
        "error",
    ]
    responder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gossipnode",
            "run",
            "--id",
            "1",
            "--listen",
            f"127.0.0.1:{ports[1]}",
            "--gossip-rate",
            "0",
            "--duration",
            str(seconds + 30),
            *common,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        initiator = subprocess.run(
            [
                sys.executable,
                "-m",
                "gossipnode",
                "run",
                "--id",
                "0",
                "--listen",
                f"127.0.0.1:{ports[0]}",
                "--peers",
                f"127.0.0.1:{ports[1]}",
                "--gossip-rate",
                "20",
                "--duration",
                str(seconds),
                *common,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
    finally:
        responder.terminate()
        responder.wait(timeout=60)
    summary: dict[str, Any] = json.loads(initiator.stdout.strip().splitlines()[-1])
    return summary


# ---------------------------------------------------------------------------- baseline


def _echo_server(port_queue: Any, nbytes: int, rounds: int) -> None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            for _ in range(rounds):
                _recv_exactly(conn, view)
                conn.sendall(view)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def plain_socket_round_trips(mb: float, rounds: int) -> list[float]:
    nbytes = int(mb * MB) // 4 * 4
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_echo_server, args=(queue, nbytes, rounds))
    server.start()
    send = torch.rand(nbytes // 4).numpy().data.cast("B")
    recv = memoryview(bytearray(nbytes))
    times = []
    try:
        with socket.create_connection(("127.0.0.1", queue.get(timeout=30))) as sock:
            for _ in range(rounds):
                start = time.perf_counter()
                sock.sendall(send)
                _recv_exactly(sock, recv)
                times.append(time.perf_counter() - start)
    finally:
        server.join(timeout=60)
        if server.is_alive():
            server.kill()
    return times


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def measure(mb: float, seconds: float, rounds: int) -> dict[str, Any]:
    """One repeat: node exchanges for ``seconds``, then ``rounds`` plain round trips."""
    summary = run_nodes(mb, seconds)
    exchange = summary["exchange_seconds_median"]
    if exchange is None:
        raise SystemExit("no exchange completed: " + json.dumps(summary))
    plain = plain_socket_round_trips(mb, rounds)
    baseline = statistics.median(plain)
    return {
        "exchanges": summary["exchanges"]["ok"],
        "exchange_median_s": exchange,
        "exchange_p90_s": summary["exchange_seconds_p90"],
        "plain_median_s": baseline,
        "plain_range_s": [min(plain), max(plain)],
        "ratio": baseline / exchange,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="model size in MB")
    parser.add_argument("--seconds", type=float, default=15.0, help="node exchanges per repeat")
    parser.add_argument("--rounds", type=int, default=15, help="plain round trips per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    print(f"model {args.mb:g} MB float32: {2 * args.mb:g} MB on the wire per exchange")
    runs = []
    for k in range(args.repeats):
        run = measure(args.mb, args.seconds, args.rounds)
        runs.append(run)
        print(
            f"repeat {k + 1}: exchange median {run['exchange_median_s'] * 1e3:.0f} ms "
            f"(p90 {run['exchange_p90_s'] * 1e3:.0f}, {run['exchanges']} exchanges); "
            f"plain socket median {run['plain_median_s'] * 1e3:.0f} ms; "
            f"ratio {run['ratio']:.2f}"
        )
    ratio = statistics.median(r["ratio"] for r in runs)
    exchange = statistics.median(r["exchange_median_s"] for r in runs)
    plain = statistics.median(r["plain_median_s"] for r in runs)
    print(
        f"median of {len(runs)}: exchange {exchange * 1e3:.0f} ms ({2 * args.mb / exchange:.0f} "
        f"MB/s), plain {plain * 1e3:.0f} ms ({2 * args.mb / plain:.0f} MB/s), "
        f"ratio plain/exchange {ratio:.2f} (target >= 0.8)"
    )
    if args.json_out:
        result = {
            "model_mb": args.mb,
            "ratio_median": ratio,
            "exchange_median_s": exchange,
            "plain_median_s": plain,
            "runs": runs,
        }
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
