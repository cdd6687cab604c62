"""Shared test set-up.

Rules for tests that touch the network (after trio-websocket's):
- 127.0.0.1 only, and port 0 (or ports found free just before) so runs never collide;
- anything timed runs on the memory transport under ``autojump_clock`` (virtual time), with a
  ``trio.fail_after`` so a deadlock fails fast instead of hanging;
- real-time tests bound every wait, and stop every process they start.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# pytest-trio runs a test in virtual time when it takes its ``autojump_clock`` fixture.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
