"""One local Ray cluster shared by the modules of tests/cluster that ask for it.

Why: starting the two-node cluster (raycluster.py) takes 20 to 60 s on the 2-core
machine, more than a module's own tests; ``make test`` has no time for one per module.
The fixture ``ray_cluster`` starts it (and connects this process, namespace "radcrypt")
for the first module that uses it and stops it, by PID, after the last module of the run
that uses it; a run that ends early (``-x``, an error) stops it at the session's end.
Each module keeps its own deployment (its own service id, its actors killed by its own
fixture), so only the Ray processes are shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

try:
    from raycluster import LocalCluster, local_cluster
except ImportError:  # pragma: no cover
    from tests.cluster.raycluster import LocalCluster, local_cluster

_shared: dict[str, Any] = {}


def _start() -> LocalCluster:
    if "cluster" not in _shared:
        stack = ExitStack()
        try:
            cluster = stack.enter_context(local_cluster())
            import ray

            ray.init(address=cluster.address, namespace="radcrypt", logging_level="ERROR",
                     log_to_driver=False)
            stack.callback(ray.shutdown)
        except BaseException:
            stack.close()
            raise
        _shared.update(cluster=cluster, stack=stack)
    cluster: LocalCluster = _shared["cluster"]
    return cluster


def _stop() -> None:
    stack = _shared.pop("stack", None)
    _shared.pop("cluster", None)
    if stack is not None:
        stack.close()  # ray.shutdown, then the cluster's processes by PID


def _used_later(request: pytest.FixtureRequest) -> bool:
    """Whether a test after this module's last one (in this run's order) uses the cluster."""
    items = request.session.items
    mine = [n for n, item in enumerate(items) if getattr(item, "module", None) is request.module]
    after = items[max(mine) + 1:] if mine else []
    return any("ray_cluster" in getattr(item, "fixturenames", ()) for item in after)


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """The shared local Ray cluster, this process connected to it."""
    if not _shared:
        request.config.add_cleanup(_stop)
    cluster = _start()
    yield cluster
    if not _used_later(request):
        _stop()
