"""Learning tasks: a model, each node's data, a loss and an evaluation. No I/O, no clocks.

A task is built once per process by a factory called as ``factory(seed=..., num_nodes=...)``;
every node of a cluster builds the same task from the same seed, so the data split (and, for
``logreg``, the exact optimum) agrees everywhere without any coordination.

Built in: ``logreg`` (synthetic L2-regularised logistic regression, strongly convex, with mu,
L and the optimum known) and ``digits`` (scikit-learn's bundled 8x8 digits, an MLP, a deep
MLP or a small CNN, non-IID Dirichlet split). A user task is given as ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class Dataset:
    x: torch.Tensor  # (m, ...) inputs
    y: torch.Tensor  # (m, ...) targets

    def __len__(self) -> int:
        return len(self.x)


class Task(Protocol):
    """What gossipnode needs to train a model on a node. See README, "Writing a task"."""

    name: str

    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same seed must give the same weights."""
        ...

    def shard(self, node: int) -> Dataset:
        """Node ``node``'s training data (0 <= node < num_nodes)."""
        ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of ``model`` on a batch."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics of ``model``, e.g. accuracy; the same data on every node."""
        ...


TaskFactory = Callable[..., Task]


class TaskError(Exception):
    """The task could not be found or built; the message says why."""


# ---------------------------------------------------------------------------- logreg


