"""A node's checkpoint: what it needs to resume where it stopped, written so a crash at any
moment leaves the previous checkpoint or the new one, never a torn file.

Contents: the algorithm's state (model, and per-edge or cached neighbour state), the learner's
BatchNorm buffers and batch generator, the counters, and a JSON record of who wrote it (node,
task, algorithm, its parameters) and which neighbours it had met. Everything is a tensor, so
``torch.load(weights_only=True)`` reads it: nothing is ever unpickled.

Writing: a temporary file beside the target, fsync, rename over the target, fsync of the
directory. Reading: any failure is a ``CheckpointError`` saying what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILE = "checkpoint.pt"
FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint could not be read or does not fit this node; the message says why."""


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]  # the algorithm's
    buffers: torch.Tensor  # the learner's running statistics (empty without BatchNorm)
    batch_rng: torch.Tensor  # the learner's minibatch generator
    meta: dict[str, Any] = field(default_factory=dict)  # JSON: identity, counters, peers


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically and durably."""
    record = json.dumps({"format": FORMAT, **checkpoint.meta}).encode()
    data = {
        "state": checkpoint.state,
        "buffers": checkpoint.buffers,
        "batch_rng": checkpoint.batch_rng,
        "meta": torch.frombuffer(bytearray(record), dtype=torch.uint8),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(data, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def load(path: Path) -> Checkpoint:
    """The checkpoint at ``path``; CheckpointError if it is missing, torn or not ours."""
    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as exc:  # torch raises many kinds for a bad file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    try:
        meta = json.loads(bytes(data["meta"].tolist()).decode())
        state = data["state"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("state holds something other than tensors")
        return Checkpoint(state, data["buffers"], data["batch_rng"], meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a gossipnode checkpoint: {exc}") from None
