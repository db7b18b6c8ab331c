"""The checked-in Go and TypeScript code is what `make proto` makes from protos/ today."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = (Path("clients/go/keysvcv1"), Path("clients/node/src/gen"))


def _files(base: Path) -> set[Path]:
    return {p.relative_to(base) for p in base.rglob("*") if p.is_file()}


def test_generated_client_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen_clients.sh"), str(tmp_path)], check=True, env=env)
    for folder in GENERATED:
        fresh, checked_in = tmp_path / folder, ROOT / folder
        assert _files(fresh), f"nothing was generated into {folder}"
        assert _files(fresh) == _files(checked_in), f"{folder}: files differ; run `make proto`"
        for name in _files(fresh):
            assert filecmp.cmp(fresh / name, checked_in / name, shallow=False), (
                f"{folder / name} is stale; run `make proto`"
            )
