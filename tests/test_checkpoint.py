"""Checkpoints: atomic files that load with weights_only, and nodes that resume from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from gossipnode import checkpoint
from gossipnode.checkpoint import Checkpoint, CheckpointError
from gossipnode.cluster import ring
from gossipnode.factory import make_algorithm
from gossipnode.node import Node
from gossipnode.transport import MemoryNetwork

from .helpers import config, task

torch.set_num_threads(1)


def sample() -> Checkpoint:
    return Checkpoint(
        {"x": torch.arange(4.0), "e/3": torch.ones(2, dtype=torch.float64)},
        torch.zeros(0),
        torch.Generator().manual_seed(1).get_state(),
        {"node": 1, "stats": {"gradients": 7}},
    )


def test_a_checkpoint_round_trips_and_loads_without_pickle(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.FILE
    checkpoint.save(path, sample())
    loaded = checkpoint.load(path)
    assert torch.equal(loaded.state["x"], torch.arange(4.0))
    assert loaded.meta == {"format": checkpoint.FORMAT, "node": 1, "stats": {"gradients": 7}}
    torch.load(path, weights_only=True)  # what load does: no arbitrary objects
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]  # no temporary left


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "cannot read"),
        (b"not a checkpoint at all", "cannot read"),
        (None, "is not a gossipnode checkpoint"),
    ],
    ids=["empty", "garbage", "foreign"],
)
def test_a_bad_checkpoint_is_an_error_that_says_why(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / checkpoint.FILE
    if content is None:
        torch.save({"params": torch.zeros(3)}, path)  # a model file, say
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_write_cut_short_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / checkpoint.FILE
    checkpoint.save(path, sample())

    def crash(src: object, dst: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr("gossipnode.checkpoint.os.replace", crash)
    newer = sample()
    newer.state = {"x": torch.zeros(4)}
    with pytest.raises(OSError, match="killed before the rename"):
        checkpoint.save(path, newer)
    assert torch.equal(checkpoint.load(path).state["x"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]  # the temporary is gone


def node_for(tmp_path: Path, i: int, *, resume: Checkpoint | None = None, **changes: str) -> Node:
    chis = {"dadao_chi1": 1.0, "dadao_chi2": 1.0} if changes.get("algorithm") == "dadao" else {}
    cfg = config(i, 3, ring(3)[i], duration=20.0, checkpoint_every=5.0, **chis, **changes)
    built = task(cfg.task, n=3)
    return Node(
        cfg,
        transport=NETWORK,
        task=built,
        algorithm=make_algorithm(cfg, built),
        threaded=False,
        checkpoint_path=tmp_path / f"node-{i}.pt",
        resume=resume,
    )


NETWORK = MemoryNetwork()


@pytest.mark.parametrize("algorithm", ["gossip", "monna", "dadao"])
async def test_a_node_resumes_where_it_stopped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, algorithm: str
) -> None:
    global NETWORK
    NETWORK = MemoryNetwork()
    nodes = [node_for(tmp_path, i, algorithm=algorithm) for i in range(3)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.run)
    saved = checkpoint.load(tmp_path / "node-0.pt")
    assert saved.meta["stats"]["gradients"] == nodes[0].stats.gradients > 100
    assert saved.meta["now"] == pytest.approx(20.0)
    assert all(torch.equal(v, nodes[0].state[k]) for k, v in saved.state.items())
    assert saved.meta["peers"] == [1, 2]

    NETWORK = MemoryNetwork()
    again = node_for(tmp_path, 0, resume=saved, algorithm=algorithm)
    if algorithm != "dadao":  # (DADAO's model moved: the reset took back the edges' z)
        assert torch.equal(again.params(), nodes[0].params())  # not a fresh model
    assert again.stats.gradients == nodes[0].stats.gradients  # the step counter goes on
    if algorithm == "monna":  # what the neighbours' cache slots held is dropped: they restart
        assert not any(k.startswith("c/") for k in again.state)
    if algorithm == "dadao":  # the edges' shares of z are taken back, as the neighbours do
        assert any(k.startswith("e/") for k in saved.state)
        for key in (k for k in again.state if k.startswith("e/")):
            assert float(again.state[key].abs().sum()) == 0.0, key
    summary = await again.run()
    assert summary["gradients"] > saved.meta["stats"]["gradients"]
    assert summary["elapsed"] == pytest.approx(40.0)  # its clock went on (DADAO's flow needs it)


def test_a_checkpoint_of_another_node_or_setup_is_refused(tmp_path: Path) -> None:
    saved = sample()
    saved.meta = {"node": 0, "task": "logreg", "algorithm": "gossip", "signature": ""}
    with pytest.raises(ValueError, match="the checkpoint is of node 0, not 1"):
        node_for(tmp_path, 1, resume=saved)
    with pytest.raises(ValueError, match="the checkpoint is of algorithm 'gossip', not 'monna'"):
        node_for(tmp_path, 0, resume=saved, algorithm="monna")
    with pytest.raises(ValueError, match="the checkpoint's 'x' does not fit this model"):
        node_for(tmp_path, 0, resume=saved)  # logreg's model is not arange(4)
