"""The checked-in generated code must match what protos/ generates now."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_python_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
    )
    fresh = tmp_path / "keysvc" / "v1"
    checked_in = ROOT / "keysvc" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names, "the generator produced nothing"
    match, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated code: {mismatch + errors}; run `make proto` and commit the result"
    )
