"""Licence gate of the release's SBOM (`make sbom`): fail on a GPL or AGPL dependency
outside the allowed list, and on a dependency whose licence nobody has read.

Why a gate and not a report: Radcrypt is Apache-2.0 and promises permissive dependencies
(README, "Licence"); one strong-copyleft package pulled in by a new requirement would
change what a hospital may do with the program, and nobody reads a 140-line list twice.
The one exception is PyQt6 (GPL-3.0 or commercial), which the design confines to the
desktop client: it may appear only in the `gui` extra of setup.cfg (checked here too; the
import contract that keeps Qt inside app/gui is .importlinter's, run by make test).

Input: a CycloneDX JSON document from `cyclonedx-py environment` (licences as SPDX ids,
expressions, or free-text names taken from the packages' trove classifiers). LGPL is weak
copyleft (dynamic linking allowed) and passes, listed. A package with no licence data
fails until it is added to REVIEWED with the licence read from its own files.

Exit 0: clean; 1: a forbidden or unreviewed licence (one line per package on stderr);
2: the SBOM or setup.cfg cannot be read.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Strong copyleft allowed only here, with the setup.cfg extra that alone may require it.
ALLOWED_COPYLEFT = {"pyqt6": "gui"}

# Packages whose metadata names no licence, read by hand: name -> (licence, where it says so).
REVIEWED = {
    "pyqt6-qt6": ("LGPL-3.0-only", "its METADATA: 'License: LGPL v3' (Qt's libraries)"),
    "antlr4-python3-runtime": ("BSD-3-Clause", "its METADATA: 'License: BSD'"),
    "protobuf": ("BSD-3-Clause", "its METADATA: 'License: 3-Clause BSD License'"),
    "ray": ("Apache-2.0", "its METADATA: 'License: Apache 2.0' and licenses/LICENSE.txt"),
}

_STRONG = re.compile(r"(?<![A-Za-z])A?GPL|General Public License|Affero", re.IGNORECASE)
_WEAK = re.compile(r"LGPL|Lesser General Public|Library General Public", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    name: str
    version: str
    licences: tuple[str, ...]
    kind: str  # "permissive", "weak-copyleft", "copyleft", "unknown"


def normalise(name: str) -> str:
    """PEP 503 name normalisation, so 'PyQt6_sip' and 'pyqt6-sip' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def licence_strings(component: dict[str, Any]) -> list[str]:
    """Every licence statement of one component: SPDX ids, expressions, free-text names."""
    out: list[str] = []
    for entry in component.get("licenses") or []:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("expression"), str):
            out.append(entry["expression"])
        licence = entry.get("license")
        if isinstance(licence, dict):
            text = licence.get("id") or licence.get("name")
            if isinstance(text, str):
                out.append(text)
    return out


def _alternative_is_strong(text: str) -> bool:
    """A statement is strong copyleft unless it is weak copyleft or it offers a way out:
    'MIT OR GPL-2.0-only' may be taken as MIT (only flat OR expressions are split)."""
    if "(" not in text and " OR " in text:
        return all(_alternative_is_strong(part) for part in text.split(" OR "))
    return bool(_STRONG.search(_WEAK.sub("", text)))


def classify(texts: Iterable[str]) -> str:
    texts = list(texts)
    if not texts:
        return "unknown"
    # Several statements about one package (an SPDX id and a classifier) all apply: the
    # package is copyleft if any of them says so.
    if any(_alternative_is_strong(t) for t in texts):
        return "copyleft"
    if any(_WEAK.search(t) for t in texts):
        return "weak-copyleft"
    return "permissive"


def verdicts(sbom: dict[str, Any]) -> list[Verdict]:
    components = sbom.get("components")
    if not isinstance(components, list):
        raise ValueError("the SBOM has no 'components' list (not a CycloneDX document?)")
    result = []
    for component in components:
        name, version = str(component.get("name", "?")), str(component.get("version", "?"))
        texts = licence_strings(component)
        reviewed = REVIEWED.get(normalise(name))
        if not texts and reviewed is not None:
            texts = [reviewed[0]]
        result.append(Verdict(name, version, tuple(texts), classify(texts)))
    return result


def requirement_names(value: str) -> list[str]:
    """Package names of a setup.cfg requirement list (one per line; comments skipped)."""
    names = []
    for line in value.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.append(normalise(match.group(0)))
    return names


def confinement_problems(setup_cfg: Path) -> list[str]:
    """Each allowed copyleft package must be required by its own extra and nowhere else."""
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(setup_cfg):
        raise ValueError(f"cannot read {setup_cfg}")
    lists = {"install_requires": parser.get("options", "install_requires", fallback="")}
    if parser.has_section("options.extras_require"):
        for extra, value in parser.items("options.extras_require"):
            lists[f"extra '{extra}'"] = value
    problems = []
    for package, extra in ALLOWED_COPYLEFT.items():
        where = [label for label, value in lists.items() if package in requirement_names(value)]
        if where != [f"extra '{extra}'"]:
            problems.append(f"{setup_cfg}: {package} may be required only by the extra "
                            f"'{extra}', found in: {', '.join(where) or 'nothing'}")
    return problems


def check(sbom_path: Path, setup_cfg: Path | None) -> tuple[list[str], list[Verdict]]:
    """(problems, verdicts) of one SBOM file."""
    try:
        sbom = json.loads(sbom_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the SBOM {sbom_path}: {exc}") from None
    found = verdicts(sbom)
    problems = []
    for v in found:
        if v.kind == "copyleft" and normalise(v.name) not in ALLOWED_COPYLEFT:
            problems.append(f"{v.name} {v.version}: strong copyleft licence "
                            f"({'; '.join(v.licences)}) outside the allowed list "
                            f"{sorted(ALLOWED_COPYLEFT)}")
        elif v.kind == "unknown":
            problems.append(f"{v.name} {v.version}: the SBOM names no licence; read it in "
                            f"the package's files and add it to REVIEWED in {__file__}")
    if setup_cfg is not None:
        problems += confinement_problems(setup_cfg)
    return problems, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sbom", type=Path, help="CycloneDX JSON (cyclonedx-py environment)")
    parser.add_argument("--setup-cfg", type=Path, default=None,
                        help="also check that allowed copyleft stays in its extra")
    args = parser.parse_args(argv)
    try:
        problems, found = check(args.sbom, args.setup_cfg)
    except ValueError as exc:
        print(f"sbom licences: {exc}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for v in found:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    listed = [f"{v.name} ({'; '.join(v.licences)})" for v in found
              if v.kind in ("copyleft", "weak-copyleft")]
    print(f"{args.sbom}: {len(found)} components, "
          + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + (f"; copyleft: {', '.join(listed)}" if listed else ""))
    for line in problems:
        print(f"sbom licences: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
