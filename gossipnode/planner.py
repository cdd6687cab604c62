"""Optimal per-edge gossip rates: DADAO's SDP (Prop. 7) and a first-order method for big graphs.

The problem (dadao.md section 3): for a graph with edge set E and rates w >= 0 under a linear
budget, minimise sqrt(2 chi_1 chi_2^E) of the rate Laplacian W = sum_e w_e b_e b_e^T, where
chi_1 = 1 / lambda_2(W) and chi_2^E = max_e b_e^T W^+ b_e / 2 (b_e = e_i - e_j). Both scale
as 1/w, so the optimum uses the whole budget and only the shape of w matters.

Budgets (``constraint``):
  global               sum_e w_e <= budget
  per-node             sum_j w_ij <= budget for each node i, w_ij the rate node i initiates on
                       edge ij (directed: an edge's rate is w_ij + w_ji, split freely)
  per-node-bandwidth   sum over the edges at i of w_e <= budget

The SDP is Prop. 7's with its blocks reshaped: ground node 0, so the reduced Laplacian W_r is
invertible and an edge's resistance is b_e^T W_r^-1 b_e (b_e without row 0). One LMI
[[W_r, u I], [u I, Y]] >= 0 makes Y >= u^2 W_r^-1, so the linear b_e^T Y b_e <= t1 bounds u^2
times every edge's resistance; W + s (11^T/n - I) >= 0 makes s <= lambda_2(W). Minimising
t1 + 1/s with w in u times the budget set, u >= 1, gives 2 sqrt(2 chi_1 chi_2^E) at w / u.
That is one block of size 2(n-1) and one of size n, where the paper has one (n+1)-block per
edge and a 2n-block: K20-K20 (381 edges) solves in seconds instead of minutes.

The first-order method minimises the same objective, scale-free, in the log domain:
log chi_1 + log chi_2^E + 2 log(max load / budget), over log-rates with L-BFGS, the three
maxima smoothed (log-sum-exp at a temperature lowered stage by stage). Each step costs an
eigendecomposition of W, so it reaches graphs the SDP cannot.

This module is offline planning: the daemon never imports it (and so never loads cvxpy).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from gossipnode.topology import Topology, chis, edge_forms, ends, laplacian

CONSTRAINTS = ("global", "per-node", "per-node-bandwidth")
SDP_MAX_NODES = 64  # above this, "auto" uses the first-order method (see BENCHMARKS.md)


class PlanError(Exception):
    """The plan cannot be made; the message says why and what to change."""


@dataclass(frozen=True)
class Figures:
    """What a set of rates achieves."""

    chi1: float
    chi2: float
    communications: float  # exchanges per time unit: the sum of the edge rates

    @property
    def objective(self) -> float:
        """sqrt(2 chi_1 chi_2): the communication cost factor DADAO's rate depends on."""
        return math.sqrt(2 * self.chi1 * self.chi2)


@dataclass(frozen=True)
class Plan:
    topology: Topology
    constraint: str
    budget: float
    weights: np.ndarray  # (m,) edge rates within the budget
    directed: np.ndarray | None  # (m, 2) per-node: the rate each end initiates (i, j)
    figures: Figures
    uniform: Figures  # uniform rates at the same budget
    method: str
    solver: str | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- spectra


def incidence(topology: Topology) -> np.ndarray:
    """B, (n, m): column e is e_i - e_j for edge e = (i, j)."""
    b = np.zeros((topology.n, len(topology.edges)))
    for e, (i, j) in enumerate(topology.edges):
        b[i, e], b[j, e] = 1.0, -1.0
    return b


def figures(topology: Topology, weights: np.ndarray) -> Figures:
    """chi_1, chi_2 (over the edges) and communications of edge rates ``weights``."""
    try:
        chi1, chi2 = chis(topology.n, ends(topology), weights)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return Figures(chi1, chi2, float(weights.sum()))


def uniform_weights(topology: Topology, constraint: str, budget: float) -> np.ndarray:
    """The same rate on every edge, as much as the budget allows."""
    m = len(topology.edges)
    degree = np.bincount(np.array(topology.edges).ravel(), minlength=topology.n)
    if constraint == "global":
        return np.full(m, budget / m)
    if constraint == "per-node":  # each end initiates half an edge's rate
        return np.full(m, 2 * budget / degree.max())
    return np.full(m, budget / degree.max())


