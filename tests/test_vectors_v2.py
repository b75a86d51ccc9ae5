"""The test vectors of storage format 2 and protocol 2 are all documented and well formed.

Each format-2 vector file is checked against the code and against an independent reader by
the test file docs/FORMAT-2.md section 10 names for it (test_pack.py, test_segments_v2.py,
test_seglog.py, test_wire.py). This file checks what holds across them: the table of
section 10 lists every file with its real counts, every file in tests/vectors/ is
documented in one of the two format documents, and each file has the shape of F19 (format
name, spec pointing at the document, unique vector names, a size that keeps diffs
reviewable). A file added without its row, or a row whose counts drift from the file,
fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
FORMAT_MD = ROOT / "docs" / "FORMAT.md"
FORMAT_2_MD = ROOT / "docs" / "FORMAT-2.md"
MAX_FILE_BYTES = 200_000
_ROW = re.compile(r"^\| `(\w+)\.json` \| .* \| (\d+) \| (\d+) \|$", re.MULTILINE)


def _table(document: Path) -> dict[str, tuple[int, int]]:
    return {name: (int(valid), int(broken))
            for name, valid, broken in _ROW.findall(document.read_text(encoding="utf-8"))}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return data


FORMAT_2_FILES = sorted(_table(FORMAT_2_MD))


def test_section_10_lists_format_2_files() -> None:
    assert len(FORMAT_2_FILES) >= 12, "docs/FORMAT-2.md section 10 lost its table"


@pytest.mark.parametrize("name", FORMAT_2_FILES)
def test_counts_in_the_table_are_those_of_the_file(name: str) -> None:
    doc = _load(name)
    assert _table(FORMAT_2_MD)[name] == (len(doc["vectors"]), len(doc.get("broken", [])))


@pytest.mark.parametrize("name", FORMAT_2_FILES)
def test_file_is_small_and_well_formed(name: str) -> None:
    path = VECTORS / f"{name}.json"
    assert path.stat().st_size < MAX_FILE_BYTES
    doc = _load(name)
    assert doc["format"] == name
    assert "docs/FORMAT-2.md" in str(doc["spec"])
    assert doc["vectors"], "every file has valid vectors"
    names = [e["name"] for e in doc["vectors"] + doc.get("broken", []) if "name" in e]
    assert len(names) == len(set(names)), "vector names must be unique in a file"
    assert all(isinstance(e["error"], str) and e["error"] for e in doc.get("broken", []))


def test_every_vector_file_is_documented_once() -> None:
    on_disk = {p.stem for p in VECTORS.glob("*.json")}
    version_1, version_2 = set(_table(FORMAT_MD)), set(_table(FORMAT_2_MD))
    assert not version_1 & version_2, "a file documented in both FORMAT.md and FORMAT-2.md"
    assert on_disk == version_1 | version_2
