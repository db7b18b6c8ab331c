"""KEYSVC_UNKNOWN_MODELS / --unknown-models: what a model no rule matches gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keysvc import cli
from keysvc.clock import ManualClock
from keysvc.config import ConfigError, Settings, settings_from
from keysvc.errors import UnknownModel
from keysvc.models import ModelTableError
from keysvc.server import build_pool


def _settings(argv: list[str], env: dict[str, str]) -> Settings:
    args = cli._parser().parse_args(["serve", *argv])
    return settings_from(args, env)


def test_unknown_models_are_rejected_by_default() -> None:
    settings = _settings([], {"OPENAI_KEY": "sk-o"})
    assert settings.unknown_models == "reject"
    pool = build_pool(settings, ManualClock())
    with pytest.raises(UnknownModel, match="unknown model 'davinci'"):
        pool.get("davinci")


def test_the_env_var_names_a_family_and_the_flag_overrides_it() -> None:
    env = {"OPENAI_KEY": "sk-o", "ANTHROPIC_KEY": "sk-ant-a", "KEYSVC_UNKNOWN_MODELS": "gpt4"}
    settings = _settings([], env)
    assert settings.unknown_models == "gpt4"
    pool = build_pool(settings, ManualClock())
    assert pool.get("davinci").service == "openai"  # the seed's rule
    flagged = _settings(["--unknown-models", "claude-haiku"], env)
    assert build_pool(flagged, ManualClock()).get("davinci").service == "anthropic"
    assert _settings(["--unknown-models", "REJECT"], env).unknown_models == "reject"


@pytest.mark.parametrize("value", ["gpt4,turbo", "no such", "-x"])
def test_a_value_that_is_neither_reject_nor_a_family_name_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="KEYSVC_UNKNOWN_MODELS"):
        _settings([], {"KEYSVC_UNKNOWN_MODELS": value})


def test_a_family_no_model_maps_to_is_refused_at_start(tmp_path: Path) -> None:
    settings = _settings([], {"KEYSVC_UNKNOWN_MODELS": "gtp4"})
    with pytest.raises(ModelTableError, match="'gtp4'"):
        build_pool(settings, ManualClock())
    # A family of the operator's own rows counts.
    rows = tmp_path / "families.json"
    rows.write_text(json.dumps([{"pattern": "^mine-", "family": "mine"}]), encoding="utf-8")
    env = {"OPENAI_KEY": "sk-o", "KEYSVC_UNKNOWN_MODELS": "mine"}
    settings = _settings(["--model-families-file", str(rows)], env)
    assert build_pool(settings, ManualClock()).get("anything").hash


def test_serve_refuses_a_family_no_model_maps_to(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--unknown-models", "gtp4", "--port", "0"])
    assert code != 0
    assert "KEYSVC_UNKNOWN_MODELS names family 'gtp4'" in capsys.readouterr().err
