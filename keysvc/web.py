"""The HTTP port: /metrics, the status page at /, /healthz and /readyz.

It is an aiohttp server on the same event loop as the gRPC server. A scrape and
a page view read a ``PoolSnapshot``, which ``PoolSnapshots`` takes without walking
the pool (a ``KeyCensus`` recounts only the keys that changed since the last one),
in slices of ~2 ms with the loop free between them; views that come within
``SNAPSHOT_MAX_AGE`` (5 s) of a snapshot's start, or while it is taken, share it
(and its rendering). The page shows counts and the top ``PAGE_KEYS`` keys of each
state's list, never the whole pool. So nothing here holds the loop for more than a
few milliseconds, whatever the pool's size; and views are served at most
``VIEWS_PER_SECOND`` a second, so clients reloading in a loop cannot take the loop
either.

aiohttp because prometheus_client ships an aiohttp handler for /metrics (content
negotiation, OpenMetrics, compression) and the status page needs more than
prometheus_client's own threaded server can serve; a hand-written HTTP server
would be ours to harden.

The page is plain server-rendered HTML that refreshes itself; every value is
escaped, and no secret is ever in it (it is built from ``KeyState`` rows).
"""

from __future__ import annotations

import asyncio
import gzip
import html
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from . import __version__
from .errors import StoreUnavailable
from .status import (
    COUNTED_STATES,
    FamilySummary,
    KeyCensus,
    KeyList,
    KeyState,
    PoolSnapshot,
    PoolSnapshots,
    SnapshotFeed,
    SnapshotSource,
    format_duration,
)

__all__ = [
    "HttpServer",
    "ViewPacer",
    "build_app",
    "page_snapshots",
    "render_status_page",
    "start_http",
]

#: Seconds between the status page's own reloads.
PAGE_REFRESH: Final = 10
#: Keys shown at the top of each state's list; the rest are counted, not listed
#: (``keysvc status`` lists every key). Rendering 3 x 50 rows is ~1 ms.
PAGE_KEYS: Final = 50