class LogReg:
    """L2-regularised logistic regression on synthetic, node-heterogeneous data.

    f_i(w) = mean_k log(1 + exp(-s_k a_k.w)) + reg/2 |w|^2 over node i's points (a_k with a
    constant 1 for the bias, s_k = +-1), and f = mean_i f_i. It is ``mu``-strongly convex and
    ``L``-smooth with the constants below; ``optimum`` minimises f to machine precision.
    """

    name = "logreg"

    def __init__(
        self,
        *,
        seed: int,
        num_nodes: int,
        dim: int = 10,
        samples: int = 100,
        reg: float = 0.01,
        spread: float = 1.0,
    ) -> None:
        gen = torch.Generator().manual_seed(_seed("logreg-data", seed))
        w_true = torch.randn(dim + 1, generator=gen, dtype=torch.float64)
        self.reg = reg
        self._shards = [self._draw(w_true, samples, dim, spread, gen) for _ in range(num_nodes)]
        self._test = self._draw(w_true, 1000, dim, spread, gen)
        # Every shard has the same size, so f = mean_i f_i is the mean over all points.
        self._all = Dataset(
            torch.cat([s.x for s in self._shards]),  # (n*m, d+1)
            torch.cat([s.y for s in self._shards]),
        )
        self.mu = reg
        self.L = max(_lambda_max(s.x) / (4 * len(s)) for s in self._shards) + reg
        self.optimum = self._newton(self._all.x, self._all.y)
        self.optimal_value = self.objective(self.optimum)

    @staticmethod
    def _draw(w: torch.Tensor, m: int, dim: int, spread: float, gen: torch.Generator) -> Dataset:
        centre = spread * torch.randn(dim, generator=gen, dtype=torch.float64)
        feats = centre + torch.randn(m, dim, generator=gen, dtype=torch.float64)
        a = torch.cat([feats, torch.ones(m, 1, dtype=torch.float64)], dim=1)  # (m, d+1)
        p = torch.sigmoid(a @ w)
        s = torch.where(torch.rand(m, generator=gen, dtype=torch.float64) < p, 1.0, -1.0)
        return Dataset(a, s.to(torch.float64))

    def make_model(self, seed: int) -> nn.Module:
        model = nn.Linear(self._shards[0].x.shape[1], 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(
                torch.randn(
                    model.weight.shape,
                    generator=torch.Generator().manual_seed(_seed("logreg-init", seed)),
                    dtype=torch.float64,
                )
            )
        return model

    def shard(self, node: int) -> Dataset:
        return self._shards[node]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        margins = y * model(x).squeeze(-1)
        weight = next(model.parameters())
        return F.softplus(-margins).mean() + 0.5 * self.reg * weight.pow(2).sum()

    def objective(self, w: torch.Tensor) -> float:
        """f(w) = mean_i f_i(w), for a flat parameter vector w."""
        return float(self._objectives(w.reshape(1, -1))[0])

    def _objectives(self, w: torch.Tensor) -> torch.Tensor:
        """f of each row of w, (k, d+1) -> (k,)."""
        w = w.to(torch.float64)
        margins = self._all.y[:, None] * (self._all.x @ w.T)  # (N, k)
        return F.softplus(-margins).mean(0) + 0.5 * self.reg * w.pow(2).sum(1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_batch(next(model.parameters()).detach().reshape(1, -1))[0]

    def evaluate_batch(self, w: torch.Tensor) -> list[dict[str, float]]:
        """``evaluate`` for many flat parameter vectors at once, the rows of w (k, d+1)."""
        values = self._objectives(w)
        accuracy = (self._test.x @ w.to(torch.float64).T).sign() == self._test.y[:, None]
        return [
            {"loss": float(v), "accuracy": float(a), "suboptimality": float(v) - self.optimal_value}
            for v, a in zip(values, accuracy.double().mean(0), strict=True)
        ]

    def _newton(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(a.shape[1], dtype=torch.float64)
        eye = torch.eye(a.shape[1], dtype=torch.float64)
        for _ in range(100):
            p = torch.sigmoid(-s * (a @ w))  # (N,)
            grad = -(a * (s * p)[:, None]).mean(0) + self.reg * w
            hess = (a.T * (p * (1 - p))) @ a / len(a) + self.reg * eye
            step = torch.linalg.solve(hess, grad)
            w -= step
            if float(step.norm()) < 1e-13 * (1 + float(w.norm())):
                break
        return w


def _seed(purpose: str, seed: int) -> int:
    """Independent generator seeds for independent purposes."""
    return random.Random(f"{purpose}/{seed}").getrandbits(63)


def _lambda_max(a: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(a.T @ a)[-1])


# ---------------------------------------------------------------------------- linreg


class LinReg:
    """Decentralised linear regression as in DADAO's experiments (dadao.md section 4).

    Node i has m points from scikit-learn's make_regression (d features, noise 10), targets
    scaled by a per-node factor drawn from U(0.01, 5); f_i(x) = mean_k (a_k.x - c_k)^2.
    ``kappa`` > 1 squeezes the last feature by 1/sqrt(kappa), so that L/mu is about kappa.
    mu and L are the extreme eigenvalues of the local Hessians (2/m) A_i^T A_i, and x* the
    least-squares solution of the stacked data (every node has m points).
    """

    name = "linreg"

    def __init__(
        self, *, seed: int, num_nodes: int, d: int = 2, m: int = 100, kappa: float = 1.0
    ) -> None:
        from sklearn.datasets import make_regression  # heavy import, only for this task

        rng = np.random.default_rng(_seed("linreg", seed))
        squeeze = np.ones(d)
        squeeze[-1] = 1 / math.sqrt(kappa)
        self._shards = []
        for _ in range(num_nodes):
            a, c = make_regression(
                n_samples=m, n_features=d, noise=10.0, random_state=int(rng.integers(2**31))
            )
            c = c * rng.uniform(0.01, 5)
            self._shards.append(Dataset(torch.tensor(a * squeeze), torch.tensor(c)))
        hessians = [2 * s.x.T @ s.x / m for s in self._shards]
        self.mu = min(float(torch.linalg.eigvalsh(h)[0]) for h in hessians)
        self.L = max(float(torch.linalg.eigvalsh(h)[-1]) for h in hessians)
        a_all = torch.cat([s.x for s in self._shards])
        c_all = torch.cat([s.y for s in self._shards])
        self.optimum = torch.linalg.lstsq(a_all, c_all[:, None]).solution[:, 0]
        self._scale = float(self.optimum.dot(self.optimum))

    def make_model(self, seed: int) -> nn.Module:
        model = nn.Linear(self._shards[0].x.shape[1], 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(_seed("linreg-init", seed))
            model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64))
        return model

    def shard(self, node: int) -> Dataset:
        return self._shards[node]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = model(x).squeeze(-1) - y
        return residual.pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_batch(next(model.parameters()).detach().reshape(1, -1))[0]

    def evaluate_batch(self, w: torch.Tensor) -> list[dict[str, float]]:
        """Relative squared error |x - x*|^2 / |x*|^2 of each row of w, and the mean loss."""
        w = w.to(torch.float64)
        error = (w - self.optimum).pow(2).sum(1) / self._scale  # (k,)
        loss = torch.stack([(s.x @ w.T - s.y[:, None]).pow(2).mean(0) for s in self._shards])
        return [
            {"error": float(e), "loss": float(v)} for e, v in zip(error, loss.mean(0), strict=True)
        ]


# ---------------------------------------------------------------------------- digits


class Digits:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), a small network.

    20% of the images, chosen by the seed, are the common test set. The rest is split across
    nodes non-IID: each class is divided by proportions drawn from Dirichlet(alpha), so a
    small alpha gives each node a few dominant classes. ``model`` picks the network: ``mlp``
    (one hidden layer of ``hidden``), ``deep`` (five hidden layers of ``hidden``, He init) or
    ``cnn`` (two 3x3 convolutions with BatchNorm; ignores ``hidden``).
    """

    name = "digits"
    classes = 10
    MODELS = ("mlp", "deep", "cnn")

    def __init__(
        self,
        *,
        seed: int,
        num_nodes: int,
        alpha: float = 0.5,
        hidden: int = 64,
        model: str = "mlp",
    ) -> None:
        from sklearn.datasets import load_digits  # heavy import, only for this task

        if model not in self.MODELS:
            raise ValueError(f"unknown digits model {model!r}: use one of {', '.join(self.MODELS)}")
        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        n_test = len(y) // 5
        test, train = order[:n_test], order[n_test:]
        self.hidden = hidden
        self.model = model
        self._x = torch.tensor(x / 16.0, dtype=torch.float32)
        self._y = torch.tensor(y, dtype=torch.int64)
        self._test = Dataset(self._x[test], self._y[test])
        self._parts = dirichlet_split(y[train], num_nodes, alpha, rng)
        self._train = train

    def make_model(self, seed: int) -> nn.Module:
        # torch's layers draw their initial weights from the global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.model == "deep":
                return _deep_mlp(64, self.hidden, self.classes, depth=5)
            if self.model == "cnn":
                return _small_cnn(self.classes)
            return nn.Sequential(
                nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.classes)
            )

    def shard(self, node: int) -> Dataset:
        idx = torch.as_tensor(self._train[self._parts[node]])
        return Dataset(self._x[idx], self._y[idx])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(self._test.x)
            return {
                "loss": float(F.cross_entropy(logits, self._test.y)),
                "accuracy": float((logits.argmax(1) == self._test.y).float().mean()),
            }


def _deep_mlp(inputs: int, width: int, outputs: int, *, depth: int) -> nn.Sequential:
    """``depth`` ReLU hidden layers of ``width``; He init keeps activations from shrinking."""
    sizes = [inputs] + [width] * depth
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def _small_cnn(outputs: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU blocks and a 2x2 max-pool for flat 8x8 images."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),  # the data stays (N, 64), like the MLPs'
        # No conv biases: the BatchNorm right after cancels them.
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, outputs),
    )


def dirichlet_split(
    labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices of ``labels`` into ``parts`` non-IID parts, none empty (if possible)."""
    chunks: list[list[int]] = [[] for _ in range(parts)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * parts)) * len(idx)).astype(int)[:-1]
        for part, piece in enumerate(np.split(idx, cuts)):
            chunks[part].extend(piece.tolist())
    # A tiny part can come out empty; give it one example from the largest part.
    for part in range(parts):
        if not chunks[part]:
            donor = max(range(parts), key=lambda p: len(chunks[p]))
            if len(chunks[donor]) > 1:
                chunks[part].append(chunks[donor].pop())
    return [np.array(sorted(c), dtype=np.int64) for c in chunks]


