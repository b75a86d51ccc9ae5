"""Every test a security or privacy document cites exists.

SECURITY.md's rule is that each claim names the test that proves it; a renamed or deleted
test would leave a claim standing on nothing. A citation is a backticked `path.py::name`;
a following backticked `::name` (or a bare `test_name`) refers to the same file; `S/` is
tests/security/. Each name must be a `def` in that file; a path without a name must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["SECURITY.md", "docs/PRIVACY.md", "docs/KEYWORDS.md", "docs/MODES.md",
        "docs/INTEGRATION.md", "docs/SCALING.md", "docs/WORKSTATION.md"]
_SPAN = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^((?:S/|tests/)[\w/.\-]+\.py)(?:::(\w*))?$")
_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", re.MULTILINE)


def unresolved(text: str) -> tuple[int, list[str]]:
    """(citations checked, one line per citation that does not resolve)."""
    current: Path | None = None
    checked, bad = 0, []
    defs: dict[Path, set[str]] = {}
    for match in _SPAN.finditer(text):
        span, line = match.group(1), text.count("\n", 0, match.start()) + 1
        path_match = _PATH.match(span)
        if path_match:
            path = path_match.group(1)
            current = ROOT / ("tests/security/" + path[2:] if path.startswith("S/") else path)
            name = path_match.group(2) or None
            if not current.exists():
                bad.append(f"line {line}: `{span}`: no such file")
                current = None
                continue
            if name is None:
                checked += 1
                continue
        elif re.fullmatch(r"::\w+", span):
            name = span[2:]
        elif re.fullmatch(r"test_\w+", span) and current is not None:
            name = span
        else:
            continue
        if current is None:
            bad.append(f"line {line}: `{span}`: no test file named before it")
            continue
        checked += 1
        if current not in defs:
            defs[current] = set(_DEF.findall(current.read_text()))
        if name not in defs[current]:
            bad.append(f"line {line}: `{span}`: no def {name} in {current.relative_to(ROOT)}")
    return checked, bad


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_test_exists(doc: str) -> None:
    checked, bad = unresolved((ROOT / doc).read_text())
    assert not bad, f"{doc}: " + "; ".join(bad)
    if doc == "SECURITY.md":
        assert checked > 200  # the claims table is read, not skipped


def test_a_missing_test_is_reported() -> None:
    text = ("`tests/test_seglog.py::test_kind_rules`, `::test_no_such_test`, "
            "`S/test_no_such_file.py::test_x`")
    checked, bad = unresolved(text)
    assert checked == 2 and len(bad) == 2
    assert "no def test_no_such_test" in bad[0] and "no such file" in bad[1]
