"""The make targets that decide what runs where: `make test` leaves the soak runs out and
`make soak` runs only them (README, "Soak"), and `make sbom`'s licence gate fails on a
GPL/AGPL dependency outside the allowed list (.ci/sbom_licences.py).

Why test a Makefile: CI runs `make test` and nothing else (.ci/run); a marker expression
that silently selected the soak runs would make CI take hours, one that silently dropped
ordinary tests would make it pass without testing. The marker expressions are taken from
`make -n`'s output and run against a small test file, so what is checked is what make runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKER = ROOT / ".ci" / "sbom_licences.py"
STAMP = ".venv/.installed"  # `make -o` it: never reinstall the environment from a test


def make_dry_run(target: str) -> str:
    """What `make TARGET` would run, without running it or refreshing the environment."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed; the Makefile targets cannot be checked")
    done = subprocess.run([make, "-n", "-o", STAMP, target], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, f"make -n {target} failed: {done.stderr}"
    return done.stdout


def pytest_arguments(target: str) -> list[str]:
    """The arguments after `-m pytest` of the one pytest command `make TARGET` runs."""
    lines = [line for line in make_dry_run(target).splitlines() if " -m pytest " in line]
    assert len(lines) == 1, f"make {target} should run pytest once, runs: {lines}"
    words = shlex.split(lines[0])
    return words[words.index("pytest") + 1:]


def run_probe(tmp_path: Path, arguments: list[str], marker: str = "soak"
              ) -> subprocess.CompletedProcess[str]:
    """Run pytest with make's arguments and the project's setup.cfg (its marker
    registrations and options) over a file of one ordinary test and one marked `marker`.
    Without the installed plugins (schemathesis, hypothesis, pytest-qt): selecting by
    marker is pytest's own, and loading them took 10 s of a loaded machine per run."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import pytest\n\n"
        "def test_ordinary():\n    print('RAN ordinary')\n\n"
        f"@pytest.mark.{marker}\n"
        "def test_long():\n    print('RAN soak')\n",
        encoding="utf-8")
    command = [sys.executable, "-m", "pytest", *arguments, "-c", str(ROOT / "setup.cfg"),
               "--rootdir", str(tmp_path), "-s", str(probe)]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False, env=env)


def test_make_test_leaves_the_soak_runs_out(tmp_path: Path) -> None:
    arguments = pytest_arguments("test")
    done = run_probe(tmp_path, arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RAN ordinary" in done.stdout
    assert "RAN soak" not in done.stdout, f"make test runs soak tests: {arguments}"


def test_make_soak_runs_only_the_soak_runs(tmp_path: Path) -> None:
    arguments = pytest_arguments("soak")
    done = run_probe(tmp_path, arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RAN soak" in done.stdout
    assert "RAN ordinary" not in done.stdout, f"make soak runs ordinary tests: {arguments}"


def test_a_misspelt_soak_marker_stops_make_test(tmp_path: Path) -> None:
    """setup.cfg's --strict-markers: '@pytest.mark.soka' is an error, not a test that
    make test would run for minutes."""
    done = run_probe(tmp_path, pytest_arguments("test"), marker="soka")
    assert done.returncode != 0
    assert "'soka' not found in `markers` configuration option" in done.stdout + done.stderr
    assert "RAN" not in done.stdout


def test_make_sbom_generates_then_checks() -> None:
    commands = make_dry_run("sbom")
    generate = commands.find("cyclonedx-py environment")
    gate = commands.find("sbom_licences.py")
    assert 0 <= generate < gate, f"make sbom must generate, then check:\n{commands}"


# --- the licence gate --------------------------------------------------------------------


def component(name: str, *licences: dict[str, object]) -> dict[str, object]:
    return {"type": "library", "name": name, "version": "1.0",
            "bom-ref": f"{name}==1.0", "licenses": list(licences)}


def spdx(identifier: str) -> dict[str, object]:
    return {"license": {"id": identifier}}


def named(text: str) -> dict[str, object]:
    return {"license": {"name": text}}


def expression(text: str) -> dict[str, object]:
    return {"expression": text}


def gate(tmp_path: Path, components: list[dict[str, object]],
         setup_cfg: str | None = None) -> subprocess.CompletedProcess[str]:
    sbom = tmp_path / "sbom.cdx.json"
    sbom.write_text(json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6",
                                "components": components}), encoding="utf-8")
    command = [sys.executable, str(CHECKER), str(sbom)]
    if setup_cfg is not None:
        cfg = tmp_path / "setup.cfg"
        cfg.write_text(setup_cfg, encoding="utf-8")
        command += ["--setup-cfg", str(cfg)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


PERMISSIVE = [component("numpy", expression("BSD-3-Clause AND 0BSD AND MIT")),
              component("boto3", spdx("Apache-2.0")),
              component("jinja2", named("License :: OSI Approved :: BSD License"))]


def test_permissive_and_the_allowed_pyqt6_pass(tmp_path: Path) -> None:
    done = gate(tmp_path, [*PERMISSIVE, component("PyQt6", spdx("GPL-3.0-only")),
                           component("PyQt6-Qt6")])  # no licence data: reviewed as LGPL
    assert done.returncode == 0, done.stderr
    assert "PyQt6 (GPL-3.0-only)" in done.stdout and "PyQt6-Qt6 (LGPL-3.0-only)" in done.stdout


@pytest.mark.parametrize("statement", [
    spdx("GPL-2.0-or-later"), spdx("AGPL-3.0-only"), expression("MIT AND GPL-3.0-only"),
    named("License :: OSI Approved :: GNU General Public License v3 (GPLv3)"),
    named("License :: OSI Approved :: GNU Affero General Public License v3"),
])
def test_a_gpl_dependency_outside_the_list_fails_naming_it(tmp_path: Path,
                                                           statement: dict[str, object]) -> None:
    done = gate(tmp_path, [*PERMISSIVE, component("pylibjpeg-libjpeg", statement)])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pylibjpeg-libjpeg 1.0: strong copyleft licence" in done.stderr


@pytest.mark.parametrize("statement", [
    expression("MIT OR GPL-2.0-only"), spdx("LGPL-2.1-or-later"),
    named("License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)"),
])
def test_weak_copyleft_and_a_permissive_alternative_pass(tmp_path: Path,
                                                        statement: dict[str, object]) -> None:
    done = gate(tmp_path, [*PERMISSIVE, component("dual", statement)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_dependency_without_licence_data_fails_until_reviewed(tmp_path: Path) -> None:
    done = gate(tmp_path, [*PERMISSIVE, component("mystery")])
    assert done.returncode == 1
    assert "mystery 1.0: the SBOM names no licence" in done.stderr


def test_pyqt6_outside_the_gui_extra_fails(tmp_path: Path) -> None:
    confined = ("[options]\ninstall_requires =\n    numpy>=1.26\n"
                "[options.extras_require]\ngui =\n    PyQt6>=6.6\ndev =\n    radcrypt[gui]\n")
    assert gate(tmp_path, PERMISSIVE, confined).returncode == 0
    leaked = confined.replace("numpy>=1.26\n", "numpy>=1.26\n    pyqt6>=6.6  # for a dialog\n")
    done = gate(tmp_path, PERMISSIVE, leaked)
    assert done.returncode == 1
    assert "pyqt6 may be required only by the extra 'gui', found in: install_requires" \
        in done.stderr


def test_an_unreadable_sbom_is_a_clear_error(tmp_path: Path) -> None:
    sbom = tmp_path / "sbom.cdx.json"
    sbom.write_text("{not json", encoding="utf-8")
    done = subprocess.run([sys.executable, str(CHECKER), str(sbom)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert f"cannot read the SBOM {sbom}" in done.stderr


def test_this_environment_passes_the_gate(tmp_path: Path) -> None:
    """The real SBOM of .venv, made as `make sbom` makes it (offline: installed metadata),
    less the JSON-schema validation of the document (14 s of CPU; the output is the same
    byte for byte, and `make sbom` keeps it)."""
    cyclonedx = Path(sys.executable).parent / "cyclonedx-py"
    if not cyclonedx.exists():
        pytest.fail(f"{cyclonedx} is missing: the dev extra brings cyclonedx-bom")
    sbom = tmp_path / "sbom.cdx.json"
    made = subprocess.run([str(cyclonedx), "environment", "--output-reproducible",
                           "--no-validate", "--output-format", "JSON", "--output-file",
                           str(sbom), sys.prefix], capture_output=True, text=True,
                          timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    document = json.loads(sbom.read_text(encoding="utf-8"))
    assert (document["bomFormat"], document["specVersion"]) == ("CycloneDX", "1.6")
    names = {c["name"].lower() for c in document["components"]}
    assert {"radcrypt", "numpy", "cryptography", "boto3"} <= names
    done = subprocess.run([sys.executable, str(CHECKER), str(sbom), "--setup-cfg",
                           str(ROOT / "setup.cfg")], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