# ---------------------------------------------------------------------------- planning


def plan(
    topology: Topology,
    budget: float,
    constraint: str = "global",
    *,
    method: str = "auto",
    solver: str | None = None,
) -> Plan:
    """Optimal edge rates for ``topology`` under ``budget``. Raises PlanError."""
    if constraint not in CONSTRAINTS:
        raise PlanError(f"unknown constraint {constraint!r}; use {', '.join(CONSTRAINTS)}")
    if not (math.isfinite(budget) and budget > 0):
        raise PlanError(f"the budget must be a positive number, got {budget!r}")
    if method not in ("auto", "sdp", "first-order"):
        raise PlanError(f"unknown method {method!r}; use auto, sdp or first-order")
    if not topology.edges:
        raise PlanError("a graph without edges has nothing to plan")
    if method == "auto":
        method = "sdp" if topology.n <= SDP_MAX_NODES else "first-order"
    started = time.perf_counter()
    if method == "sdp":
        weights, directed, used, details = _solve_sdp(topology, budget, constraint, solver)
    else:
        weights, directed, details = _first_order(topology, budget, constraint)
        used = None
    planned = figures(topology, weights)
    uniform = uniform_weights(topology, constraint, budget)
    baseline = figures(topology, uniform)
    if baseline.objective < planned.objective:
        # Only a solver's inaccuracy can land above the uniform point, which is feasible.
        details["worse_than_uniform"] = planned.objective
        weights, planned = uniform, baseline
        directed = np.column_stack([uniform, uniform]) / 2 if directed is not None else None
    return Plan(
        topology=topology,
        constraint=constraint,
        budget=budget,
        weights=weights,
        directed=directed,
        figures=planned,
        uniform=baseline,
        method=method,
        solver=used,
        seconds=time.perf_counter() - started,
        details=details,
    )


def _budget_rows(topology: Topology, constraint: str) -> tuple[sparse.csr_array, sparse.csr_array]:
    """(M, A): edge rates are M @ x and the loads A @ x must stay within the budget.

    x is one rate per edge, or for per-node two per edge (what each end initiates)."""
    n, m = topology.n, len(topology.edges)
    ends = np.array(topology.edges, dtype=np.int64).reshape(m, 2)
    edge_ids = np.arange(m)
    if constraint == "per-node":
        to_edges = sparse.csr_array(
            (np.ones(2 * m), (np.repeat(edge_ids, 2), np.arange(2 * m))), shape=(m, 2 * m)
        )
        loads = sparse.csr_array(
            (np.ones(2 * m), (ends.ravel(), np.arange(2 * m))), shape=(n, 2 * m)
        )
        return to_edges, loads
    identity = sparse.csr_array(sparse.identity(m))
    if constraint == "per-node-bandwidth":
        loads = sparse.csr_array(
            (np.ones(2 * m), (ends.ravel(), np.repeat(edge_ids, 2))), shape=(n, m)
        )
        return identity, loads
    return identity, sparse.csr_array(np.ones((1, m)))


