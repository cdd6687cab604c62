"""The local learning step: gradients and evaluation of flat parameter vectors. No I/O.

A node's state holds its model as one flat vector (``algorithms``); the learner loads a copy
of it into a torch module to compute a minibatch gradient or to evaluate. Gradients and
evaluations use separate modules, so each may run in its own worker thread.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from gossipnode.tasks import Task


def flatten(model: nn.Module) -> torch.Tensor:
    """The trainable parameters of ``model`` as one new flat vector."""
    return parameters_to_vector(model.parameters()).detach().clone()


def consensus_distance(params: Sequence[torch.Tensor]) -> float:
    """Mean squared distance of the models to their average: (1/n) sum_i |x_i - mean x|^2."""
    x = torch.stack([p.double() for p in params])  # (n, d)
    return float((x - x.mean(0)).pow(2).sum(1).mean())


class Learner:
    """One node's model, data, loss and evaluation."""

    def __init__(
        self, task: Task, node: int, *, model_seed: int, batch_seed: int, batch_size: int
    ) -> None:
        self.task = task
        self.data = task.shard(node)
        if len(self.data) == 0:
            raise ValueError(f"task {task.name!r} gave node {node} no training data")
        self._train_model = task.make_model(model_seed)
        self._eval_model = copy.deepcopy(self._train_model)
        self._params = [p for p in self._train_model.parameters() if p.requires_grad]
        self._batch = batch_size if 0 < batch_size < len(self.data) else len(self.data)
        self._gen = torch.Generator().manual_seed(batch_seed)

    def initial_params(self) -> torch.Tensor:
        return flatten(self._train_model)

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The minibatch gradient of the loss at ``params`` (flat), and the loss."""
        model = self._train_model
        vector_to_parameters(params, model.parameters())
        model.train()
        if self._batch == len(self.data):
            x, y = self.data.x, self.data.y
        else:
            idx = torch.randint(len(self.data), (self._batch,), generator=self._gen)
            x, y = self.data.x[idx], self.data.y[idx]
        loss = self.task.loss(model, x, y)
        grads = torch.autograd.grad(loss, self._params)
        return torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        """The task's held-out metrics for the model ``params``."""
        model = self._eval_model
        vector_to_parameters(params, model.parameters())
        model.eval()
        with torch.no_grad():
            return self.task.evaluate(model)
