"""List pages at 100k keys: the event-loop time of one page, against the old single reply.

In process: the KeyService servicer's List (building the reply) plus the
reply's serialization, each page timed on its own (CPU time of the thread, so
other work on the shared machine does not count; garbage collection does),
paging through the whole pool with the server's default page size; the pool is out of
the collector's generations (``gc.freeze``) as in ``keysvc serve``. 2,000 keys have been handed out
(locked for a while) and 100 disabled, so the state filters have something
to find. "one reply" is what List did before paging: every key in one message.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from keysvc.clock import ManualClock
from keysvc.keys import DisableReason
from keysvc.listing import DEFAULT_MAX_PAGE_SIZE
from keysvc.models import ModelTable
from keysvc.pool import KeyPool
from keysvc.service import KeyService, key_to_proto
from keysvc.v1 import keysvc_pb2 as pb

from .pool_scale import secrets
from .report import Section, Target, median, percentile, table

__all__ = ["run"]

TARGET_MS = 10.0
FILTERS = (
    ("all", pb.KEY_STATE_UNSPECIFIED),
    ("active", pb.KEY_STATE_ACTIVE),
    ("locked", pb.KEY_STATE_LOCKED),
    ("disabled", pb.KEY_STATE_DISABLED),
)


async def _page_times(service: KeyService, state: pb.KeyState.ValueType) -> tuple[list[float], int]:
    """Seconds per page (build + serialize) over every page, and the keys listed."""
    times: list[float] = []
    listed = 0
    token = ""
    context: Any = None
    while True:
        start = time.thread_time()
        reply = await service.List(pb.ListRequest(page_token=token, state=state), context)
        reply.SerializeToString()
        times.append(time.thread_time() - start)
        listed += len(reply.keys)
        token = reply.next_page_token
        if not token:
            return times, listed


def run(*, smoke: bool = False) -> Section:
    size = 10_000 if smoke else 100_000
    clock = ManualClock()
    pool = KeyPool.from_secrets(secrets(size), models=ModelTable(), clock=clock)
    for _ in range(min(2_000, size // 10)):
        pool.get("gpt-4o")
    for key in pool.keys()[:: max(1, size // 100)]:
        pool.disable(key.hash, DisableReason.MANUAL)
    service = KeyService(pool)
    # As `keysvc serve` does once its keys are loaded (server.py): the pool out of the
    # collector's generations. Without it a full collection during a page walked every
    # object alive in this process, the benchmarks run before included.
    gc.collect()
    gc.freeze()
    try:
        return _measure(service, pool, size)
    finally:
        gc.unfreeze()


def _measure(service: KeyService, pool: KeyPool, size: int) -> Section:
    rows = []
    figures: dict[str, float] = {}
    for name, state in FILTERS:
        times, listed = asyncio.run(_page_times(service, state))
        figures[f"page_median_ms_{name}"] = median(times) * 1e3
        figures[f"page_p90_ms_{name}"] = percentile(times, 0.9) * 1e3
        figures[f"page_max_ms_{name}"] = max(times) * 1e3
        figures[f"keys_{name}"] = listed
        rows.append(
            (
                name,
                f"{listed:,}",
                f"{len(times):,}",
                f"{median(times) * 1e3:.2f}",
                f"{percentile(times, 0.9) * 1e3:.2f}",
                f"{max(times) * 1e3:.2f}",
            )
        )
    start = time.thread_time()
    whole = pb.ListResponse(keys=[key_to_proto(key) for key in pool.keys()]).SerializeToString()
    figures["one_reply_ms"] = (time.thread_time() - start) * 1e3
    figures["one_reply_bytes"] = len(whole)
    body = [
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "",
        f"{size:,} keys, default page size {DEFAULT_MAX_PAGE_SIZE}.",
        "",
        table(("state", "keys listed", "pages", "median ms", "p90 ms", "max ms"), rows),
        "",
        f"One reply of every key (List before paging): {figures['one_reply_ms']:.0f} ms, "
        f"{len(whole) / 1e6:.1f} MB (gRPC's default receive limit is 4 MiB).",
    ]
    worst = max(figures[f"page_p90_ms_{name}"] for name, _ in FILTERS)
    targets = [
        Target(
            f"List page p90 at {size:,} keys (worst state filter)",
            f"{worst:.2f} ms",
            f"≤ {TARGET_MS:.0f} ms",
            worst <= TARGET_MS,
        ),
        Target(
            "List page max (any filter)",
            f"{max(figures[f'page_max_ms_{name}'] for name, _ in FILTERS):.2f} ms",
            "shown",
            True,
            informational=True,
        ),
    ]
    return Section("List pages at 100k keys", "\n".join(body), targets, figures)
