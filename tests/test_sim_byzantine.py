"""Byzantine nodes in virtual time: what every mode refuses, and what MoNNA tolerates."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from gossipnode.graphs import from_spec
from gossipnode.scenario import Byzantine, Scenario
from gossipnode.sim import SimOptions, simulate

torch.set_num_threads(1)

MODES: dict[str, dict[str, Any]] = {
    "gossip": {},
    "monna": {"node_options": {"byzantine_budget": 1}},
    "variance-corrected": {},
    "dfedsam": {"node_options": {"local_steps": 2}},
    "dadao": {"task": "linreg", "batch_size": 0, "duration": 10.0},
}


@pytest.mark.parametrize("attack", ["nan", "wrong-shape"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_refuses_broken_payloads_and_trains_on(mode: str, attack: str) -> None:
    settings = {"task": "digits", "duration": 20.0, **MODES[mode]}
    options = SimOptions(
        from_spec("complete:4"),
        algorithm=mode,
        grad_rate=1.0,
        gossip_rate=1.0,
        scenario=Scenario(byzantine=(Byzantine(3, attack),)),
        **settings,
    )
    summary = simulate(options, None)
    honest = summary["per_node"][:3]
    for node in honest:
        refused = node["exchanges"]["rejected"] + node["exchanges"]["failed"]
        assert refused > 0, node  # as responder it rejects; as initiator its exchange fails
        assert node["exchanges"]["ok"] > 0, node  # with the honest ones
        assert node["gradients"] > 0
        metric = node.get("accuracy", node.get("error"))
        assert metric is not None
        assert math.isfinite(metric), node


def _honest_accuracy(attack: str | None, budget: int) -> float:
    byzantine = () if attack is None else (Byzantine(4, attack),)
    options = SimOptions(
        from_spec("complete:5"),
        task="digits(alpha=1)",
        algorithm="monna",
        duration=150.0,
        seed=1,
        grad_rate=1.0,
        gossip_rate=2.0,
        lr=0.5,
        batch_size=25,
        init="shared",
        node_options={"byzantine_budget": budget},
        scenario=Scenario(byzantine=byzantine),
    )
    summary = simulate(options, None)
    return float(sum(m["accuracy"] for m in summary["per_node"][:4]) / 4)


def test_monna_keeps_a_sign_flipper_out_where_plain_averaging_collapses() -> None:
    clean = _honest_accuracy(None, budget=1)
    defended = _honest_accuracy("sign-flip", budget=1)
    undefended = _honest_accuracy("sign-flip", budget=0)
    assert clean > 0.6  # 150 steps: learning, far from chance (0.1)
    assert defended > clean - 0.05
    assert undefended < 0.3
