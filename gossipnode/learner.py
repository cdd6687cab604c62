"""The local learning step: gradients and evaluation of flat parameter vectors. No I/O.

A node's state holds its model as one flat vector (``algorithms``); the learner loads a copy
of it into a torch module to compute a minibatch gradient or to evaluate. Gradients and
evaluations use separate modules, so each may run in its own worker thread.

The flat vector is the trainable parameters only. Buffers (BatchNorm's running statistics)
are local: the training module accumulates them as it computes gradients, and evaluation
uses a snapshot of them (``buffers``), or statistics re-estimated for the model being
evaluated (``recalibrate``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from gossipnode.tasks import Dataset, Task


def flatten(model: nn.Module) -> torch.Tensor:
    """The trainable parameters of ``model`` as one new flat vector."""
    return parameters_to_vector(model.parameters()).detach().clone()


def consensus_distance(params: Sequence[torch.Tensor]) -> float:
    """Mean squared distance of the models to their average: (1/n) sum_i |x_i - mean x|^2."""
    x = torch.stack([p.double() for p in params])  # (n, d)
    return float((x - x.mean(0)).pow(2).sum(1).mean())


def flat_buffers(model: nn.Module) -> torch.Tensor:
    """The floating-point buffers of ``model`` (running means and variances, not counters)
    as one new flat vector; empty if it has none."""
    pieces = [b.detach().reshape(-1) for b in _float_buffers(model)]
    if not pieces:
        return torch.empty(0, dtype=_dtype(model))
    return torch.cat(pieces).clone()


def load_buffers(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` (from ``flat_buffers``) into the buffers of ``model``; empty is a no-op."""
    if flat.numel() == 0:
        return  # a model without running statistics keeps its own (constant) buffers
    buffers = list(_float_buffers(model))
    if flat.numel() != sum(b.numel() for b in buffers):
        raise ValueError(
            f"{flat.numel()} buffer values for a model with {sum(b.numel() for b in buffers)}"
        )
    start = 0
    with torch.no_grad():
        for b in buffers:
            b.copy_(flat[start : start + b.numel()].view_as(b))
            start += b.numel()


def _float_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    return (b for b in model.buffers() if b.is_floating_point())