# ---------------------------------------------------------------------------- loading

BUILTIN: dict[str, TaskFactory] = {"logreg": LogReg, "linreg": LinReg, "digits": Digits}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name(key=value, ...)`` -> (name, options); values become int, float or str."""
    name, paren, rest = spec.partition("(")
    if not paren:
        return spec, {}
    if not rest.endswith(")"):
        raise TaskError(f"task {spec!r}: options go in parentheses, e.g. linreg(d=5,kappa=200)")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise TaskError(f"task {spec!r}: {item!r} is not key=value")
        options[key.strip()] = _number(value.strip())
    return name.strip(), options


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def find_factory(spec: str) -> TaskFactory:
    """The factory for a built-in task name or for ``package.module:factory``."""
    spec = parse_spec(spec)[0]
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(
            f"unknown task {spec!r}: use one of {', '.join(BUILTIN)} or package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"task {spec!r}: cannot import {module_name}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"task {spec!r}: {module_name} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def load_task(spec: str, *, seed: int, num_nodes: int) -> Task:
    """Build the task ``spec`` names: ``name``, ``package.module:factory``, either with
    ``(key=value, ...)`` options for the factory."""
    factory = find_factory(spec)
    try:
        task = factory(seed=seed, num_nodes=num_nodes, **parse_spec(spec)[1])
    except Exception as exc:
        raise TaskError(f"task {spec!r} failed to build: {type(exc).__name__}: {exc}") from exc
    for method in ("make_model", "shard", "loss", "evaluate"):
        if not callable(getattr(task, method, None)):
            raise TaskError(f"task {spec!r}: the object built has no {method}() method")
    return task
