"""The top-level README shows the same client examples as clients/README.md.

The client suites check clients/README.md against the example code they run;
this keeps the top-level README's copies from drifting away from those.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_readme_shows_each_client_example() -> None:
    clients = (ROOT / "clients" / "README.md").read_text()
    top = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(python|ts|go)\n(.*?)```", clients, flags=re.S)
    examples = {
        lang: body
        for lang, body in blocks
        if "func complete" in body or "def complete" in body or "function complete" in body
    }
    assert set(examples) == {"python", "ts", "go"}
    for lang, body in examples.items():
        assert f"```{lang}\n{body}```" in top, f"README.md lacks the {lang} client example"


def test_readme_lists_every_setting() -> None:
    top = (ROOT / "README.md").read_text()
    config = (ROOT / "keysvc" / "config.py").read_text()
    env_vars = set(re.findall(r'_from_env\(env, "([A-Z_]+)"', config))
    env_vars |= set(re.findall(r'_tokens\(env, "([A-Z_]+)"', config))
    assert env_vars, "no settings found in config.py"
    missing = sorted(v for v in env_vars if f"`{v}`" not in top)
    assert not missing, f"README.md does not document {missing}"
    flags = set(re.findall(r'"(--[a-z-]+)"', config))
    missing_flags = sorted(f for f in flags if f"`{f}`" not in top and f"`{f} " not in top)
    assert not missing_flags, f"README.md does not document {missing_flags}"
