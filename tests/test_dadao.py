"""DADAO against its equations (dadao.md sections 2.2-2.4), by hand and over many events."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gossipnode.dadao import XT, YT, ZT, Dadao, Parameters, X, Y, Z

PARAMS = Parameters(mu=1.0, L=3.0, chi1=2.0, chi2=0.25)  # chi_1 chi_2 = 1/2


def test_parameters_follow_lemma_12() -> None:
    mu, L, chi1, chi2 = 0.8, 5.0, 4.0, 0.5  # P = 2 > 1/2: the general formulas
    p = Parameters(mu, L, chi1, chi2, alpha_variant="paper")
    nu, P = mu / 2, chi1 * chi2
    s = math.sqrt(nu / (P * L))
    assert p.nu == nu
    assert p.p == P
    assert p.eta == pytest.approx(s / (8 * math.sqrt(2)))
    assert p.alpha == pytest.approx(s / (8 * math.sqrt(2)))
    assert p.delta == pytest.approx(s / (4 * math.sqrt(2)))
    assert p.delta_tilde == 1.0
    assert p.gamma == pytest.approx(1 / (4 * L))
    assert p.gamma_tilde == pytest.approx(1 / (4 * math.sqrt(2) * math.sqrt(nu * L * P)))
    assert p.theta == pytest.approx(math.sqrt(L / (P * nu)) / (2 * math.sqrt(2)))
    assert p.beta == 0.5
    assert p.beta_tilde == pytest.approx(math.sqrt(2 * chi1 * L / (chi2 * nu)))
    assert Parameters(mu, L, chi1, chi2).alpha == pytest.approx(2 * p.eta)  # the code's alpha


def test_at_the_normalised_rate_they_reduce_to_the_codes_constants() -> None:
    p, nu, L = PARAMS, PARAMS.nu, PARAMS.L
    assert p.eta == pytest.approx(math.sqrt(nu / L) / 8)
    assert p.delta == pytest.approx(math.sqrt(nu / L) / 4)
    assert p.gamma_tilde == pytest.approx(1 / (4 * math.sqrt(L * nu)))
    assert p.theta == pytest.approx(math.sqrt(L / nu) / 2)
    assert p.beta_tilde == pytest.approx(2 * p.chi1 * math.sqrt(L / nu))
    assert p.rate == pytest.approx(math.sqrt(p.mu / p.L) / 8)


def test_more_communication_than_normalised_uses_p_eff() -> None:
    fast = Parameters(1.0, 3.0, chi1=0.5, chi2=0.1)  # chi_1 chi_2 = 0.05
    assert fast.p == 0.5
    assert fast.eta == PARAMS.eta


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 1.0, 1.0, 1.0), "mu must be > 0"),
        ((-1.0, 1.0, 1.0, 1.0), "mu must be > 0"),
        ((2.0, 1.0, 1.0, 1.0), "L must be >= mu"),
        ((1.0, 2.0, 0.0, 1.0), "chi_1 and chi_2"),
    ],
)
def test_bad_parameters(args: tuple[float, float, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Parameters(*args)


def test_flows_compose() -> None:
    alg = Dadao(PARAMS)
    for a, b in ((0.3, 1.7), (5.0, 12.5), (0.0, 2.0)):
        assert torch.allclose(alg.flow(a) @ alg.flow(b), alg.flow(a + b), atol=1e-12)
    assert torch.allclose(alg.flow(0.0), torch.eye(6, dtype=torch.float64))


def test_the_flow_solves_the_ode() -> None:
    """d/dt expm(tA) S = A expm(tA) S, checked by a small finite difference."""
    alg = Dadao(PARAMS)
    s = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = 1e-6
    derivative = (alg.flow(1.0 + h) @ s - alg.flow(1.0 - h) @ s) / (2 * h)
    assert torch.allclose(derivative, PARAMS.matrix() @ alg.flow(1.0) @ s, atol=1e-6)


def three_nodes() -> tuple[Dadao, list[dict[str, torch.Tensor]]]:
    alg = Dadao(PARAMS)
    states = [alg.init(torch.tensor([float(k), -float(k)], dtype=torch.float64)) for k in (1, 2, 3)]
    return alg, states


def test_a_gradient_event_by_hand() -> None:
    alg, states = three_nodes()
    p = PARAMS
    state = states[1]  # x = x~ = (2, -2), everything else 0, at time 0
    grad = torch.tensor([0.5, 1.5], dtype=torch.float64)
    after = alg.apply_gradient(state, grad, now=0.0)["s"]
    r = grad - p.nu * torch.tensor([2.0, -2.0], dtype=torch.float64) - 0.0  # - y~ = 0
    assert torch.allclose(after[X], torch.tensor([2.0, -2.0], dtype=torch.float64) - p.gamma * r)
    assert torch.allclose(
        after[XT], torch.tensor([2.0, -2.0], dtype=torch.float64) - p.gamma_tilde * r
    )
    assert torch.allclose(after[YT], (p.delta + p.delta_tilde) * r)
    assert torch.equal(after[Y], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(after[Z], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(after[ZT], torch.zeros(2, dtype=torch.float64))


def test_an_edge_event_by_hand() -> None:
    alg, states = three_nodes()
    p = PARAMS
    # give nodes 0 and 2 some y and z, at time 0
    s0, s2 = states[0]["s"].clone(), states[2]["s"].clone()
    s0[Y], s0[Z] = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    s2[Y], s2[Z] = torch.tensor([-1.0, 4.0]), torch.tensor([0.0, -1.0])
    a, b = {**states[0], "s": s0}, {**states[2], "s": s2}
    wa, wb = alg.payload(a, 0.0), alg.payload(b, 0.0)
    assert torch.allclose(wa[0], torch.tensor([1.5, 2.0], dtype=torch.float64))  # y + z
    a2 = alg.mix(a, wa, (wb[0].clone(),), 0.0, peer=2)
    b2 = alg.mix(b, wb, (wa[0].clone(),), 0.0, peer=0)
    m = torch.tensor([1.5, 2.0], dtype=torch.float64) - torch.tensor([-1.0, 3.0])  # wa - wb
    assert torch.allclose(a2["s"][Z], s0[Z] - p.beta * m)
    assert torch.allclose(a2["s"][ZT], s0[ZT] - p.beta_tilde * m)
    assert torch.allclose(b2["s"][Z], s2[Z] + p.beta * m)
    assert torch.allclose(b2["s"][ZT], s2[ZT] + p.beta_tilde * m)
    for key in (X, XT, Y, YT):  # the model is never touched by an exchange
        assert torch.equal(a2["s"][key], s0[key])
    assert torch.allclose(a2["s"][Z] + b2["s"][Z], s0[Z] + s2[Z])


def test_sums_of_z_are_conserved_over_many_random_events() -> None:
    n, rng = 5, random.Random(1)
    alg = Dadao(PARAMS, time_unit=0.5)
    states = [
        alg.init(torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)))
        for i in range(n)
    ]
    t = 0.0
    for _ in range(10_000):
        t += rng.expovariate(20.0)
        if rng.random() < 0.3:
            i = rng.randrange(n)
            grad = torch.randn(
                3, dtype=torch.float64, generator=torch.Generator().manual_seed(rng.getrandbits(31))
            )
            states[i] = alg.apply_gradient(states[i], grad, t)
        else:
            i, j = rng.sample(range(n), 2)
            wi, wj = alg.payload(states[i], t), alg.payload(states[j], t)
            states[i] = alg.mix(states[i], wi, (wj[0].clone(),), t, peer=j)
            states[j] = alg.mix(states[j], wj, (wi[0].clone(),), t, peer=i)
    for key in ("z", "z~"):
        vectors = torch.stack([alg.invariants(s, t)[key] for s in states])
        assert float(vectors.sum(0).norm()) <= 1e-9 * float(vectors.norm(dim=1).sum())


def test_resetting_the_edge_to_a_restarted_node_restores_the_sums() -> None:
    alg, states = three_nodes()
    t = 0.0
    for i, j in [(0, 1), (1, 2), (0, 2), (1, 0), (2, 1)] * 3:
        t += 0.4
        wi, wj = alg.payload(states[i], t), alg.payload(states[j], t)
        states[i] = alg.mix(states[i], wi, (wj[0].clone(),), t, peer=j)
        states[j] = alg.mix(states[j], wj, (wi[0].clone(),), t, peer=i)
    # node 2 restarts with fresh state; the others take back what their edges to it carried
    states[2] = alg.init(torch.tensor([3.0, -3.0], dtype=torch.float64))
    t += 0.4
    states[0] = alg.reset_edge(states[0], 2, t)
    states[1] = alg.reset_edge(states[1], 2, t)
    assert "e/2" not in states[0]
    for key in ("z", "z~"):
        vectors = torch.stack([alg.invariants(s, t)[key] for s in states])
        assert float(vectors.sum(0).norm()) <= 1e-9 * float(vectors.norm(dim=1).sum())
    assert alg.reset_edge(states[0], 7, t) is states[0]  # a stranger: nothing to undo
