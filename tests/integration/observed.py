"""Helpers for observability tests: a server with metrics and its HTTP port, and
a reader for the status page's tables."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

import aiohttp
import grpc

from keysvc.metrics import Metrics
from keysvc.pool import KeyPool
from keysvc.server import KeysvcServer, create_server, start_http_port
from keysvc.state import SqliteStateStore
from keysvc.v1 import keysvc_pb2 as pb
from keysvc.web import HttpServer, ViewPacer


@dataclass
class Observed:
    server: KeysvcServer
    http: HttpServer
    metrics: Metrics

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"


@contextlib.asynccontextmanager
async def observed_server(
    pool: KeyPool,
    metrics: Metrics,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    start: bool = True,
    state: SqliteStateStore | None = None,
    pacer: ViewPacer | None = None,
) -> AsyncIterator[Observed]:
    """A keysvc server and its HTTP port, both on free loopback ports; stopped on exit.

    ``pool`` must have been built with ``metrics`` as its observer.
    """
    server = create_server(
        pool, host="127.0.0.1", port=0, metrics=metrics, interceptors=interceptors, state=state
    )
    http = await start_http_port(server, pool, metrics, host="127.0.0.1", port=0, pacer=pacer)
    if start:
        await server.start()
    try:
        yield Observed(server=server, http=http, metrics=metrics)
    finally:
        await server.shutdown(grace=0)
        await http.stop()


async def fetch(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.content_type, await response.text()


class _TableReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._table is not None and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def page_tables(html: str) -> dict[str, list[dict[str, str]]]:
    """Each table of the page by id, as rows keyed by the header cells."""
    reader = _TableReader()
    reader.feed(html)
    result: dict[str, list[dict[str, str]]] = {}
    for table_id, rows in reader.tables.items():
        header, *body = rows
        result[table_id] = [dict(zip(header, row, strict=True)) for row in body]
    return result


def expected_state(key: pb.Key, now: float) -> str:
    if key.is_revoked:
        return "revoked"
    if key.is_over_quota:
        return "over_quota"
    if key.is_disabled:
        return "disabled"
    until = key.rate_limited_until.ToNanoseconds() / 1e9
    return "locked" if now < until else "active"


def check_page_against_api(html: str, listing: pb.ListResponse, now: float) -> None:
    """The page's key table has exactly the API's keys and states, and its family table
    the counts and token sums those keys give."""
    tables = page_tables(html)
    # A small pool: each state's list shows all of its keys, in List's order.
    lists = {state: tables.get(f"keys-{state}", []) for state in ("active", "locked", "disabled")}
    page_keys = {row["key"]: row for rows in lists.values() for row in rows}
    assert set(page_keys) == {k.hash for k in listing.keys}
    order = [k.hash for k in listing.keys]
    for state, rows in lists.items():
        hashes = [row["key"] for row in rows]
        assert hashes == sorted(hashes, key=order.index), state
        for row in rows:
            listed_as = "disabled" if row["state"] in ("revoked", "over_quota") else row["state"]
            assert listed_as == state, row
    for key in listing.keys:
        row = page_keys[key.hash]
        assert row["state"] == expected_state(key, now), key.hash
        assert row["prompts"] == str(key.prompt_count)
        assert row["tokens"] == str(sum(key.token_usage.values()))
        assert row["trial"] == ("yes" if key.is_trial else "no")
    families = {row["family"]: row for row in tables["families"]}
    assert set(families) == {f for k in listing.keys for f in k.model_families}
    for family, row in families.items():
        members = [k for k in listing.keys if family in k.model_families]
        states = [expected_state(k, now) for k in members]
        assert row["active"] == str(states.count("active")), family
        assert row["locked"] == str(states.count("locked")), family
        assert row["disabled"] == str(sum(k.is_disabled for k in members)), family
        assert row["revoked"] == str(states.count("revoked")), family
        assert row["tokens used"] == str(sum(k.token_usage.get(family, 0) for k in listing.keys))
