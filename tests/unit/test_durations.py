import pytest

from keysvc.durations import parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.020),
        ("21.0032s", 21.0032),
        ("1m30s", 90.0),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("1s500ms", 1.5),
        ("1.5m", 90.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("250us", 0.000250),
        ("250µs", 0.000250),
        ("7ns", 7e-9),
        (".5s", 0.5),
        ("2h", 7200.0),
        (" 3s ", 3.0),
    ],
)
def test_parses_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "garbage", "10", "s", "1x", "-1s", "1s 2ms", "1..5s", "ms", "1e3s", "5sec"]
)
def test_rejects_what_is_not_a_duration(text: str) -> None:
    assert parse_go_duration(text) is None
