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
from keysvc.server import SERVICE_NAME, KeysvcServer, create_server
from keysvc.web import HttpServer, build_app, start_http


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
) -> AsyncIterator[Observed]:
    """A keysvc server and its HTTP port, both on free loopback ports; stopped on exit.

    ``pool`` must have been built with ``metrics`` as its observer.
    """
    server = create_server(
        pool, host="127.0.0.1", port=0, metrics=metrics, interceptors=interceptors
    )
    metrics.watch_pool(pool)
    app = build_app(
        pool,
        metrics.registry,
        live=server.serving,
        ready=lambda: server.serving(SERVICE_NAME),
    )
    http = await start_http(app, host="127.0.0.1", port=0)
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
