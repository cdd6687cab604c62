"""Built-in tasks: determinism, data splits, and logreg's exact optimum and constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import vector_to_parameters

from gossipnode.learner import Learner, flatten
from gossipnode.tasks import Digits, LogReg, TaskError, dirichlet_split, load_task


def test_logreg_optimum_is_stationary_and_constants_bound_the_hessian() -> None:
    task = LogReg(seed=3, num_nodes=5)
    w = task.optimum.clone().requires_grad_(True)
    model = task.make_model(0)
    vector_to_parameters(w.detach(), model.parameters())
    grads = []
    for node in range(5):
        learner = Learner(task, node, model_seed=0, batch_seed=0, batch_size=0)
        grads.append(learner.gradient(task.optimum)[0])
    assert torch.stack(grads).mean(0).norm() < 1e-10
    # mu <= eigenvalues of each local Hessian <= L
    for node in range(5):
        shard = task.shard(node)
        p = torch.sigmoid(shard.x @ task.optimum)
        hess = (shard.x.T * (p * (1 - p))) @ shard.x / len(shard) + task.reg * torch.eye(11)
        eig = torch.linalg.eigvalsh(hess.double())
        assert eig[0] >= task.mu - 1e-12
        assert eig[-1] <= task.L + 1e-12
    assert task.evaluate(model)["suboptimality"] == pytest.approx(0.0, abs=1e-14)


def test_logreg_suboptimality_is_positive_away_from_the_optimum() -> None:
    task = LogReg(seed=3, num_nodes=2)
    metrics = task.evaluate(task.make_model(1))
    assert metrics["suboptimality"] > 1e-3
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_tasks_are_deterministic_in_the_seed() -> None:
    a, b = Digits(seed=5, num_nodes=4), Digits(seed=5, num_nodes=4)
    assert torch.equal(a.shard(2).x, b.shard(2).x)
    assert torch.equal(flatten(a.make_model(1)), flatten(b.make_model(1)))
    assert not torch.equal(flatten(a.make_model(1)), flatten(a.make_model(2)))
    c = Digits(seed=6, num_nodes=4)
    assert not torch.equal(a.shard(2).y, c.shard(2).y)


@pytest.mark.parametrize(
    ("model", "shapes"),
    [
        ("mlp", [(32, 64), (32,), (10, 32), (10,)]),
        ("deep", [(32, 64), (32,)] + [(32, 32), (32,)] * 4 + [(10, 32), (10,)]),
        (
            "cnn",
            [(16, 1, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (10, 512), (10,)],
        ),
    ],
)
def test_digits_models_have_the_expected_shapes(model: str, shapes: list[tuple[int, ...]]) -> None:
    task = Digits(seed=0, num_nodes=2, hidden=32, model=model)
    net = task.make_model(3)
    assert [tuple(p.shape) for p in net.parameters()] == shapes
    assert net(task.shard(0).x[:5]).shape == (5, task.classes)
    assert torch.equal(flatten(net), flatten(task.make_model(3)))
    assert not torch.equal(flatten(net), flatten(task.make_model(4)))


def test_digits_default_model_is_the_64_hidden_mlp() -> None:
    task = Digits(seed=0, num_nodes=2)
    assert task.classes == 10
    assert flatten(task.make_model(0)).numel() == 64 * 64 + 64 + 64 * 10 + 10


def test_digits_deep_model_has_he_init_and_zero_biases() -> None:
    net = Digits(seed=0, num_nodes=1, hidden=256, model="deep").make_model(0)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6
    for layer in linears:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        expected = (2 / layer.in_features) ** 0.5
        assert float(layer.weight.detach().std()) == pytest.approx(expected, rel=0.1)


def test_digits_options_come_from_the_spec() -> None:
    task = load_task("digits(model=cnn,alpha=0.1)", seed=0, num_nodes=2)
    assert isinstance(task, Digits)
    assert task.model == "cnn"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in task.make_model(0).modules())


def test_digits_unknown_model_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown digits model 'resnet': use one of mlp, deep, cnn$"
    ):
        Digits(seed=0, num_nodes=2, model="resnet")
    with pytest.raises(TaskError, match="use one of mlp, deep, cnn"):
        load_task("digits(model=resnet)", seed=0, num_nodes=2)


def test_digits_split_is_a_non_iid_partition() -> None:
    task = Digits(seed=0, num_nodes=8)
    sizes = [len(task.shard(i)) for i in range(8)]
    assert sum(sizes) == 1797 - 1797 // 5
    assert min(sizes) > 0
    dominant = [
        torch.bincount(task.shard(i).y, minlength=10).max() / len(task.shard(i)) for i in range(8)
    ]
    assert max(dominant) > 0.25  # IID would give about 0.1 everywhere


def test_dirichlet_split_leaves_no_part_empty() -> None:
    labels = np.repeat(np.arange(3), 4)
    parts = dirichlet_split(labels, 10, 0.1, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(12))
    assert all(len(p) > 0 for p in parts)


def test_learner_takes_sgd_steps_that_reduce_the_loss() -> None:
    task = Digits(seed=0, num_nodes=1)
    learner = Learner(task, 0, model_seed=0, batch_seed=0, batch_size=64)
    x = learner.initial_params()
    before = learner.evaluate(x)["loss"]
    for _ in range(200):
        grad, _ = learner.gradient(x)
        x = x - 0.1 * grad
    assert learner.evaluate(x)["loss"] < 0.5 * before


def test_user_task_by_module_and_factory() -> None:
    task = load_task("gossipnode.tasks:LogReg", seed=0, num_nodes=3)
    assert task.name == "logreg"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "mnist",
            "unknown task 'mnist': use one of logreg, linreg, digits or package.module:factory",
        ),
        ("no_such_module:f", "cannot import no_such_module"),
        ("gossipnode.tasks:Nope", "has no callable 'Nope'"),
        ("gossipnode.tasks:dirichlet_split", "failed to build: TypeError"),
        ("gossipnode.tasks:Dataset", "failed to build"),
    ],
)
def test_bad_task_specs(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(spec, seed=0, num_nodes=2)
