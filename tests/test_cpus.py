"""cloud/cpus.py: the engine's thread count from the CPUs the process may use (affinity,
cgroup v2 and v1 quotas), RADCRYPT_THREADS and `serve --threads` overriding it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud import cpus
from cloud.service_options import add_service_arguments, service_config


@pytest.fixture(autouse=True)
def _fresh_count() -> Iterator[None]:
    """Every test starts and ends with the count looked up again."""
    cpus.set_threads(None)
    yield
    cpus.set_threads(None)


def _tree(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_cgroup_v2_quota_is_read_from_the_process_cgroup_and_rounded_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _tree(tmp_path, "0::/system.slice/radcrypt.service", {
        "cpu.max": "max 100000\n",
        "system.slice/cpu.max": "max 100000\n",
        "system.slice/radcrypt.service/cpu.max": "150000 100000\n",
    })
    assert cpus.cgroup_cpus(root, proc) == pytest.approx(1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpus.available_cpus(root, proc) == 2  # 1.5 CPUs of quota: two threads


def test_the_tightest_quota_of_the_ancestors_wins(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _tree(tmp_path, "0::/kubepods/pod1/container", {
        "kubepods/cpu.max": "400000 100000\n",
        "kubepods/pod1/cpu.max": "300000 100000\n",
        "kubepods/pod1/container/cpu.max": "max 100000\n",
    })
    assert cpus.cgroup_cpus(root, proc) == pytest.approx(3.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpus.available_cpus(root, proc) == 3


def test_a_container_sees_its_own_cgroup_at_the_root(tmp_path: Path) -> None:
    """Inside a cgroup namespace /proc/self/cgroup may name a path the mount does not
    show: the quota at the mount's root is the container's."""
    root, proc = _tree(tmp_path, "0::/../outside/path", {"cpu.max": "200000 100000\n"})
    assert cpus.cgroup_cpus(root, proc) == pytest.approx(2.0)


def test_cgroup_v1_cfs_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _tree(tmp_path, "4:cpu,cpuacct:/docker/abc", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cpus.cgroup_cpus(root, proc) == pytest.approx(2.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpus.available_cpus(root, proc) == 3


def test_no_quota_leaves_the_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _tree(tmp_path, "0::/", {"cpu.max": "max 100000\n"})
    assert cpus.cgroup_cpus(root, proc) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})  # taskset -c 0,3,5
    assert cpus.available_cpus(root, proc) == 3
    missing = tmp_path / "no-such-file"
    assert cpus.cgroup_cpus(root, missing) is None
    assert cpus.available_cpus(root, missing) == 3


def test_a_quota_below_one_cpu_still_runs_one_thread(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _tree(tmp_path, "0::/", {"cpu.max": "20000 100000\n"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert cpus.available_cpus(root, proc) == 1


def test_this_machine() -> None:
    """What the process may use here: at least one CPU, never more than its affinity."""
    assert 1 <= cpus.available_cpus() <= len(os.sched_getaffinity(0))


def test_radcrypt_threads_overrides_and_is_checked() -> None:
    assert cpus.configured_threads({"RADCRYPT_THREADS": "5"}) == 5
    assert cpus.configured_threads({}) == cpus.available_cpus()
    for bad in ("0", "-2", "many", "1.5", str(cpus.MAX_THREADS + 1)):
        with pytest.raises(ValueError, match="RADCRYPT_THREADS"):
            cpus.configured_threads({"RADCRYPT_THREADS": bad})


def test_set_threads_fixes_the_engine_count_until_reset(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setenv("RADCRYPT_THREADS", "3")
    assert cpus.engine_threads() == 3
    cpus.set_threads(7)
    monkeypatch.setenv("RADCRYPT_THREADS", "4")
    assert cpus.engine_threads() == 7  # set_threads wins over the environment
    cpus.set_threads(None)
    assert cpus.engine_threads() == 4  # looked up again
    with pytest.raises(ValueError, match="thread count"):
        cpus.set_threads(0)


def _serve_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    return parser.parse_args(["--insecure-no-auth", "--service-id", "svc-test", *extra])


def test_serve_threads_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADCRYPT_THREADS", raising=False)
    assert service_config(_serve_args("--threads", "6"), {}).threads == 6
    assert service_config(_serve_args(), {"RADCRYPT_THREADS": "3"}).threads == 3
    assert service_config(_serve_args(), {}).threads == cpus.available_cpus()
    assert service_config(_serve_args("--threads", "2"), {"RADCRYPT_THREADS": "9"}).threads == 2
    with pytest.raises(ValueError, match="--threads"):
        service_config(_serve_args("--threads", "0"), {})
    with pytest.raises(ValueError, match="RADCRYPT_THREADS 'x'"):
        service_config(_serve_args(), {"RADCRYPT_THREADS": "x"})
