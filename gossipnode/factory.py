"""The algorithm a configuration names, with its parameters worked out from the config, the
task and the graph. Raises ValueError naming the flag to fix."""

from __future__ import annotations

from gossipnode.algorithms import Algorithm, Gossip
from gossipnode.byzantine import LABEL_FLIP
from gossipnode.config import NodeConfig
from gossipnode.dadao import Dadao, Parameters
from gossipnode.mixing import DFedSam, Monna, Segments, VarianceCorrected
from gossipnode.tasks import Task

ALGORITHMS = ("gossip", "dadao", "monna", "variance-corrected", "dfedsam")
CACHED = ("monna", "variance-corrected", "dfedsam")  # keep a neighbour cache: degree x model


def make_algorithm(config: NodeConfig, task: Task) -> Algorithm:
    if config.byzantine == LABEL_FLIP and not isinstance(getattr(task, "classes", None), int):
        raise ValueError(
            f"--byzantine: label-flip needs a classification task with classes; "
            f"{task.name!r} has none"
        )
    if config.algorithm == "gossip":
        return Gossip(lr=config.lr, momentum=config.momentum or 0.0)
    if config.algorithm == "dadao":
        return _dadao(config, task)
    if config.algorithm in CACHED:
        return _cached(config, task)
    raise ValueError(
        f"--algorithm: unknown algorithm {config.algorithm!r}; known: {', '.join(ALGORITHMS)}"
    )


def _dadao(config: NodeConfig, task: Task) -> Dadao:
    if config.grad_rate is None or config.grad_rate == 0:
        raise ValueError(
            "--grad-rate: dadao needs a gradient rate > 0 (its time unit is the mean gradient "
            "interval), not max or 0"
        )
    if config.batch_size != 0:
        raise ValueError("--batch-size: dadao needs full-batch gradients, --batch-size 0")
    mu = config.mu if config.mu is not None else getattr(task, "mu", None)
    lipschitz = config.lipschitz if config.lipschitz is not None else getattr(task, "L", None)
    if mu is None or lipschitz is None:
        raise ValueError(f"--mu and --L: task {task.name!r} does not know them; give both")
    if config.dadao_chi1 is not None and config.dadao_chi2 is not None:
        chi1, chi2 = config.dadao_chi1, config.dadao_chi2
    elif config.graph is not None:
        # chi scales as 1/rate: per second -> per time unit (1/grad_rate seconds)
        chi1, chi2 = (c * config.grad_rate for c in config.graph.chis(config.gossip_rate))
    else:
        raise ValueError(
            "--topology: dadao needs the whole graph for chi_1 and chi_2; give --topology, "
            "or --dadao-chi1 and --dadao-chi2"
        )
    try:
        parameters = Parameters(float(mu), float(lipschitz), chi1, chi2, config.dadao_alpha)
    except ValueError as exc:
        flag = "--mu" if "mu must" in str(exc) else "--L" if "L must" in str(exc) else "--dadao"
        raise ValueError(f"{flag}: {exc}") from None
    return Dadao(parameters, time_unit=1 / config.grad_rate)


def _cached(config: NodeConfig, task: Task) -> Algorithm:
    degree, age = config.degree or len(config.peers), config.cache_age
    if config.algorithm == "monna":
        if config.byzantine_budget and 2 * config.byzantine_budget >= degree + 1:
            raise ValueError(
                f"--byzantine-budget: dropping {config.byzantine_budget} of at most "
                f"{degree + 1} models (own included) needs 2b < {degree + 1}; lower it"
            )
        momentum = 0.99 if config.momentum is None else config.momentum
        if config.byzantine == LABEL_FLIP:
            # The authors' label-flipping vector: the model one flipped-label gradient step
            # away, mu - gamma grad(flipped); no momentum carries the flip from step to step.
            momentum = 0.0
        return Monna(config.lr, config.byzantine_budget, age, degree, momentum)
    if config.algorithm == "variance-corrected":
        target = config.variance_target
        return VarianceCorrected(
            config.lr,
            weight_segments(task),
            age,
            degree,
            blend=config.blend,
            target="others" if target == "none" else target,
            correct=target != "none",
        )
    return DFedSam(config.lr, config.local_steps, config.gossip_steps, age, degree)


def weight_segments(task: Task) -> Segments:
    """Where the weight tensors (dim >= 2) lie in the task's flat model."""
    out, start = [], 0
    for p in task.make_model(0).parameters():
        if p.dim() >= 2:
            out.append((start, start + p.numel()))
        start += p.numel()
    return tuple(out)
