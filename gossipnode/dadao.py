"""DADAO: decoupled accelerated decentralized asynchronous optimisation (Nabli & Oyallon).

Exactly as ../shared/reference/dadao.md, sections 1-2 and 6. Each node holds six vectors
S = (x, x~, y, y~, z, z~) in float64. Between events they follow the linear flow
dS/dt = A S, applied in closed form as expm((t - T) A) S. A gradient event updates x, x~ and y~
with the residual grad f_i(x) - nu x - y~; an edge event exchanges w = y + z (never x) and
both ends apply z -= beta (w_self - w_other), z~ -= beta~ (w_self - w_other) with the same
pair, so sum_i z_i and sum_i z~_i stay 0.

Time is in DADAO's unit, the mean interval between a node's gradients: the algorithm is given
seconds and divides by ``time_unit``. The node also keeps, per neighbour, what the exchanges on
that edge have put into its (z, z~), carried along by the flow (the (z, z~) block of A is
closed), so that when a neighbour restarts with fresh state that share can be taken back
(``reset_edge``) and the sums stay 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from gossipnode.algorithms import State
from gossipnode.wire import Payload

X, XT, Y, YT, Z, ZT = range(6)


@dataclass(frozen=True, slots=True)
class Parameters:
    """Lemma 12's constants for given mu, L, chi_1, chi_2 (all in DADAO's time unit)."""

    mu: float
    L: float
    chi1: float
    chi2: float
    alpha_variant: str = "code"  # "paper": alpha = eta; "code": 2 eta, as the authors' code

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be > 0, got {self.mu}")
        if not (math.isfinite(self.L) and self.mu <= self.L):
            raise ValueError(f"L must be >= mu ({self.mu}), got {self.L}")
        if not (self.chi1 > 0 and self.chi2 > 0 and math.isfinite(self.chi1 * self.chi2)):
            raise ValueError(f"chi_1 and chi_2 must be > 0, got {self.chi1}, {self.chi2}")
        if self.alpha_variant not in ("paper", "code"):
            raise ValueError(f"alpha must be paper or code, got {self.alpha_variant!r}")

    @property
    def nu(self) -> float:
        return self.mu / 2

    @property
    def p(self) -> float:
        """P_eff = max(chi_1 chi_2, 1/2): more communication than that does not speed it up,
        and the parameters of a smaller P diverge (dadao.md 2.4, pitfall 1)."""
        return max(self.chi1 * self.chi2, 0.5)

    @property
    def s(self) -> float:
        return math.sqrt(self.nu / (self.p * self.L))

    @property
    def eta(self) -> float:  # also eta~ and alpha~
        return self.s / (8 * math.sqrt(2))

    @property
    def alpha(self) -> float:
        return self.eta * (2 if self.alpha_variant == "code" else 1)

    @property
    def delta(self) -> float:
        return self.s / (4 * math.sqrt(2))

    delta_tilde: ClassVar[float] = 1.0
    beta: ClassVar[float] = 0.5

    @property
    def gamma(self) -> float:
        return 1 / (4 * self.L)

    @property
    def gamma_tilde(self) -> float:
        return 1 / (4 * math.sqrt(2) * math.sqrt(self.nu * self.L * self.p))

    @property
    def theta(self) -> float:
        return math.sqrt(self.L / (self.p * self.nu)) / (2 * math.sqrt(2))

    @property
    def beta_tilde(self) -> float:
        return math.sqrt(2 * self.chi1 * self.L / (self.chi2 * self.nu))

    @property
    def rate(self) -> float:
        """Theorem 4's decay rate of E|x - x*|^2 per time unit: sqrt(mu/(L P)) / (8 sqrt 2)."""
        return math.sqrt(self.mu / (self.L * self.p)) / (8 * math.sqrt(2))

    def matrix(self) -> torch.Tensor:
        """A, (6, 6), acting on (x, x~, y, y~, z, z~)."""
        e, a, at, th, nu = self.eta, self.alpha, self.eta, self.theta, self.nu
        return torch.tensor(
            [
                [-e, e, 0, 0, 0, 0],
                [e, -e, 0, 0, 0, 0],
                [0, 0, -a, a, 0, 0],
                [0, -th * nu, -th, 0, -th, 0],
                [0, 0, 0, 0, -a, a],
                [0, 0, 0, 0, at, -at],
            ],
            dtype=torch.float64,
        )

    def signature(self) -> str:
        return (
            f"mu={self.mu:.9g} L={self.L:.9g} chi1={self.chi1:.9g} chi2={self.chi2:.9g} "
            f"alpha={self.alpha_variant}"
        )


