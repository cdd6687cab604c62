"""The gossip algorithm against its equations and a dense oracle."""

from __future__ import annotations

import random

import pytest
import torch

from gossipnode.algorithms import Gossip, State

ALG = Gossip(lr=0.5)


def exchange(a: State, b: State) -> tuple[State, State]:
    """One exchange between a and b, as the two nodes run it."""
    sent, reply = ALG.payload(a, 0.0), ALG.payload(b, 0.0)
    b = ALG.mix(b, reply, tuple(t.clone() for t in sent), 0.0, 0)  # each end gets its own copy
    a = ALG.mix(a, sent, tuple(t.clone() for t in reply), 0.0, 1)
    return a, b


def test_gradient_step_is_sgd() -> None:
    state = ALG.init(torch.tensor([1.0, 2.0]))
    state = ALG.apply_gradient(state, torch.tensor([2.0, -2.0]), now=0.0)
    assert torch.equal(ALG.params(state, 0.0), torch.tensor([0.0, 3.0]))


def test_exchange_averages_a_pair() -> None:
    a, b = exchange(ALG.init(torch.tensor([0.0, 4.0])), ALG.init(torch.tensor([2.0, 0.0])))
    assert torch.equal(ALG.params(a, 0.0), torch.tensor([1.0, 2.0]))
    assert torch.equal(ALG.params(b, 0.0), torch.tensor([1.0, 2.0]))


def test_state_tensors_are_never_written() -> None:
    """A payload or snapshot shares the state's memory, so updates must make new tensors."""
    state = ALG.init(torch.zeros(3))
    payload, snapshot = ALG.payload(state, 0.0), ALG.params(state, 0.0)
    state = ALG.apply_gradient(state, torch.ones(3), 0.0)
    state = ALG.mix(state, (torch.zeros(3),), (torch.full((3,), 4.0),), 0.0, 1)
    assert torch.equal(payload[0], torch.zeros(3))
    assert torch.equal(snapshot, torch.zeros(3))
    assert not torch.equal(ALG.params(state, 0.0), torch.zeros(3))


def test_sum_is_conserved_when_state_moves_during_an_exchange() -> None:
    """The initiator took a gradient step while waiting for the reply: the pair, not the
    current state, is what is mixed, so the sum changes only by that step."""
    a, b = ALG.init(torch.tensor([1.0])), ALG.init(torch.tensor([3.0]))
    sent = ALG.payload(a, 0.0)
    a = ALG.apply_gradient(a, torch.tensor([2.0]), 0.0)  # a moves by -1 while in flight
    reply = ALG.payload(b, 0.0)
    b = ALG.mix(b, reply, (sent[0].clone(),), 0.0, 0)
    a = ALG.mix(a, sent, (reply[0].clone(),), 0.0, 1)
    assert float(ALG.params(a, 0.0) + ALG.params(b, 0.0)) == pytest.approx(1.0 + 3.0 - 1.0)
    assert float(ALG.params(a, 0.0)) == pytest.approx(0.0 + (3.0 - 1.0) / 2)


def test_random_pairwise_exchanges_match_the_dense_oracle() -> None:
    """Each exchange is x <- W_ij x with W_ij = I - (e_i - e_j)(e_i - e_j)^T / 2."""
    n, d = 6, 4
    rng = random.Random(0)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = [ALG.init(x0[i]) for i in range(n)]
    dense = x0.clone()
    for _ in range(200):
        i, j = rng.sample(range(n), 2)
        states[i], states[j] = exchange(states[i], states[j])
        e = torch.zeros(n, dtype=torch.float64)
        e[i], e[j] = 1.0, -1.0
        dense = (torch.eye(n, dtype=torch.float64) - torch.outer(e, e) / 2) @ dense  # (n, d)
    got = torch.stack([ALG.params(s, 0.0) for s in states])
    assert torch.allclose(got, dense, atol=1e-12)
    assert torch.allclose(got.mean(0), x0.mean(0), atol=1e-12)


def test_gossip_momentum_is_local_heavy_ball() -> None:
    rule = Gossip(lr=0.5, momentum=0.9)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    state = rule.apply_gradient(state, torch.ones(1, dtype=torch.float64), 0.0)
    state = rule.apply_gradient(state, torch.ones(1, dtype=torch.float64), 0.0)
    assert state["m"].tolist() == [1.9]  # m = 0.9 m + g, as torch.optim.SGD
    assert state["x"].tolist() == [-0.5 - 0.95]
    (sent,) = rule.payload(state, 0.0)
    mixed = rule.mix(state, (sent,), (torch.tensor([1.55], dtype=torch.float64),), 0.0, 1)
    assert float(mixed["x"]) == pytest.approx(0.05)  # the models average, momentum stays
    assert mixed["m"] is state["m"]
