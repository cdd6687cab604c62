"""The command line: bad input is one line on stderr and exit code 2; output formats."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossipnode.cli import app, format_event

BASE = [
    *("run", "--id", "0", "--num-nodes", "2", "--listen", "127.0.0.1:0", "--duration", "1"),
    "--insecure",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grad-rate", "fast"],
            "--grad-rate: must be 'max' or a number >= 0 (0 = off), got 'fast'",
        ),
        (
            ["--task", "mnist"],
            "--task: unknown task 'mnist': use one of logreg, linreg, digits or "
            "package.module:factory",
        ),
        (
            ["--algorithm", "sgp"],
            "--algorithm: unknown algorithm 'sgp'; known: gossip, dadao, monna, "
            "variance-corrected, dfedsam",
        ),
        (["--id", "2"], "--id: node id 2 must be below --num-nodes 2 (ids are 0..1)"),
        (["--peers", "localhost"], "--peers: 'localhost' is not host:port"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    code, out, err = invoke(*BASE, *args)
    assert code == 2
    assert err == f"gossipnode: error: {message}\n"
    assert out == ""


def test_bad_environment_value() -> None:
    code, _, err = invoke(*BASE, env={"GOSSIPNODE_LR": "-1"})
    assert code == 2
    assert err == "gossipnode: error: GOSSIPNODE_LR: must be a finite number > 0, got '-1'\n"


def test_a_port_in_use_is_a_listen_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = invoke(*BASE, "--listen", f"127.0.0.1:{port}", "--task", "logreg")
    assert code == 2
    assert err.startswith(f"gossipnode: error: --listen: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_a_metrics_port_in_use_is_a_metrics_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = invoke(*BASE, "--task", "logreg", "--metrics", f"127.0.0.1:{port}")
    assert code == 2
    assert err.startswith(f"gossipnode: error: --metrics: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_missing_config_file(tmp_path: Path) -> None:
    code, _, err = invoke(*BASE, "--config", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "--config: no such file" in err


def test_a_lone_node_runs_and_prints_json(tmp_path: Path) -> None:
    code, out, err = invoke(
        *BASE,
        "--task",
        "logreg",
        "--json",
        "--progress-every",
        "0.4",
        "--grad-rate",
        "50",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "summary"
    assert events[-1]["gradients"] > 10
    assert any(e["event"] == "progress" for e in events)
    assert json.loads((tmp_path / "summary.json").read_text())["node"] == 0
    assert (tmp_path / "model.pt").exists()
    assert (tmp_path / "model-initial.pt").exists()


def test_the_real_entry_point_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gossipnode", *BASE, "--lr", "fast"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == "gossipnode: error: --lr: must be a number, got 'fast'\n"


def test_text_format_of_events() -> None:
    line = format_event(
        "progress",
        {
            "node": 2,
            "elapsed": 5.0,
            "gradients": 10,
            "train_loss": 0.5,
            "accuracy": 0.75,
            "exchanges_per_s": 1.5,
            "bytes_per_s": 2000.0,
            "peers_up": 2,
        },
    )
    assert line.startswith("[node 2] t=    5.0s  grads=10")
    assert "accuracy=0.75" in line
    assert "peers_up=2" in line


SIM = ["simulate", "--graph", "ring:4", "--duration", "5", "--quiet"]


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        (
            ["--algorithm", "sgp"],
            {},
            "--algorithm: unknown algorithm 'sgp'; known: gossip, dadao, monna, "
            "variance-corrected, dfedsam",
        ),
        (["--task", "mnist"], {}, "--task: unknown task 'mnist'"),
        (["--graph", "rign:4"], {}, "--graph: unknown graph kind 'rign'"),
        (
            ["--scenario", "{d}/s.toml"],
            {"s.toml": "[network\n"},
            "--scenario: {d}/s.toml is not valid TOML",
        ),
        (
            ["--scenario", "{d}/s.toml"],
            {"s.toml": '[[faults]]\nkind = "crash"\nnode = 9\nat = 1'},
            "--scenario: {d}/s.toml: faults[0].node: node 9 does not exist (nodes are 0..3)",
        ),
        (
            ["--rates", "{d}/r.json"],
            {"r.json": '{"edges": [[0, 2]], "rates": [1]}'},
            "--rates: {d}/r.json is for another graph: edge (0, 2) is not in the topology",
        ),
        (["--topology", "{d}/t.json"], {}, "give one of --topology FILE or --graph KIND:SIZE"),
        (["--duration", "0"], {}, "--duration: must be a number > 0, got '0'"),
        (
            ["--grad-rate", "max", "--scenario", "{d}/s.toml"],
            {"s.toml": "[compute]\nstep_time=0"},
            "--grad-rate max: every node needs a step time > 0 ([compute])",
        ),
    ],
)
def test_bad_simulations_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = invoke(*SIM, *(a.replace("{d}", str(tmp_path)) for a in args))
    assert code == 2, out + err
    assert err.startswith(f"gossipnode: error: {message.replace('{d}', str(tmp_path))}")
    assert err.count("\n") == 1


def test_simulate_then_report(tmp_path: Path) -> None:
    for name, rate in (("slow", "1"), ("fast", "4")):
        code, out, err = invoke(*SIM, "--gossip-rate", rate, "--out", str(tmp_path / name))
        assert code == 0, err
        assert "4 nodes, 5 virtual s" in out
    code, out, err = invoke(
        "report", str(tmp_path / "slow"), str(tmp_path / "fast"), "--out", str(tmp_path / "plots")
    )
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "consensus_distance-vs-time.png" in pngs
    assert "suboptimality-vs-exchanges.png" in pngs
    assert all((tmp_path / "plots" / p).stat().st_size > 10_000 for p in pngs)
    code, _, err = invoke("report", str(tmp_path / "nothing"))
    assert code == 2
    assert "has no trace.jsonl" in err


def test_simulate_a_byzantine_scenario_and_merge(tmp_path: Path) -> None:
    scenario = tmp_path / "byzantine.toml"
    scenario.write_text('[[faults]]\nkind = "byzantine"\nnode = 3\nbehaviour = "sign-flip"\n')
    code, out, err = invoke(
        *["simulate", "--graph", "complete:4", "--task", "digits", "--algorithm", "monna"],
        *["--byzantine-budget", "1", "--duration", "5", "--quiet", "--merge"],
        *["--scenario", str(scenario), "--out", str(tmp_path / "run")],
    )
    assert code == 0, err
    assert "the single global merge (BatchNorm re-estimated at each node): loss=" in out
    assert (tmp_path / "run" / "merged-0.pt").exists()


def test_topology_generate_show_and_plan(tmp_path: Path) -> None:
    topo = tmp_path / "wheel.json"
    code, out, err = invoke(
        "topology", "generate", "wheel", "--n", "8", "--out", str(topo), "--base-port", "7100"
    )
    assert code == 0, err
    assert json.loads(topo.read_text())["nodes"][3] == {"id": 3, "address": "127.0.0.1:7103"}
    code, out, err = invoke("topology", "show", str(topo), "--plot", str(tmp_path / "w.png"))
    assert code == 0, err
    assert "8 nodes, 14 edges, connected, 8 with an address" in out
    assert "degree: min 3, mean 3.5, max 7;  diameter 2" in out
    assert "lambda_2 = " in out
    assert (tmp_path / "w.png").stat().st_size > 10_000
    rates = tmp_path / "rates.json"
    code, out, err = invoke(
        "plan",
        str(topo),
        "--budget",
        "7",
        "--constraint",
        "per-node",
        "--scale",
        "dadao",
        "--out",
        str(rates),
    )
    assert code == 0, err
    assert "planned rates (sdp with CLARABEL" in out
    assert "uniform rates at the same budget:" in out
    data = json.loads(rates.read_text())
    assert len(data["rates"]) == len(data["directed"]) == 14
    assert data["plan"]["chi1"] * data["plan"]["chi2"] == pytest.approx(0.5, rel=1e-6)
    code, out, err = invoke("topology", "show", str(topo), "--rates", str(rates))
    assert code == 0, err
    assert "edge rates: from" in out


@pytest.mark.parametrize(
    ("graph", "args", "message"),
    [
        (
            {"nodes": [{"id": 0}, {"id": 1}, {"id": 2}], "edges": [[0, 1]]},
            [],
            r"the graph is not connected: nodes \[2\] cannot reach node 0",
        ),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 1], [1, 1]]}, [], "is a self-loop"),
        ({"nodes": [{"id": 0}, {"id": 0}], "edges": [[0, 1]]}, [], "node id 0 appears twice"),
        ({"nodes": [{"id": 0}, {"id": 1}], "edges": [[0, 5]]}, [], "node that does not exist"),
        (None, ["--budget", "0"], "--budget: must be a number > 0, got '0'"),
        (None, ["--budget", "-3"], "--budget: must be a number > 0"),
        (None, ["--solver", "MOSEK"], "solver MOSEK is not installed"),
        (None, ["--solver", "SCIPY"], "solver SCIPY failed: "),
        (None, ["--constraint", "per-edge"], "unknown constraint 'per-edge'"),
        (None, ["--scale", "huge"], "--scale: must be budget or dadao"),
    ],
)
def test_bad_plans_are_one_line_and_exit_2(
    tmp_path: Path, graph: dict | None, args: list[str], message: str
) -> None:
    path = tmp_path / "t.json"
    ring = {"nodes": [{"id": i} for i in range(3)], "edges": [[0, 1], [1, 2], [0, 2]]}
    path.write_text(json.dumps(graph or ring))
    code, _, err = invoke("plan", str(path), *args)
    assert code == 2
    assert re.search(message, err), err
    assert err.startswith("gossipnode: error: ")
    assert err.count("\n") == 1


def test_a_node_runs_from_a_topology_file(tmp_path: Path) -> None:
    port = free_port()
    topo = tmp_path / "pair.json"
    topo.write_text(
        json.dumps(
            {
                "nodes": [
                    {"id": 0, "address": f"127.0.0.1:{port}"},
                    {"id": 1, "address": "127.0.0.1:9"},
                ],
                "edges": [[0, 1]],
            }
        )
    )
    code, out, err = invoke(
        "run",
        "--id",
        "0",
        "--topology",
        str(topo),
        "--task",
        "logreg",
        "--duration",
        "1",
        "--json",
        "--progress-every",
        "0",
        "--insecure",
    )
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["exchanges"]["skipped_unreachable"] >= 0  # its neighbour is not running


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--algorithm", "monna", "--byzantine-budget", "1"],
            "--byzantine-budget: dropping 1 of at most 1 models (own included) needs 2b < 1",
        ),
        (["--blend", "2"], "--blend: must be between 0 and 1, got '2'"),
        (["--variance-target", "mean"], "--variance-target: must be one of others, median, "),
        (["--dense-window", "0.9"], "--dense-window: must be START:END, fractions of --duration"),
        (["--dense-window", "0.9:0.5"], "--dense-window: must be START:END with START < END"),
        (["--byzantine", "lie"], "--byzantine: must be one of sign-flip, alie, foe, noise, "),
        (["--momentum", "1"], "--momentum: must be >= 0 and < 1, got '1'"),
        (["--gossip-steps", "0"], "--gossip-steps: must be an integer >= 1, got 0"),
        (
            ["--byzantine", "label-flip", "--task", "logreg"],
            "--byzantine: label-flip needs a classification task with classes; 'logreg' has none",
        ),
        (["--task", "digits(model=vgg)"], "--task: task 'digits(model=vgg)' failed to build"),
    ],
)
def test_bad_mixing_options(args: list[str], message: str) -> None:
    code, _, err = invoke(*BASE, *args)
    assert code == 2
    assert err.startswith(f"gossipnode: error: {message}"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mu", "0"], "--mu: must be a finite number > 0, got '0'"),
        (["--mu", "5", "--L", "1"], "--L: L (1.0) must be >= mu (5.0)"),
        ([], "--topology: dadao needs the whole graph for chi_1 and chi_2"),
        (
            ["--batch-size", "32", "--dadao-chi1", "1", "--dadao-chi2", "1"],
            "--batch-size: dadao needs full-batch gradients",
        ),
        (
            ["--grad-rate", "max", "--dadao-chi1", "1", "--dadao-chi2", "1"],
            "--grad-rate: dadao needs a gradient rate > 0",
        ),
        (
            ["--task", "digits", "--dadao-chi1", "1", "--dadao-chi2", "1"],
            "--mu and --L: task 'digits' does not know them",
        ),
    ],
)
def test_bad_dadao_options(args: list[str], message: str) -> None:
    code, _, err = invoke(
        *BASE,
        "--algorithm",
        "dadao",
        "--task",
        "linreg",
        "--batch-size",
        "0",
        "--grad-rate",
        "5",
        *args,
    )
    assert code == 2
    assert err.startswith(f"gossipnode: error: {message}"), err
    assert err.count("\n") == 1


def test_keygen_makes_a_key_that_run_accepts_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    code, out, _ = invoke("keygen", "--out", str(key))
    assert code == 0
    assert f"--cluster-key {key}" in out
    assert key.stat().st_mode & 0o777 == 0o600
    code, _, err = invoke("keygen", "--out", str(key))
    assert code == 2
    assert "exists; remove it first" in err
    run = [*BASE[:-1], "--task", "logreg", "--grad-rate", "0"]
    assert invoke(*run, "--cluster-key", str(key))[0] == 0
    code, _, err = invoke(*run)
    assert code == 2
    assert err.startswith("gossipnode: error: no authentication: give --cluster-key FILE")
    code, _, err = invoke(*run, "--cluster-key", str(tmp_path / "nope.key"))
    assert code == 2
    assert "--cluster-key: no such file" in err