def _solve_sdp(
    topology: Topology, budget: float, constraint: str, solver: str | None
) -> tuple[np.ndarray, np.ndarray | None, str, dict[str, Any]]:
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - a dependency
        raise PlanError(f"the SDP needs cvxpy, which cannot be imported: {exc}") from exc
    n, m = topology.n, len(topology.edges)
    solver = solver or "CLARABEL"  # interior point: accurate; SCS was slower and off by % here
    if solver not in cp.installed_solvers():
        raise PlanError(
            f"solver {solver} is not installed; installed: {', '.join(cp.installed_solvers())}"
        )
    to_edges, loads = (a.toarray() for a in _budget_rows(topology, constraint))
    b = incidence(topology)
    grounded = b[1:]  # node 0 grounded: the reduced Laplacian is invertible
    x = cp.Variable(to_edges.shape[1], nonneg=True)
    u, t1, s = cp.Variable(), cp.Variable(), cp.Variable()
    y = cp.Variable((n - 1, n - 1), symmetric=True)
    w = to_edges @ x
    eye = np.eye(n - 1)
    resistances = cp.bmat([[grounded @ cp.diag(w) @ grounded.T, u * eye], [u * eye, y]])
    spectrum = b @ cp.diag(w) @ b.T + s * (np.ones((n, n)) / n - np.eye(n))
    constraints = [
        (resistances + resistances.T) / 2 >> 0,  # Y >= u^2 W_r^-1
        (spectrum + spectrum.T) / 2 >> 0,  # lambda_2(W) >= s
        cp.sum(cp.multiply(grounded.T @ y, grounded.T), axis=1) <= t1,  # u^2 r_e <= t1
        loads @ x <= u * budget,
        u >= 1,
    ]
    objective = t1 + cp.inv_pos(s)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    try:
        with warnings.catch_warnings():  # "may be inaccurate": the status says so, reported
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver)
    except cp.error.SolverError as exc:
        raise PlanError(f"solver {solver} failed: {exc}") from None
    if problem.status not in ("optimal", "optimal_inaccurate") or x.value is None:
        raise PlanError(f"solver {solver} found no solution (status {problem.status})")
    rates = np.maximum(np.asarray(x.value) / float(u.value), 0.0)
    # Land exactly on the budget (solvers leave it a hair inside or out).
    rates *= budget / max(float((loads @ rates).max()), 1e-300)
    weights = to_edges @ rates
    directed = rates.reshape(m, 2) if constraint == "per-node" else None
    return weights, directed, solver, {"sdp_value": float(problem.value), "status": problem.status}


