"""The README's Python proxy loop (examples/proxy_loop.py) runs against a live keysvc."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from keysvc_client import KeysvcClient

from .conftest import LiveServer, key_hash

EXAMPLE = Path(__file__).parents[1] / "examples" / "proxy_loop.py"
README = Path(__file__).parents[2] / "README.md"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proxy_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_example_as_it_is() -> None:
    example = EXAMPLE.read_text()
    assert len(example.splitlines()) <= 15
    assert f"```python\n{example}```" in README.read_text()


def test_proxy_loop_retries_a_429_on_another_key(server: LiveServer) -> None:
    calls: list[str] = []

    def upstream(secret: str) -> tuple[int, Mapping[str, str], bytes]:
        calls.append(secret)
        if len(calls) == 1:
            return 429, {"x-ratelimit-reset-requests": "3s"}, b"slow down"
        return 200, {"x-ratelimit-reset-requests": "20ms"}, b"answer"

    with KeysvcClient(server.target) as keys:
        assert _load().complete(keys, "gpt-4o", upstream) == b"answer"
        limited = {k.hash: k for k in keys.list()}[key_hash(calls[0])]
    assert len(calls) == 2 and calls[0] != calls[1]
    locked_for = limited.rate_limited_until.ToDatetime() - limited.rate_limited_at.ToDatetime()
    assert locked_for.total_seconds() >= 3  # the 429 locked the key for its reset time
