"""Byzantine attacks: what they send, and that the line search finds the defence's weak spot."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from gossipnode.byzantine import ATTACKS, View, alie, foe, line_maximize, sign_flip
from gossipnode.mixing import nna

torch.set_num_threads(1)


def honest(k: int = 6, d: int = 50, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=gen)
    return [centre + 0.1 * torch.randn(d, generator=gen) for _ in range(k)]


def mean(pivot: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([pivot, *received]).mean(0)


def test_line_maximize_finds_an_interior_maximum_within_its_budget() -> None:
    calls = []

    def f(x: float) -> float:
        calls.append(x)
        return -((x - 5.3) ** 2)

    best = line_maximize(f, evaluations=16)
    assert len(calls) == 16
    assert abs(best - 5.3) < 1.5
    assert line_maximize(lambda x: -x) == 0.0  # decreasing: stays at 0


def test_sign_flip_sends_minus_the_honest_mean() -> None:
    models = honest()
    view = View(models[0], models, mean)
    assert torch.allclose(sign_flip(view, random.Random(0)), -torch.stack(models).mean(0))


def test_alie_pushes_hard_against_plain_averaging_and_stays_close_under_nna() -> None:
    models = honest()
    undefended = View(models[0], models, mean, copies=2)
    defended = View(models[0], models, lambda p, r: nna(p, r, 2), copies=2)
    z_plain = _strength(alie(undefended, random.Random(0)), undefended)
    z_nna = _strength(alie(defended, random.Random(0)), defended)
    assert z_plain > 100  # unbounded damage: the search keeps doubling
    assert z_nna < z_plain / 10  # it must hide among the honest models to be kept


def _strength(attack: torch.Tensor, view: View) -> float:
    return float(((attack - view.mean()) / view.std()).abs().median())


def test_foe_line_search_maximises_the_damage_it_reports() -> None:
    models = honest()
    view = View(models[0], models, lambda p, r: nna(p, r, 2), copies=2)
    attack = foe(view, random.Random(0))
    searched = [view.damage((1 - e) * view.mean()) for e in (0.0, 1.0, 2.0)]  # all probed
    assert view.damage(attack) >= max(searched) > 0


def test_wire_breaking_attacks_send_what_receivers_must_refuse() -> None:
    own = torch.ones(5)
    view = View(own, [], mean)
    assert torch.isnan(ATTACKS["nan"](view, random.Random(0))).all()
    assert ATTACKS["wrong-shape"](view, random.Random(0)).shape == (6,)
    noisy = ATTACKS["noise"](view, random.Random(0))
    assert noisy.shape == own.shape
    assert not torch.equal(noisy, own)


def test_without_neighbours_an_attack_uses_its_own_model() -> None:
    own = torch.ones(3)
    assert sign_flip(View(own, [], mean), random.Random(0)).tolist() == [-1, -1, -1]
