import json
from pathlib import Path

import pytest

from keysvc.errors import UnknownModel
from keysvc.models import GPT4_32K, ModelRule, ModelTable, ModelTableError


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini", "turbo"),
        ("gpt-4o-mini-2024-07-18", "turbo"),
        ("gpt-4o", "gpt4o"),
        ("gpt-4o-2024-08-06", "gpt4o"),
        ("chatgpt-4o-latest", "gpt4o"),
        ("gpt-4-turbo", "gpt4-turbo"),
        ("gpt-4-turbo-2024-04-09", "gpt4-turbo"),
        ("gpt-4-0125-preview", "gpt4-turbo"),
        ("gpt-4-1106-preview", "gpt4-turbo"),
        ("gpt-4-1106-vision-preview", "gpt4-turbo"),
        ("gpt-4-vision-preview", "gpt4-turbo"),
        ("gpt-4-32k", GPT4_32K),
        ("gpt-4-32k-0613", GPT4_32K),
        ("gpt-4", "gpt4"),
        ("gpt-4-0613", "gpt4"),
        ("gpt-3.5-turbo", "turbo"),
        ("gpt-3.5-turbo-instruct", "turbo"),
        ("text-embedding-ada-002", "turbo"),
        ("dall-e-3", "dall-e"),
        ("o1-mini", "o1-mini"),
        ("o1-preview", "o1"),
        ("o1", "o1"),
        ("gpt-4.1", "gpt41"),
        ("gpt-4.1-mini-2025-04-14", "gpt41-mini"),
        ("o3-mini", "o3-mini"),
        ("o4-mini", "o4-mini"),
        ("gpt-5", "gpt5"),
    ],
)
def test_built_in_table(model: str, family: str) -> None:
    assert ModelTable().family(model) == family


@pytest.mark.parametrize("model", ["some-future-model", "gpt4", "text-davinci-003", "Claude-3"])
def test_unknown_models_are_refused_naming_the_model(model: str) -> None:
    # The seed served every unknown name from gpt4: a typo got a GPT-4 key.
    with pytest.raises(UnknownModel) as raised:
        ModelTable().lookup(model)
    assert raised.value.code == "INVALID_ARGUMENT" and raised.value.reason == "UNKNOWN_MODEL"
    assert repr(model) in raised.value.message
    assert raised.value.metadata == {"field": "model", "model": model}


def test_the_operators_rule_serves_unknown_models_from_a_family() -> None:
    table = ModelTable(unknown="claude-haiku")
    info = table.lookup("some-future-model")
    assert (info.family, info.provider, info.embeddings) == ("claude-haiku", "anthropic", False)
    assert table.family("gpt-4o") == "gpt4o"  # known models keep their rows
    extra = ModelTable.with_extra_rules([ModelRule("^mine", "mine")], unknown="mine")
    assert extra.family("other") == "mine"


def test_the_operators_rule_must_name_a_family_of_the_table() -> None:
    with pytest.raises(ModelTableError, match="'gtp4'.*expected reject or one of"):
        ModelTable(unknown="gtp4")


def test_embeddings_models_are_flagged() -> None:
    table = ModelTable()
    assert table.lookup("text-embedding-ada-002").embeddings
    assert table.lookup("text-embedding-3-small").embeddings
    assert not table.lookup("gpt-3.5-turbo").embeddings


def test_unchecked_keys_get_every_family_of_their_provider_but_32k() -> None:
    table = ModelTable()
    defaults = table.default_key_families()
    assert GPT4_32K not in defaults
    assert {"turbo", "gpt4", "gpt4-turbo", "gpt4o", "dall-e", "o1"} <= defaults
    claude = {"claude-opus", "claude-sonnet", "claude-haiku", "claude"}
    assert defaults == set(table.families) - {GPT4_32K} - claude
    assert table.default_key_families("anthropic") == claude
    assert table.default_key_families("openai") == defaults


def test_every_family_belongs_to_one_provider() -> None:
    table = ModelTable()
    assert table.lookup("claude-3-5-sonnet-20241022").provider == "anthropic"
    assert table.lookup("gpt-4o").provider == "openai"
    assert table.provider_of("claude-haiku") == "anthropic" and table.provider_of("o1") == "openai"
    listed = ["claude-opus-4-1", "claude-3-haiku-20240307", "claude-next-9", "gpt-4o"]
    # Another provider's id is left out; an unknown one is the provider's listed default.
    assert table.listed_families(listed, "anthropic") == {"claude-opus", "claude-haiku", "claude"}
    assert table.listed_families(["gpt-4o", "whisper-1", "claude-2.1"]) == {"gpt4o", "turbo"}


def test_an_operator_row_keeps_its_familys_provider_or_names_one(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    rows = [
        {"pattern": "^claude-fable", "family": "claude-sonnet"},
        {"pattern": "^mistral", "family": "mistral"},
        {"pattern": "^claude-poem", "family": "claude-poem", "provider": "anthropic"},
    ]
    path.write_text(json.dumps(rows))
    table = ModelTable.from_file(path)
    assert table.lookup("claude-fable-5").provider == "anthropic"
    assert table.lookup("mistral-large").provider == "openai"
    assert table.lookup("claude-poem-1").family == "claude-poem"
    assert "claude-poem" in table.default_key_families("anthropic")
    path.write_text(json.dumps([{"pattern": "^x", "family": "x", "provider": "google"}]))
    with pytest.raises(ModelTableError, match="provider"):
        ModelTable.from_file(path)


def test_first_match_wins() -> None:
    table = ModelTable([ModelRule("^gpt-4", "a"), ModelRule("^gpt-4o", "b")])
    assert table.family("gpt-4o") == "a"


def test_operator_rules_come_first(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps([{"pattern": r"^gpt-4o-2099", "family": "gpt4o-next"}]))
    table = ModelTable.from_file(path)
    assert table.family("gpt-4o-2099-01-01") == "gpt4o-next"
    assert table.family("gpt-4o") == "gpt4o"
    assert "gpt4o-next" in table.default_key_families()


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"pattern": "x", "family": "y"}),
        json.dumps([{"pattern": "x"}]),
        json.dumps([{"pattern": "(", "family": "y"}]),
        json.dumps([{"pattern": "x", "family": ""}]),
        json.dumps([{"pattern": "x", "family": "y", "extra": 1}]),
    ],
)
def test_malformed_operator_table_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(ModelTableError):
        ModelTable.from_file(path)


def test_missing_operator_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelTableError, match="cannot read"):
        ModelTable.from_file(tmp_path / "absent.json")