def _first_order(
    topology: Topology, budget: float, constraint: str
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """L-BFGS on log-rates, the maxima smoothed at temperatures falling stage by stage."""
    from scipy.optimize import minimize

    problem = _Smoothed(topology, *_budget_rows(topology, constraint))
    z = np.zeros(problem.to_edges.shape[1])
    evaluations = 0
    for tau in (0.05, 0.01, 0.002, 0.0005, 0.0001):
        problem.tau = tau
        result = minimize(problem, z, jac=True, method="L-BFGS-B", options={"maxiter": 100})
        z, evaluations = result.x, evaluations + result.nfev
    x = np.exp(z - z.max())
    rates = x * budget / (problem.loads @ x).max()
    weights = problem.to_edges @ rates
    directed = rates.reshape(-1, 2) if constraint == "per-node" else None
    return weights, directed, {"evaluations": evaluations}


@dataclass
class _Smoothed:
    """log chi_1 + log chi_2^E + 2 log(max load) of x = exp(z), each max a log-sum-exp at
    temperature ``tau``, with its gradient in z. Scale-free, so z needs no constraint."""

    topology: Topology
    to_edges: sparse.csr_array
    loads: sparse.csr_array
    tau: float = 0.05

    def __post_init__(self) -> None:
        self.n, self.edges = self.topology.n, ends(self.topology)

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        x = np.exp(z - z.max())  # the scale is free: keep the numbers near 1
        w = self.to_edges @ x
        eig, vec = np.linalg.eigh(laplacian(self.n, self.edges, w))
        if eig[1] <= 1e-12 * eig[-1]:
            return 1e10, np.zeros_like(z)  # disconnected: no finite objective here
        lam, v = eig[1:], vec[:, 1:]  # the non-zero part of the spectrum
        pinv = (v / lam) @ v.T
        resistance = edge_forms(self.edges, pinv)
        load = self.loads @ x
        log_chi1, q = _smax(-np.log(lam), self.tau)
        log_chi2, p = _smax(np.log(resistance), self.tau)
        log_load, s = _smax(np.log(load), self.tau)
        # d log(1/lam_k)/dw_e = -(b_e.v_k)^2/lam_k; d log r_f/dw_e = -(b_f^T W^+ b_e)^2/r_f
        k = (v * (q / lam)) @ v.T + pinv @ laplacian(self.n, self.edges, p / resistance) @ pinv
        d_x = self.to_edges.T @ -edge_forms(self.edges, k) + 2 * (self.loads.T @ (s / load))
        return log_chi1 + log_chi2 + 2 * log_load, d_x * x


def _smax(logs: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
    """tau log sum exp(logs / tau) and its gradient (softmax weights)."""
    top = logs.max()
    weights = np.exp((logs - top) / tau)
    total = weights.sum()
    return float(top + tau * math.log(total)), weights / total


def rates_json(p: Plan, scale: str) -> dict[str, Any]:
    """The rates file: the edges, their rates (and, per-node, what each end initiates)."""
    factor = 1.0 if scale == "budget" else math.sqrt(2 * p.figures.chi1 * p.figures.chi2)
    data: dict[str, Any] = {
        "edges": [list(e) for e in p.topology.edges],
        "rates": [float(r) for r in p.weights * factor],
    }
    if p.directed is not None:
        data["directed"] = [[float(a), float(c)] for a, c in p.directed * factor]
    data["plan"] = {
        "constraint": p.constraint,
        "budget": p.budget,
        "scale": scale,
        "method": p.method,
        "solver": p.solver,
        "objective": p.figures.objective,
        "chi1": p.figures.chi1 / factor,
        "chi2": p.figures.chi2 / factor,
        "uniform_objective": p.uniform.objective,
    }
    return data


# ---------------------------------------------------------------------------- reporting


def report_lines(p: Plan) -> list[str]:
    how = f"{p.method}" + (f" with {p.solver}" if p.solver else "")
    if p.details.get("status") == "optimal_inaccurate":
        how += ", which reports the optimum as inaccurate"
    if "worse_than_uniform" in p.details:
        how += "; its answer was no better than uniform rates, which are kept"
    planned = p.figures.objective * p.figures.communications
    uniform = p.uniform.objective * p.uniform.communications
    return [
        f"planned rates ({how}, {p.seconds:.2f} s), constraint {p.constraint}, "
        f"budget {p.budget:g}:",
        "  " + _figures_line(p.figures),
        "uniform rates at the same budget:",
        "  " + _figures_line(p.uniform),
        f"at DADAO's normalisation (chi_1 chi_2 = 1/2): {planned:.4g} exchanges per time unit "
        f"planned, {uniform:.4g} uniform ({uniform / planned:.3g}x)",
    ]


def _figures_line(f: Figures) -> str:
    return (
        f"sqrt(2 chi_1 chi_2) = {f.objective:.6g}   chi_1 = {f.chi1:.6g}   chi_2 = {f.chi2:.6g}"
        f"   exchanges per time unit = {f.communications:.6g}"
    )


def describe(topology: Topology) -> list[str]:
    """Size, degrees, diameter and spectral constants of a topology (with its rates, or 1 per
    edge where it has none)."""
    import networkx as nx

    g: nx.Graph[int] = nx.Graph()
    g.add_nodes_from(range(topology.n))
    g.add_edges_from(topology.edges)
    degrees = [d for _, d in g.degree()]
    weights = np.array([topology.rate(i, j, 1.0) for i, j in topology.edges])
    lines = [
        f"{topology.n} nodes, {len(topology.edges)} edges, connected, "
        f"{len(topology.addresses)} with an address",
        f"degree: min {min(degrees)}, mean {sum(degrees) / len(degrees):.3g}, "
        f"max {max(degrees)};  diameter {nx.diameter(g) if topology.n > 1 else 0}",
    ]
    if not topology.edges:
        return lines
    if topology.rates:
        lines.append(
            f"edge rates: from {weights.min():.4g} to {weights.max():.4g}, "
            f"total {weights.sum():.4g} per second"
        )
    else:
        lines.append("edge rates: none in the file; the figures below are for 1 per edge")
    f = figures(topology, weights)
    lines.append(f"lambda_2 = {1 / f.chi1:.6g}   " + _figures_line(f))
    return lines


def draw(topology: Topology, path: Path) -> None:
    """A PNG of the graph; edge widths follow the rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g: nx.Graph[int] = nx.Graph()
    g.add_nodes_from(range(topology.n))
    g.add_edges_from(topology.edges)
    rates = np.array([topology.rate(i, j, 1.0) for i, j in topology.edges])
    widths = 0.5 + 3.5 * rates / rates.max() if len(rates) else []
    fig, ax = plt.subplots(figsize=(6, 6))
    pos = nx.spring_layout(g, seed=0)
    nx.draw_networkx(
        g, pos, ax=ax, width=list(widths), node_size=120, font_size=7, with_labels=topology.n <= 64
    )
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
