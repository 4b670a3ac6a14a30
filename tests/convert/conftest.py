"""Services the storage and Ray tests share, started once per test session: an S3
endpoint (moto's server) and a two-node Ray cluster whose workers reach it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers.services import ray_cluster, s3_server
from helpers.stores import Chats, make_chats


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """The S3 settings, also put into this process's environment, where the code under
    test (and every CLI run a test starts) finds them as it finds a real store's."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with s3_server() as env:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def cluster(s3: dict[str, str]) -> Iterator[str]:
    """The address of a Ray cluster of two nodes (one CPU each), for --ray-address."""
    pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        with ray_cluster(s3) as address:
            yield address
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="session")
def chats(s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Chats:
    return make_chats(tmp_path_factory.mktemp("chats"))
