"""Byzantine behaviours for evaluation: what a misbehaving node sends instead of its model.

An attack sees what the node itself knows (``View``): the model it would send, the latest
models of its neighbours (its cache, for the cache rules) and the rule honest nodes mix with.
With everyone hearing everyone that is the omniscient attacker of mixing.md section 2.2; on a
sparse graph it is a realistic, local one. ALIE and FOE pick their strength by the line
search of the MoNNA authors' code (``line_maximize``), against the defence actually in use.
Label flipping is not a payload attack: the node trains on flipped labels (``Learner``) and
sends honestly. Pure functions; the random ones draw from the generator they are given.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Defence = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True, slots=True)
class View:
    own: torch.Tensor  # the model this node would send
    honest: Sequence[torch.Tensor]  # the models its neighbours sent it last
    defence: Defence  # how an honest receiver mixes its own model with received ones
    copies: int = 1  # attack vectors an honest receiver gets (the Byzantine nodes agree)
    evaluations: int = 16

    @property
    def models(self) -> Sequence[torch.Tensor]:
        return self.honest or (self.own,)

    def mean(self) -> torch.Tensor:
        return torch.stack(list(self.models)).mean(0)

    def std(self) -> torch.Tensor:
        if len(self.models) < 2:
            return torch.zeros_like(self.own)
        return torch.stack(list(self.models)).std(0)  # ddof 1, as the authors' code

    def damage(self, attack: torch.Tensor) -> float:
        """How far the honest nodes' mean after mixing lands from their mean before:
        |mean_i defence(x_i, others + copies x attack) - mean|^2, what the attacker maximises."""
        models, mean = self.models, self.mean()
        outputs = [
            self.defence(x, [*models[:i], *models[i + 1 :], *[attack] * self.copies])
            for i, x in enumerate(models)
        ]
        return float((torch.stack(outputs).mean(0) - mean).pow(2).sum())


Attack = Callable[[View, random.Random], torch.Tensor]


def line_maximize(f: Callable[[float], float], evaluations: int = 16) -> float:
    """The argmax of ``f`` over [0, inf) as the MoNNA code searches it, in ``evaluations``
    calls: from 0 with step 1, double the step while f improves; then probe around the best
    point, shrinking the step by 0.8 each time."""
    best_x, best = 0.0, f(0.0)
    step, expanding, left = 1.0, True, evaluations - 1
    while left > 0:
        if expanding:
            value, left = f(best_x + step), left - 1
            if value > best:
                best_x, best, step = best_x + step, value, step * 2
            else:
                expanding, step = False, step * 0.8
            continue
        for x in (best_x + step, best_x - step):
            if x < 0 or left == 0:
                continue
            value, left = f(x), left - 1
            if value > best:
                best_x, best = x, value
                break
        step *= 0.8
    return best_x


def sign_flip(view: View, rng: random.Random) -> torch.Tensor:
    """-mean of the honest models."""
    return -view.mean()


def alie(view: View, rng: random.Random) -> torch.Tensor:
    """ "A little is enough": mean + z std, z line-searched against the defence."""
    mean, std = view.mean(), view.std()
    z = line_maximize(lambda z: view.damage(mean + z * std), view.evaluations)
    return mean + z * std


def foe(view: View, rng: random.Random) -> torch.Tensor:
    """ "Fall of empires" (inner-product manipulation): (1 - eps) mean, eps line-searched."""
    mean = view.mean()
    eps = line_maximize(lambda e: view.damage((1 - e) * mean), view.evaluations)
    return (1 - eps) * mean


def noise(view: View, rng: random.Random) -> torch.Tensor:
    """Its own model plus standard Gaussian noise."""
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    return view.own + torch.randn(view.own.shape, generator=gen, dtype=view.own.dtype)


def nan(view: View, rng: random.Random) -> torch.Tensor:
    """NaNs, which every receiver's wire layer must refuse."""
    return torch.full_like(view.own, float("nan"))


def wrong_shape(view: View, rng: random.Random) -> torch.Tensor:
    """A model one element too long, which every receiver's wire layer must refuse."""
    return torch.zeros(view.own.numel() + 1, dtype=view.own.dtype)


ATTACKS: dict[str, Attack] = {
    "sign-flip": sign_flip,
    "alie": alie,
    "foe": foe,
    "noise": noise,
    "nan": nan,
    "wrong-shape": wrong_shape,
}
LABEL_FLIP = "label-flip"
BEHAVIOURS = (*ATTACKS, LABEL_FLIP)
