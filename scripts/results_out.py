"""Where a script's JSON results go: the --out path when given, and $OUT/<name> when $OUT is set (the folder a
lent GPU machine sends back; scripts/gpu_session.sh and docs/benchmarks.md "Reproduce")."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(result: dict, out: str | os.PathLike | None, name: str) -> list[Path]:
    """Write `result` as indented JSON to each destination (parent folders created); returns the paths."""
    paths = [Path(p) for p in (out, os.environ.get("OUT") and Path(os.environ["OUT"]) / name) if p]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return paths