@dataclass
class Dadao:
    """DADAO as an ``Algorithm``. State: "s" (6, d) at time "t"; per neighbour, "e/<peer>"
    (2, d), what the edge put into (z, z~), at time "et/<peer>"."""

    name: ClassVar[str] = "dadao"
    parameters: Parameters
    time_unit: float = 1.0  # seconds per DADAO time unit (the mean gradient interval)
    _a: torch.Tensor = field(init=False, repr=False)
    _grad_jump: torch.Tensor = field(init=False, repr=False)  # what a residual moves, (6,)
    _edge_jump: torch.Tensor = field(init=False, repr=False)  # what an m moves, (6,)

    def __post_init__(self) -> None:
        p = self.parameters
        self._a = p.matrix()
        grad_jump = [-p.gamma, -p.gamma_tilde, 0.0, p.delta + p.delta_tilde, 0.0, 0.0]
        self._grad_jump = torch.tensor(grad_jump, dtype=torch.float64)
        self._edge_jump = torch.tensor(
            [0.0, 0.0, 0.0, 0.0, -p.beta, -p.beta_tilde], dtype=torch.float64
        )

    @property
    def signature(self) -> str:
        return f"{self.parameters.signature()} unit={self.time_unit:.9g}"

    def flow(self, duration: float) -> torch.Tensor:
        """expm(duration A), (6, 6): the flow over ``duration`` time units."""
        flow: torch.Tensor = torch.linalg.matrix_exp(self._a * duration)
        return flow

    # ------------------------------------------------------------------ Algorithm

    def init(self, params: torch.Tensor) -> State:
        s = torch.zeros(6, params.numel(), dtype=torch.float64)
        s[X] = s[XT] = params.reshape(-1).to(torch.float64)
        return {"s": s, "t": torch.tensor(0.0, dtype=torch.float64)}

    def advance(self, state: State, now: float) -> torch.Tensor:
        """S at ``now`` (seconds), (6, d)."""
        return self.flow(now / self.time_unit - float(state["t"])) @ state["s"]

    def params(self, state: State, now: float) -> torch.Tensor:
        x: torch.Tensor = self.flow(now / self.time_unit - float(state["t"]))[X] @ state["s"]
        return x

    def apply_gradient(self, state: State, grad: torch.Tensor, now: float) -> State:
        s = self.advance(state, now)
        residual = grad.to(torch.float64) - self.parameters.nu * s[X] - s[YT]  # (d,)
        return self._moved(state, s + torch.outer(self._grad_jump, residual), now)

    def payload(self, state: State, now: float) -> Payload:
        s = self.advance(state, now)
        return (s[Y] + s[Z],)

    def mix(self, state: State, sent: Payload, received: Payload, now: float, peer: int) -> State:
        m = sent[0] - received[0].to(torch.float64)  # w_self - w_other, (d,)
        jump = torch.outer(self._edge_jump, m)  # (6, d), non-zero in the z, z~ rows only
        moved = self._moved(state, self.advance(state, now) + jump, now)
        moved[f"e/{peer}"] = self._edge_share(state, peer, now) + jump[Z:]
        moved[f"et/{peer}"] = moved["t"]
        return moved

    def reset_edge(self, state: State, peer: int, now: float) -> State:
        if f"e/{peer}" not in state:
            return state
        s = self.advance(state, now)
        s[Z:] -= self._edge_share(state, peer, now)
        moved = self._moved(state, s, now)
        del moved[f"e/{peer}"], moved[f"et/{peer}"]
        return moved

    def _edge_share(self, state: State, peer: int, now: float) -> torch.Tensor:
        """What the edge to ``peer`` has put into (z, z~), carried to ``now``, (2, d)."""
        if f"e/{peer}" not in state:
            return torch.zeros(2, state["s"].shape[1], dtype=torch.float64)
        since = now / self.time_unit - float(state[f"et/{peer}"])
        share: torch.Tensor = self.flow(since)[Z:, Z:] @ state[f"e/{peer}"]
        return share

    def invariants(self, state: State, now: float) -> dict[str, torch.Tensor]:
        """Vectors whose sum over all nodes the algorithm keeps at 0.

        z and z~ sum to 0 when the two ends of every exchange apply it at the same instant.
        With latency between them they do not quite, but the difference sits in the part of
        (z, z~) that the flow damps; the other part, (a~ z + a z~) / (a + a~), is conserved by
        the flow itself, so its sum stays exactly 0 whatever the timing: "z_flow"."""
        s = self.advance(state, now)
        a, at = self.parameters.alpha, self.parameters.eta  # alpha, alpha~
        return {"z": s[Z], "z~": s[ZT], "z_flow": (at * s[Z] + a * s[ZT]) / (a + at)}

    def _moved(self, state: State, s: torch.Tensor, now: float) -> State:
        """``state`` with S replaced by ``s`` at time ``now`` (the edge shares kept)."""
        t = torch.tensor(now / self.time_unit, dtype=torch.float64)
        return {**state, "s": s, "t": t}
