"""Where every benchmark's JSON goes, written the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
