"""The learner: SAM gradients, label flipping, BatchNorm statistics and model export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gossipnode.learner import Learner, flat_buffers, flatten
from gossipnode.tasks import Dataset, Digits

torch.set_num_threads(1)


class LeastSquares:
    """f(w) = mean_k (a_k.w - c_k)^2 on 20 fixed points: its gradient is known in closed form."""

    name = "least-squares"

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(20, 3, generator=gen, dtype=torch.float64)
        self.c = torch.randn(20, generator=gen, dtype=torch.float64)

    def make_model(self, seed: int) -> nn.Module:
        model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(torch.full((1, 3), float(seed)))
        return model

    def shard(self, node: int) -> Dataset:
        return Dataset(self.a, self.c)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = model(x).squeeze(-1) - y
        return residual.pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def grad(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a, c = self.a[idx], self.c[idx]
        return 2 * a.T @ (a @ w - c) / len(idx)


@pytest.fixture(scope="module")
def mlp() -> Digits:
    return Digits(seed=0, num_nodes=4)


@pytest.fixture(scope="module")
def cnn() -> Digits:
    return Digits(seed=0, num_nodes=4, model="cnn")


def _learner(
    task: Digits | LeastSquares, *, sam_rho: float = 0.0, flip_labels: bool = False
) -> Learner:
    return Learner(
        task,
        0,
        model_seed=1,
        batch_seed=2,
        batch_size=32,
        sam_rho=sam_rho,
        flip_labels=flip_labels,
    )


def _train(learner: Learner, steps: int) -> torch.Tensor:
    x = learner.initial_params()
    for _ in range(steps):
        x = x - 0.1 * learner.gradient(x)[0]
    return x


# ---------------------------------------------------------------------------- SAM


def test_sam_with_rho_zero_is_the_plain_gradient(mlp: Digits) -> None:
    plain, sam = _learner(mlp), _learner(mlp, sam_rho=0.0)
    x = plain.initial_params()
    for _ in range(3):
        (g1, l1), (g2, l2) = plain.gradient(x), sam.gradient(x)
        assert torch.equal(g1, g2)
        assert l1 == l2


def test_sam_gradient_differs_but_reports_the_loss_at_params(mlp: Digits) -> None:
    plain, sam = _learner(mlp), _learner(mlp, sam_rho=0.05)
    x = plain.initial_params()
    (g1, l1), (g2, l2) = plain.gradient(x), sam.gradient(x)
    assert l1 == l2  # same minibatch, loss at the unperturbed point
    assert g2.shape == g1.shape
    assert not torch.allclose(g1, g2)


def test_sam_matches_the_hand_formula_on_least_squares() -> None:
    task, rho = LeastSquares(), 0.3
    learner = Learner(task, 0, model_seed=1, batch_seed=7, batch_size=5, sam_rho=rho)
    gen = torch.Generator().manual_seed(7)  # replays the learner's minibatch draws
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for _ in range(3):
        idx = torch.randint(20, (5,), generator=gen)
        g = task.grad(w, idx)
        expected = task.grad(w + rho * g / g.norm(), idx)
        grad, loss = learner.gradient(w)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
        assert loss == pytest.approx(float((task.a[idx] @ w - task.c[idx]).pow(2).mean()))


def test_sam_updates_batchnorm_statistics_once_per_step(cnn: Digits) -> None:
    plain, sam = _learner(cnn), _learner(cnn, sam_rho=0.05)
    x = plain.initial_params()
    for _ in range(3):
        plain.gradient(x)
        sam.gradient(x)
    assert torch.equal(plain.buffers(), sam.buffers())
    counts = [b for name, b in sam._train_model.named_buffers() if "num_batches" in name]
    assert [int(c) for c in counts] == [3, 3]


def test_negative_rho_is_refused(mlp: Digits) -> None:
    with pytest.raises(ValueError, match="sam_rho"):
        _learner(mlp, sam_rho=-0.1)


# ---------------------------------------------------------------------------- label flipping


def test_flip_labels_trains_on_reversed_labels(mlp: Digits) -> None:
    honest = Learner(mlp, 0, model_seed=1, batch_seed=2, batch_size=0)
    byzantine = Learner(mlp, 0, model_seed=1, batch_seed=2, batch_size=0, flip_labels=True)
    x = honest.initial_params()
    (g1, l1), (g2, l2) = honest.gradient(x), byzantine.gradient(x)
    assert l1 != pytest.approx(l2)
    assert not torch.allclose(g1, g2)
    shard = mlp.shard(0)
    with torch.no_grad():
        flipped = F.cross_entropy(mlp.make_model(1)(shard.x), 9 - shard.y)
    assert l2 == pytest.approx(float(flipped))


def test_flip_labels_needs_classes() -> None:
    with pytest.raises(ValueError, match="label flipping needs a classification task"):
        _learner(LeastSquares(), flip_labels=True)


# ---------------------------------------------------------------------------- BatchNorm


def test_models_without_batchnorm_have_no_buffers(mlp: Digits) -> None:
    learner = _learner(mlp)
    x = _train(learner, 2)
    assert learner.buffers().numel() == 0
    assert learner.recalibrate(x).numel() == 0
    assert learner.evaluate(x) == learner.evaluate(x, learner.buffers())


def test_training_updates_the_buffers_evaluation_uses(cnn: Digits) -> None:
    learner = _learner(cnn)
    initial = learner.buffers()
    assert initial.numel() == 2 * (16 + 32)
    x = _train(learner, 30)
    trained = learner.buffers()
    assert not torch.equal(trained, initial)
    assert learner.evaluate(x) == learner.evaluate(x, trained)
    assert learner.evaluate(x)["accuracy"] != learner.evaluate(x, initial)["accuracy"]


def test_buffers_are_a_snapshot(cnn: Digits) -> None:
    learner = _learner(cnn)
    x = learner.initial_params()
    learner.gradient(x)
    snapshot = learner.buffers()
    snapshot.zero_()
    assert not torch.equal(learner.buffers(), snapshot)
    before = learner.buffers()
    learner.gradient(x)
    assert not torch.equal(learner.buffers(), before)


def test_evaluate_refuses_buffers_of_the_wrong_size(cnn: Digits) -> None:
    learner = _learner(cnn)
    with pytest.raises(ValueError, match="3 buffer values for a model with 96"):
        learner.evaluate(learner.initial_params(), torch.zeros(3))


@pytest.mark.parametrize("batch_size", [50, 256])  # short last batch, and one batch
def test_recalibrate_gives_the_data_statistics(cnn: Digits, batch_size: int) -> None:
    learner = _learner(cnn)
    x = _train(learner, 5)
    buffers = learner.recalibrate(x, batch_size=batch_size)
    model = cnn.make_model(0)
    assert isinstance(model, nn.Sequential)
    torch.nn.utils.vector_to_parameters(x, model.parameters())
    with torch.no_grad():
        conv = model[1](model[0](learner.data.x))  # (N, 16, 8, 8), before the first BN
    mean = conv.mean((0, 2, 3))
    torch.testing.assert_close(buffers[:16], mean, rtol=0, atol=1e-5)
    if batch_size >= len(learner.data):
        torch.testing.assert_close(
            buffers[16:32], conv.transpose(0, 1).reshape(16, -1).var(1), rtol=1e-4, atol=1e-5
        )
    assert torch.equal(buffers, learner.recalibrate(x, batch_size=batch_size))
    assert torch.equal(buffers, _learner(cnn).recalibrate(x, batch_size=batch_size))


def test_recalibrate_on_some_batches_leaves_the_training_statistics(cnn: Digits) -> None:
    learner = _learner(cnn)
    x = _train(learner, 5)
    trained = learner.buffers()
    first = learner.recalibrate(x, batches=1, batch_size=16)
    assert not torch.equal(first, learner.recalibrate(x))
    assert torch.equal(learner.buffers(), trained)
    norms = [m for m in learner._eval_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.momentum for m in norms] == [0.1, 0.1]  # restored after recalibration


# ---------------------------------------------------------------------------- export


def test_model_state_round_trips(cnn: Digits) -> None:
    learner = _learner(cnn)
    x = _train(learner, 5)
    buffers = learner.recalibrate(x)
    state = learner.model_state(x, buffers)
    model = cnn.make_model(9)
    model.load_state_dict(state)
    assert torch.equal(flatten(model), x)
    assert torch.equal(flat_buffers(model), buffers)
    model.eval()
    assert cnn.evaluate(model) == learner.evaluate(x, buffers)
    state["1.weight"].zero_()  # the state's tensors are copies
    assert not torch.equal(learner.model_state(x, buffers)["1.weight"], state["1.weight"])


def test_model_state_defaults_to_the_training_statistics(cnn: Digits) -> None:
    learner = _learner(cnn)
    x = _train(learner, 3)
    model = cnn.make_model(0)
    model.load_state_dict(learner.model_state(x))
    assert torch.equal(flat_buffers(model), learner.buffers())
