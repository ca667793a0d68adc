"""Fixtures for the tests that run a real 3-member Incus cluster on this machine (marked ``cluster``).

The cluster (tests/support/incus_cluster.py, docs/incus-test-cluster.md) is started by the first
test here that asks for it and torn down after the last test of this directory (so it does not idle
through the rest of the suite), unless it was already up when the session started (a developer's
cluster, left as found). Before the first cluster command the fixture installs the ``unreachable``
guard routes for the test subnet in the root namespace and fails if they are missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator

import pytest

from tests.support import incus_cluster as ic


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.slow)


_OWNED: dict[str, bool] = {}  # owned: this session started it; down: taken down after our last test


def _here(item: pytest.Item) -> bool:
    return str(item.fspath).startswith(os.path.dirname(__file__) + os.sep)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    yield  # the test's own fixtures (its containers) are gone now
    last_here = nextitem is None or not _here(nextitem)
    if last_here and _OWNED.get("owned") and not _OWNED.get("down") and os.environ.get("REMOTECLI_INCUS_KEEP") != "1":
        ic.down()
        _OWNED["down"] = True


@pytest.fixture(autouse=True)
def _cluster_back_up() -> None:
    """If the cluster was taken down after a run of cluster tests and more follow, bring it back."""
    if _OWNED.get("down"):
        ic.ensure_guard_routes()
        ic.up(log=True)
        _OWNED["down"] = False


@pytest.fixture(scope="session")
def incus_cluster() -> Iterator[ic.ClientConfig]:
    """The cluster, up, with 3 members ONLINE; yields the controller's client configuration."""
    if os.geteuid() != 0:
        pytest.skip("the Incus test cluster needs root (network namespaces, mounts)")
    for tool in ("ip", "nsenter", "unshare", "mmdebstrap", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/install.sh")
    # The guard first, and checked: nothing may leave through the default route.
    ic.ensure_guard_routes()
    missing = ic.missing_guard_routes()
    if missing:
        pytest.fail(f"guard routes missing in the root namespace: {missing}")
    was_up = ic.incusd_pid("m1") is not None
    _OWNED["owned"] = not was_up
    try:
        config = ic.up(log=True)
    except ic.ClusterError as exc:
        if not was_up:
            ic.down()
        pytest.fail(f"the Incus test cluster did not come up: {exc}")
    yield config
    if not was_up and not _OWNED.get("down") and os.environ.get("REMOTECLI_INCUS_KEEP") != "1":
        ic.down()


@pytest.fixture(scope="session")
def incus_cluster_owned(incus_cluster: ic.ClientConfig) -> bool:
    """True when this session started the cluster (and so may take it down and up again)."""
    return _OWNED.get("owned", False)