HealthCheck = Callable[[], bool]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_STYLE: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
p.meta { color: #666; margin: 0; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
[id^="keys-"] td:nth-child(-n+3), [id^="keys-"] th:nth-child(-n+3) { text-align: left; }
td.state-active { color: #186a1f; } td.state-locked { color: #8a5a00; }
td.state-disabled, td.state-revoked, td.state-over_quota { color: #a31515; }
code { font: 13px ui-monospace, monospace; }
"""


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (named, without q=0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            quality = params.replace(" ", "").lower()
            if not quality.startswith("q="):
                return True
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
    return False


def _key_rows(keys: Sequence[KeyState]) -> str:
    return "\n".join(
        "<tr>"
        f"<td><code>{_e(k.hash)}</code></td>"
        f"<td>{_e(k.provider)}</td>"
        f'<td class="state-{_e(k.state)}">{_e(k.state)}</td>'
        f"<td>{'yes' if k.is_trial else 'no'}</td>"
        f"<td>{k.prompt_count}</td>"
        f"<td>{sum(k.token_usage.values())}</td>"
        f"<td>{len(k.families)}</td>"
        "</tr>"
        for k in keys
    )


def _key_list(listed: KeyList) -> str:
    """One state's count and the top of its list, as List returns it."""
    name = listed.state
    if not listed.keys:
        return f'<h3 id="{_e(name)}">{_e(name)}: {listed.count}</h3>'
    shown = (
        ""
        if len(listed.keys) == listed.count
        else f'<p class="meta">The first {len(listed.keys)} of {listed.count}, in the order'
        f" <code>List</code> with state {_e(name.upper())} pages through them all.</p>"
    )
    return f"""<h3 id="{_e(name)}">{_e(name)}: {listed.count}</h3>
{shown}
<table id="keys-{_e(name)}">
<thead><tr><th>key</th><th>provider</th><th>state</th><th>trial</th><th>prompts</th>
<th>tokens</th><th>families</th></tr></thead>
<tbody>
{_key_rows(listed.keys)}
</tbody>
</table>"""


def render_status_page(
    summaries: Sequence[FamilySummary],
    lists: Sequence[KeyList],
    *,
    now: float,
    ready: bool,
    total_keys: int,
) -> str:
    """The status page: the families table, then each state's count and list top."""
    state_headers = "".join(f"<th>{_e(s.replace('_', ' '))}</th>" for s in COUNTED_STATES)
    family_rows = "\n".join(
        "<tr>"
        f'<td data-family="{_e(s.family)}">{_e(s.family)}</td>'
        + "".join(f'<td data-state="{_e(st)}">{s.counts[st]}</td>' for st in COUNTED_STATES)
        + f"<td>{_e(format_duration(s.lockout))}</td><td>{s.tokens}</td></tr>"
        for s in summaries
    )
    key_lists = "\n".join(_key_list(listed) for listed in lists)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    readiness = "ready" if ready else "not ready"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{PAGE_REFRESH}">
<title>keysvc status</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>keysvc status</h1>
<p class="meta">keysvc {_e(__version__)} &middot; {_e(readiness)} &middot; {total_keys} keys
&middot; {_e(stamp)} &middot; refreshes every {PAGE_REFRESH} s &middot;
<a href="/metrics">metrics</a></p>
<h2>Model families</h2>
<table id="families">
<thead><tr><th>family</th>{state_headers}<th>lockout</th><th>tokens used</th></tr></thead>
<tbody>
{family_rows}
</tbody>
</table>
<h2>Keys by state</h2>
<p class="meta">Revoked and over-quota keys are disabled keys; <code>keysvc status</code>
lists every key.</p>
{key_lists}
</body>
</html>
"""


#: Seconds a snapshot serves the views that come after it was started. The page
#: reloads every 10 s and Prometheus scrapes every 15 s or more, so 5 s is current
#: enough, and views coming in a loop share one snapshot and its rendering.
SNAPSHOT_MAX_AGE: Final = 5.0


#: Page views and scrapes served a second at most, however many clients ask: an
#: operator's browser reloads every 10 s and Prometheus scrapes every 15 s or more,
#: while two clients reloading in a loop made ~1,500 requests a second, and their
#: HTTP exchanges alone (with the clients' own CPU on a 2-core machine) still
#: doubled Get's p99 once the snapshots were cheap. Views beyond it wait their turn.
VIEWS_PER_SECOND: Final = 50
#: Longest a view waits for its turn; one that would wait longer is answered 429
#: at once, with Retry-After (so a flood cannot queue unbounded work).
VIEW_MAX_WAIT: Final = 2.0


class ViewPacer:
    """Spaces the views of the HTTP port at least ``1 / per_second`` apart, in the
    order they come. ``timer`` and ``sleep`` are the loop's (tests pass their own)."""

    def __init__(
        self,
        per_second: float = VIEWS_PER_SECOND,
        *,
        max_wait: float = VIEW_MAX_WAIT,
        timer: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._interval = 1.0 / per_second
        self._max_wait = max_wait
        self._timer = timer
        self._sleep = sleep
        self._next = 0.0

    async def turn(self) -> bool:
        """Waits for this view's turn; False (at once) when that would take longer
        than ``max_wait``."""
        now = self._timer()
        slot = max(now, self._next)
        if slot - now > self._max_wait:
            return False
        self._next = slot + self._interval
        if slot > now:
            await self._sleep(slot - now)
        return True


def _too_many() -> web.Response:
    return web.Response(
        status=429,
        text="too many views of the status page and /metrics; retry later\n",
        headers={"Retry-After": "1", "Cache-Control": "no-store"},
    )


def page_snapshots(pool: SnapshotSource, census: KeyCensus | None = None) -> PoolSnapshots:
    """The snapshots the HTTP port reads, counted by ``census`` (which should watch
    the pool's store: without one, every snapshot recounts every key), with the top
    ``PAGE_KEYS`` keys of each state's list."""
    return PoolSnapshots(pool, census, listed=PAGE_KEYS, max_age=SNAPSHOT_MAX_AGE)


def build_app(
    pool: SnapshotSource | None,
    registry: CollectorRegistry,
    *,
    live: HealthCheck,
    ready: HealthCheck,
    snapshots: SnapshotFeed | None = None,
    pacer: ViewPacer | None = None,
) -> web.Application:
    """The routes of the HTTP port.

    Args:
        pool: read for the status page when ``snapshots`` is not given.
        registry: exposed at /metrics.
        live: whether the process is serving (gRPC health of "").
        ready: whether KeyService is serving (gRPC health of keysvc.v1.KeyService).
        snapshots: of the pool, made fresh before each page view and scrape (the
            registry's pool gauges should read them); made from ``pool`` if not given.
            A shared pool's (``TakenSnapshots``) may fail with ``StoreUnavailable``:
            the page answers 503, /metrics the replica's own metrics and the last
            pool gauges.
        pacer: spaces page views and scrapes (``VIEWS_PER_SECOND``); the probes
            are never held.
    """
    if snapshots is None:
        if pool is None:
            raise ValueError("build_app needs a pool or its snapshots")
        snapshots = page_snapshots(pool)
    pacer = pacer if pacer is not None else ViewPacer()
    exposition = make_aiohttp_handler(registry, disable_compression=True)
    # What was rendered from the latest snapshot, by what else it depends on: views
    # that share a snapshot share the rendering too, so a client reloading in a loop
    # costs the loop little more than the HTTP exchange.
    pages: dict[tuple[PoolSnapshot, bool], bytes] = {}
    expositions: dict[
        tuple[PoolSnapshot | None, str, str], tuple[int, dict[str, str], bytes, bytes]
    ] = {}

    async def metrics(request: web.Request) -> web.Response:
        if not await pacer.turn():
            return _too_many()
        try:
            snapshot: PoolSnapshot | None = await snapshots.fresh()
        except StoreUnavailable:
            snapshot = None  # the replica's own metrics still; the pool gauges as last read
        key = (snapshot, request.headers.get("Accept", ""), request.query_string)
        baked = expositions.get(key) if snapshot is not None else None
        if baked is None:
            response = await exposition(request)
            assert isinstance(response, web.Response) and isinstance(response.body, bytes)
            headers = {"Content-Type": response.headers["Content-Type"], "Vary": "Accept-Encoding"}
            # Compressed once per snapshot, not per scrape (aiohttp's own compression
            # runs per response, in a thread that competes with the loop for the GIL).
            baked = (response.status, headers, response.body, gzip.compress(response.body, 6))
            expositions.clear()
            expositions[key] = baked
        status, headers, body, gzipped = baked
        if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
            headers, body = {**headers, "Content-Encoding": "gzip"}, gzipped
        return web.Response(status=status, headers=headers, body=body)

    async def status_page(request: web.Request) -> web.Response:
        if not await pacer.turn():
            return _too_many()
        try:
            snapshot = await snapshots.fresh()
        except StoreUnavailable as exc:
            return web.Response(
                status=503,
                text=f"the shared pool is not answering: {exc.problem}\n",
                headers={"Cache-Control": "no-store"},
            )
        is_ready = ready()
        body = pages.get((snapshot, is_ready))
        if body is None:
            body = render_status_page(
                # Families the pool knows but no key has and no usage names stay off the page.
                [s for s in snapshot.summaries if s.total or s.tokens],
                snapshot.lists,
                now=snapshot.taken_at,
                ready=is_ready,
                total_keys=snapshot.total_keys,
            ).encode()
            pages.clear()
            pages[(snapshot, is_ready)] = body
        return web.Response(
            body=body,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    def probe(check: HealthCheck) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            if check():
                return web.Response(text="ok\n")
            return web.Response(status=503, text="not serving\n")

        return handler

    app = web.Application()
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", probe(live))
    app.router.add_get("/readyz", probe(ready))
    return app


@dataclass(slots=True)
class HttpServer:
    """A started HTTP port; ``port`` is the bound one (useful with port 0)."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(app: web.Application, *, host: str, port: int) -> HttpServer:
    """Serves ``app`` on ``host:port`` (0 picks a free port).

    Raises:
        OSError: the address cannot be bound.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
        break
    return HttpServer(runner=runner, port=bound)
