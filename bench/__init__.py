"""Benchmarks: each module's docstring gives its command; results are small JSON files under bench/results/."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, record: dict) -> None:
    """Writes a benchmark's results as indented JSON (the folder made if missing) and says where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
