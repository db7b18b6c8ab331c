"""The Redis client keysvc is installed with."""

from __future__ import annotations

from redis import utils


def test_replies_are_parsed_by_hiredis() -> None:
    # A Get's reply (the key's record and states, ~45 lines of RESP) parsed by redis-py's
    # Python parser was about a third of the server's CPU per Get on Redis.
    assert utils.HIREDIS_AVAILABLE
