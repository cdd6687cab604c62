"""The gossip algorithm against its equations and a dense oracle."""

from __future__ import annotations

import random

import pytest
import torch

from gossipnode.algorithms import Gossip, make_algorithm


def test_gradient_step_is_sgd() -> None:
    alg = Gossip(lr=0.1)
    state = alg.init(torch.tensor([1.0, 2.0]))
    alg.apply_gradient(state, torch.tensor([10.0, -10.0]), now=0.0)
    assert torch.allclose(alg.params(state), torch.tensor([0.0, 3.0]), atol=1e-6)


def test_exchange_averages_a_pair() -> None:
    alg = Gossip(lr=0.1)
    a, b = alg.init(torch.tensor([0.0, 4.0])), alg.init(torch.tensor([2.0, 0.0]))
    pa, pb = alg.payload(a, 0.0), alg.payload(b, 0.0)
    alg.mix(a, pa, pb, 0.0)
    alg.mix(b, pb, pa, 0.0)
    assert torch.equal(alg.params(a), torch.tensor([1.0, 2.0]))
    assert torch.equal(alg.params(b), torch.tensor([1.0, 2.0]))


def test_payload_is_a_copy() -> None:
    alg = Gossip(lr=0.1)
    state = alg.init(torch.zeros(3))
    payload = alg.payload(state, 0.0)
    alg.apply_gradient(state, torch.ones(3), 0.0)
    assert torch.equal(payload[0], torch.zeros(3))


def test_sum_is_conserved_when_state_moves_during_an_exchange() -> None:
    """An exchange whose initiator took a gradient step while waiting still conserves the
    sum of the models up to that step: the pair, not the current state, is what is mixed."""
    alg = Gossip(lr=0.5)
    a, b = alg.init(torch.tensor([1.0])), alg.init(torch.tensor([3.0]))
    sent = alg.payload(a, 0.0)
    alg.apply_gradient(a, torch.tensor([2.0]), 0.0)  # a moves by -1 while in flight
    reply = alg.payload(b, 0.0)
    alg.mix(b, reply, sent, 0.0)
    alg.mix(a, sent, reply, 0.0)
    assert float(alg.params(a) + alg.params(b)) == pytest.approx(1.0 + 3.0 - 1.0)


def test_random_pairwise_exchanges_match_the_dense_oracle() -> None:
    """Each exchange is x <- W_ij x with W_ij = I - (e_i - e_j)(e_i - e_j)^T / 2."""
    n, d = 6, 4
    rng = random.Random(0)
    alg = Gossip(lr=0.1)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = [alg.init(x0[i]) for i in range(n)]
    dense = x0.clone()
    for _ in range(200):
        i, j = rng.sample(range(n), 2)
        pi, pj = alg.payload(states[i], 0.0), alg.payload(states[j], 0.0)
        alg.mix(states[i], pi, pj, 0.0)
        alg.mix(states[j], pj, pi, 0.0)
        e = torch.zeros(n, dtype=torch.float64)
        e[i], e[j] = 1.0, -1.0
        dense = (torch.eye(n, dtype=torch.float64) - torch.outer(e, e) / 2) @ dense  # (n, d)
    got = torch.stack([alg.params(s) for s in states])
    assert torch.allclose(got, dense, atol=1e-12)
    assert torch.allclose(got.mean(0), x0.mean(0), atol=1e-12)


def test_unknown_algorithm_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'sgp'; known: gossip"):
        make_algorithm("sgp", lr=0.1)
