"""ANTHROPIC_KEY, ANTHROPIC_BASE_URL and keys of both providers in one configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from keysvc import cli
from keysvc.clock import ManualClock
from keysvc.config import DEFAULT_ANTHROPIC_BASE_URL, ConfigError, Settings, settings_from
from keysvc.reload import read_keys_file
from keysvc.server import build_pool


def _settings(argv: list[str], env: dict[str, str]) -> Settings:
    args = cli._parser().parse_args(["serve", *argv])
    return settings_from(args, env)


def test_anthropic_keys_and_base_url_from_env_and_flag() -> None:
    settings = _settings(
        [], {"ANTHROPIC_KEY": " sk-ant-a , sk-ant-b,sk-ant-a", "OPENAI_KEY": "sk-o"}
    )
    assert settings.anthropic_keys == ("sk-ant-a", "sk-ant-b")
    assert settings.openai_keys == ("sk-o",)
    assert settings.anthropic_base_url == DEFAULT_ANTHROPIC_BASE_URL
    assert "sk-ant-a" not in repr(settings)
    env = {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9/v1"}
    assert _settings([], env).anthropic_base_url == "http://127.0.0.1:9/v1"
    flagged = _settings(["--anthropic-base-url", "http://127.0.0.1:8/v1"], env)
    assert flagged.anthropic_base_url == "http://127.0.0.1:8/v1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ANTHROPIC_KEY": "sk-ant-ok,sk-secret-openai"},
            "ANTHROPIC_KEY: key 2 is not an anthropic",
        ),
        ({"OPENAI_KEY": "sk-ant-secret-x"}, "OPENAI_KEY: key 1 is not an openai"),
    ],
)
def test_a_key_in_the_other_providers_variable_is_refused_without_echo(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _settings([], env)
    assert "secret" not in str(caught.value)


def test_a_keys_file_holds_both_kinds_told_apart_by_prefix(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# mixed\nsk-proj-one\nsk-ant-api03-two\n")
    settings = Settings(anthropic_keys=("sk-ant-three",), openai_keys=("sk-four",))
    pool = build_pool(settings, ManualClock(1000.0), extra_keys=read_keys_file(path))
    services = {key.secret: (key.service, key.hash[:4]) for key in pool.keys()}
    assert services == {
        "sk-four": ("openai", "oai-"),
        "sk-ant-three": ("anthropic", "ant-"),
        "sk-proj-one": ("openai", "oai-"),
        "sk-ant-api03-two": ("anthropic", "ant-"),
    }
