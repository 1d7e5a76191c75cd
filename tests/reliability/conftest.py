"""Fixtures of the reliability tests: the tiny weights, the smallest inputs, and clusters of real
processes (redis-server, ``talkgen serve``, ``talkgen worker``) started here and stopped here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.service_helpers import find_program

from .harness import Cluster, make_assets


def pytest_collection_modifyitems(items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture()
def cluster(tmp_path, tiny_weights) -> Iterator:
    """A factory: ``cluster(**options)`` starts a Cluster in its own folder; all are stopped after."""
    started: list[Cluster] = []

    def start(redis: bool = True, **options) -> Cluster:
        if redis:
            find_program("redis-server")  # installs it, or skips with the reason
        made = Cluster(tmp_path / f"cluster{len(started)}", tiny_weights, redis=redis, **options)
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()
