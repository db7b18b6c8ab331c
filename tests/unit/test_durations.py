import pytest

from keysvc import durations
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


def test_equal_texts_give_one_float_object_and_the_cache_stays_bounded() -> None:
    # Every key keeps its last resets per family: equal header texts share one float.
    first = parse_go_duration("".join(["1", "7ms"]))
    assert first is not None and first is parse_go_duration("17ms")
    assert parse_go_duration("1.25s") == pytest.approx(1.25)
    for n in range(3 * durations._CACHE_SIZE):
        assert parse_go_duration(f"{n}ms") == pytest.approx(n / 1000)
    assert len(durations._cache) <= durations._CACHE_SIZE
    # Only durations are kept, never arbitrary caller text.
    assert parse_go_duration("not-a-duration") is None
    assert "not-a-duration" not in durations._cache