def _dtype(model: nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return torch.get_default_dtype() if first is None else first.dtype


def _norm_layers(model: nn.Module) -> list[_NormBase]:
    """The layers with running statistics (BatchNorm and the like)."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


class Learner:
    """One node's model, data, loss and evaluation.

    ``sam_rho`` > 0 makes ``gradient`` sharpness-aware (SAM, Foret et al. 2021): the gradient
    at params + rho g/|g| on the same minibatch. ``flip_labels`` trains on labels y -> C-1-y
    (a Byzantine label-flipping node); it needs a task with an int ``classes`` = C.
    """

    def __init__(
        self,
        task: Task,
        node: int,
        *,
        model_seed: int,
        batch_seed: int,
        batch_size: int,
        sam_rho: float = 0.0,
        flip_labels: bool = False,
    ) -> None:
        if sam_rho < 0:
            raise ValueError(f"sam_rho must be >= 0, not {sam_rho}")
        self.task = task
        self.data = task.shard(node)
        if len(self.data) == 0:
            raise ValueError(f"task {task.name!r} gave node {node} no training data")
        self.sam_rho = sam_rho
        self._train_data = _flipped(task, self.data) if flip_labels else self.data
        self._train_model = task.make_model(model_seed)
        self._eval_model = copy.deepcopy(self._train_model)
        # evaluate, recalibrate and model_state share the eval module, maybe across threads.
        self._eval_lock = threading.Lock()
        self._params = [p for p in self._train_model.parameters() if p.requires_grad]
        self._batch = batch_size if 0 < batch_size < len(self.data) else len(self.data)
        self._gen = torch.Generator().manual_seed(batch_seed)
        self._buffers = flat_buffers(self._train_model)

    def initial_params(self) -> torch.Tensor:
        return flatten(self._train_model)

    def buffers(self) -> torch.Tensor:
        """The running statistics as of the last ``gradient`` (flat; empty if the model has
        none). Safe to call from another thread: the snapshot is replaced, never updated."""
        return self._buffers.clone()

    def batch_rng(self) -> torch.Tensor:
        """The minibatch generator's state, for a checkpoint."""
        return self._gen.get_state()

    def restore(self, buffers: torch.Tensor, batch_rng: torch.Tensor) -> None:
        """Continue from a checkpoint's running statistics and minibatch generator."""
        load_buffers(self._train_model, buffers)
        self._buffers = flat_buffers(self._train_model)
        self._gen.set_state(batch_rng)

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The minibatch gradient of the loss at ``params`` (flat), and the loss there; with
        SAM, the gradient at the perturbed point. Updates the running statistics once."""
        model = self._train_model
        vector_to_parameters(params, model.parameters())
        model.train()
        x, y = self._minibatch()
        loss, grads = self._loss_and_grads(x, y)
        if self.sam_rho > 0:
            grads = self._sam_grads(params, grads, x, y)
        self._buffers = flat_buffers(model)  # one assignment: readers see old or new, whole
        return torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())

    def _minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._train_data
        if self._batch == len(data):
            return data.x, data.y
        idx = torch.randint(len(data), (self._batch,), generator=self._gen)
        return data.x[idx], data.y[idx]

    def _loss_and_grads(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = self.task.loss(self._train_model, x, y)
        return loss, torch.autograd.grad(loss, self._params)

    def _sam_grads(
        self,
        params: torch.Tensor,
        grads: tuple[torch.Tensor, ...],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The gradient at params + rho g/|g| (the norm over all parameters jointly)."""
        model = self._train_model
        scale = self.sam_rho / (torch.cat([g.reshape(-1) for g in grads]).norm() + 1e-12)
        step = iter(grads)
        # Frozen parameters are not perturbed; the flat vector still covers them.
        ascent = [
            next(step) * scale if p.requires_grad else torch.zeros_like(p)
            for p in model.parameters()
        ]
        # The second pass must not count the minibatch twice in the running statistics.
        saved = [b.detach().clone() for b in model.buffers()]
        # A new vector: vector_to_parameters makes the parameters views of the caller's params.
        vector_to_parameters(
            params + torch.cat([a.reshape(-1) for a in ascent]), model.parameters()
        )
        try:
            return self._loss_and_grads(x, y)[1]
        finally:
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved, strict=True):
                    b.copy_(s)

    def evaluate(
        self, params: torch.Tensor, buffers: torch.Tensor | None = None
    ) -> dict[str, float]:
        """The task's held-out metrics for the model ``params`` with running statistics
        ``buffers`` (flat), by default those of the latest ``gradient``."""
        with self._eval_lock:
            model = self._load_eval(params, buffers)
            model.eval()
            with torch.no_grad():
                return self.task.evaluate(model)

    def recalibrate(
        self, params: torch.Tensor, *, batches: int | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """Re-estimate the running statistics of the model ``params`` on this node's data:
        forward passes over the first ``batches`` batches (all by default), in order.
        Returns the flat buffers for ``evaluate``; empty for a model without BatchNorm."""
        with self._eval_lock:
            model = self._load_eval(params, None)
            norms = _norm_layers(model)
            if not norms:
                return torch.empty(0, dtype=params.dtype)
            momenta = [m.momentum for m in norms]
            try:
                _estimate_statistics(model, norms, self.data, batches, batch_size)
            finally:
                for m, momentum in zip(norms, momenta, strict=True):
                    m.momentum = momentum
            return flat_buffers(model)

    def model_state(
        self, params: torch.Tensor, buffers: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The ``state_dict`` (new tensors) of the model ``params`` with running statistics
        ``buffers`` (by default those of the latest ``gradient``), e.g. for ``torch.save``."""
        with self._eval_lock:
            model = self._load_eval(params, buffers)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _load_eval(self, params: torch.Tensor, buffers: torch.Tensor | None) -> nn.Module:
        model = self._eval_model
        vector_to_parameters(params, model.parameters())
        load_buffers(model, self._buffers if buffers is None else buffers)
        return model


def _estimate_statistics(
    model: nn.Module,
    norms: list[_NormBase],
    data: Dataset,
    batches: int | None,
    batch_size: int,
) -> None:
    """Running statistics of ``model`` as averages over the batches, weighted by batch size
    (so the means are exactly the data's even when the last batch is short)."""
    for m in norms:
        m.reset_running_stats()
    model.train()
    size = max(1, batch_size)
    starts = range(0, len(data), size)
    seen = 0
    with torch.no_grad():
        for start in starts[:batches]:
            x = data.x[start : start + size]
            seen += len(x)
            for m in norms:
                m.momentum = len(x) / seen  # new = (1 - m) old + m batch: a running mean
            model(x)


def _flipped(task: Task, data: Dataset) -> Dataset:
    """``data`` with labels y -> classes - 1 - y."""
    classes = getattr(task, "classes", None)
    if not isinstance(classes, int) or isinstance(classes, bool):
        raise ValueError("label flipping needs a classification task with `classes`")
    return Dataset(data.x, classes - 1 - data.y)
