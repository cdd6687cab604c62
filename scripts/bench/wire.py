"""Exchange throughput and latency: real nodes vs a plain socket, same run.

    .venv/bin/python scripts/bench/wire.py [--mb 1 10 100] [--latency-kb 10] [--seconds 15]
        [--rounds 30] [--latency-rounds 1000] [--repeats 5] [--out benchmarks]

Two ``gossipnode run`` processes on 127.0.0.1 (this file is also their task: a model of
BENCH_MB megabytes of float32, no training); node 0 starts exchanges, node 1 only answers. An
exchange is timed by node 0 from taking its payload to having applied the reply: 2 x the model
on the wire plus the checks and the mixing at both ends. The baseline, in the same repeat
(half of its round trips just before the nodes run, half just after), sends the same bytes
with plain blocking sockets (``sendall`` of the buffer, ``recv_into`` a preallocated one,
then the same back), paced at the exchanges' rate. Each
model size (``--mb``) gives a throughput row, ratio = plain / exchange (1.0 = as fast as raw
sockets; target >= 0.8 at 100 MB); the small model (``--latency-kb``) gives the latency row.
Figures are medians over ``--repeats``; wire.json and wire.md go into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from quiet import quietly
from torch import nn

from gossipnode.cluster import free_ports

HERE = Path(__file__).resolve().parent
MB = 1_000_000
MAX_RATE = 100.0  # exchanges/s node 0 starts at most (its clock is Poisson; busy ticks skipped)
LATENCY_RATE = 200.0  # for the small model: more samples, still mostly idle between exchanges


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


def exchange_rate(mb: float) -> float:
    """Exchanges/s node 0 starts: 10/s at 100 MB (as before), 32/s at 10 MB, 100/s at 1 MB,
    so exchanges fill a third to half of the time: many samples, few that start while the
    responder is still mixing the previous one."""
    return min(MAX_RATE, 10.0 * math.sqrt(100.0 / mb))


def node_args(node: int, port: int, mb: float, seconds: float, rate: float) -> list[str]:
    return [
        *(sys.executable, "-m", "gossipnode", "run", "--id", str(node)),
        *("--listen", f"127.0.0.1:{port}", "--num-nodes", "2", "--duration", str(seconds)),
        "--insecure",  # the handshake is not what is measured
        *("--task", "wire:BigModel", "--grad-rate", "0", "--torch-threads", "1"),
        # --gossip-rate is per edge, both ends together: node 0 alone starts half of it.
        *("--gossip-rate", str(2 * rate), "--exchange-timeout", "60"),
        *("--max-frame-mb", str(2 * mb + 16), "--progress-every", "0"),
        *("--json", "--log-level", "error"),
    ]


def run_nodes(mb: float, seconds: float, rate: float) -> dict[str, Any]:
    """Node 0's summary after ``seconds`` of exchanges with node 1 at ``rate`` per second."""
    port0, port1 = free_ports(2)
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}",
        "BENCH_MB": str(mb),
    }
    responder = subprocess.Popen(
        node_args(1, port1, mb, seconds + 30, 0.0), env=env, stdout=subprocess.DEVNULL
    )
    try:
        initiator = subprocess.run(
            [*node_args(0, port0, mb, seconds, rate), "--peers", f"127.0.0.1:{port1}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
    finally:
        responder.terminate()
        try:
            responder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            responder.kill()
            responder.wait(timeout=10)
    summary: dict[str, Any] = json.loads(initiator.stdout.strip().splitlines()[-1])
    return summary


# ---------------------------------------------------------------------------- baseline


def _echo_server(port_queue: Any, nbytes: int, rounds: int) -> None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(60)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's sockets
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


def plain_round_trips(mb: float, rounds: int, rate: float) -> list[float]:
    """Seconds of each of ``rounds`` round trips of ``mb`` MB over a plain blocking socket
    to another process (spawned: it starts with none of this one's memory), one every
    1/``rate`` s at most: paced like the exchanges, so the echo side wakes from idle as the
    responder does (back to back, small round trips take under half the time here)."""
    nbytes = int(mb * MB) // 4 * 4
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_echo_server, args=(queue, nbytes, rounds))
    server.start()
    send = torch.rand(nbytes // 4).numpy().data.cast("B")
    recv = memoryview(bytearray(nbytes))
    times = []
    try:
        with socket.create_connection(("127.0.0.1", queue.get(timeout=60)), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rounds):
                start = time.perf_counter()
                sock.sendall(send)
                _recv_exactly(sock, recv)
                times.append(time.perf_counter() - start)
                time.sleep(max(0.0, 1 / rate - times[-1]))
    finally:
        server.join(timeout=60)
        if server.is_alive():
            server.kill()
            server.join(timeout=10)
    return times


# ---------------------------------------------------------------------------- one repeat


def measure(mb: float, seconds: float, rounds: int, rate: float) -> dict[str, Any]:
    """One repeat of one size: half of ``rounds`` plain trips, the nodes exchanging for
    ``seconds``, the other half: the baseline brackets the exchanges, so a machine that
    slows down or speeds up during the repeat moves both alike."""
    plain = plain_round_trips(mb, rounds // 2, rate)
    summary = run_nodes(mb, seconds, rate)
    exchange = summary["exchange_seconds_median"]
    if exchange is None:
        raise SystemExit("no exchange completed: " + json.dumps(summary))
    plain += plain_round_trips(mb, rounds - rounds // 2, rate)
    baseline = statistics.median(plain)
    return {
        "exchanges": summary["exchanges"]["ok"],
        "exchange_median_s": exchange,
        "exchange_p90_s": summary["exchange_seconds_p90"],
        "plain_median_s": baseline,
        "plain_p90_s": _p90(plain),
        "ratio": baseline / exchange,
    }


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def summarise(mb: float, rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one size."""
    keys = ("exchange_median_s", "exchange_p90_s", "plain_median_s", "plain_p90_s", "ratio")
    medians = {key: statistics.median(r[key] for r in runs) for key in keys}
    return {"mb": mb, "rate": rate, **medians, "runs": runs}


# ---------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.0f} ms"


def _size(mb: float) -> str:
    return f"{mb * 1000:g} KB" if mb < 1 else f"{mb:g} MB"


def table(row: dict[str, Any], *, latency: bool = False) -> list[str]:
    """One size: a line per repeat, then the medians (with GB/s for the throughput rows)."""
    mb = row["mb"]
    what = f"Latency, {_size(mb)}" if latency else f"{_size(mb)}"
    lines = [
        f"### {what} model ({_size(2 * mb)} on the wire per exchange; node 0 starts up to "
        f"{row['rate']:.0f} exchanges/s)",
        "",
        "| repeat | exchanges | exchange median | exchange p90 | plain median | plain p90 "
        "| ratio | other work |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, r in enumerate(row["runs"], 1):
        lines.append(
            f"| {k} | {r['exchanges']} | {_ms(r['exchange_median_s'])} | "
            f"{_ms(r['exchange_p90_s'])} | {_ms(r['plain_median_s'])} | "
            f"{_ms(r['plain_p90_s'])} | {r['ratio']:.2f} | {r['other_cores']:.2f} cores |"
        )
    exchange, plain = _ms(row["exchange_median_s"]), _ms(row["plain_median_s"])
    if not latency:
        exchange += f" ({2 * mb / 1000 / row['exchange_median_s']:.1f} GB/s)"
        plain += f" ({2 * mb / 1000 / row['plain_median_s']:.1f} GB/s)"
    lines.append(
        f"| **median** | | **{exchange}** | {_ms(row['exchange_p90_s'])} | **{plain}** | "
        f"{_ms(row['plain_p90_s'])} | **{row['ratio']:.2f}** | |"
    )
    return [*lines, ""]


METHOD = """\
Two `gossipnode run` processes on 127.0.0.1 (`--insecure`, no training, one torch thread),
the model one float32 vector. Node 0 starts exchanges on its Poisson clock at the rate given
per size; node 1 only answers. Node 0 times each exchange from taking its payload to having
applied the reply (both directions on the wire, the checks, the mixing at both ends); median
and p90 are over its last 1,024 exchanges. The baseline, half just before and half just
after in the same repeat: two processes with plain blocking sockets (TCP_NODELAY, as trio
sets it) send the same bytes, `sendall` then `recv_into` a preallocated buffer and the same
back, paced at the same rate as the exchanges (the echo side wakes from idle, as the
responder does; back to back, 10 KB and 1 MB round trips took under half the time on this
VM). Ratio = plain / exchange. Other work: CPU the rest of the shared machine used during
the repeat; a repeat during which it passed 0.3 cores was run again (twice at most)."""


def markdown(command: str, sizes: list[dict[str, Any]], latency: dict[str, Any] | None) -> str:
    lines = [
        "## Exchange throughput and latency vs a plain socket",
        "",
        "```bash",
        command,
        "```",
        "",
        METHOD,
        "",
    ]
    for row in sizes:
        lines += table(row)
    if latency is not None:
        lines += table(latency, latency=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--latency-kb", type=float, default=10.0, help="0 = no latency row")
    parser.add_argument("--seconds", type=float, default=15.0, help="node exchanges per repeat")
    parser.add_argument("--rounds", type=int, default=30, help="plain round trips per repeat")
    parser.add_argument("--latency-rounds", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", *sys.argv])

    cases = [(mb, args.rounds, exchange_rate(mb)) for mb in args.mb]
    if args.latency_kb > 0:
        cases.append((args.latency_kb / 1000, args.latency_rounds, LATENCY_RATE))
    runs: dict[float, list[dict[str, Any]]] = {mb: [] for mb, _, _ in cases}
    for k in range(args.repeats):  # sizes inside repeats: a slow spell hits every size
        for mb, rounds, rate in cases:
            run = quietly(partial(measure, mb, args.seconds, rounds, rate))
            runs[mb].append(run)
            print(
                f"repeat {k + 1}, {_size(mb)}: {run['exchanges']} exchanges, median "
                f"{_ms(run['exchange_median_s'])} (p90 {_ms(run['exchange_p90_s'])}); plain "
                f"{_ms(run['plain_median_s'])}; ratio {run['ratio']:.2f}",
                flush=True,
            )
    rows = [summarise(mb, rate, runs[mb]) for mb, _, rate in cases]
    latency = rows.pop() if args.latency_kb > 0 else None
    for row in rows:
        print(f"median, {_size(row['mb'])}: ratio plain/exchange {row['ratio']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "sizes": rows, "latency": latency}
    (args.out / "wire.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "wire.md").write_text(markdown(command, rows, latency))


if __name__ == "__main__":
    main()
