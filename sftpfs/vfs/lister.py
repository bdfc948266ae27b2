"""Directory listings: when to ask the server, and what to ask ahead of time.

* Coalescing: one READDIR run per directory at a time; others wait for it.
* Stale-while-revalidate, at a remount: a listing loaded from disk (no older
  than `max_stale`) is served at once while a background relisting checks
  it; changes found are reported through `on_change` (the fs layer
  invalidates the kernel's entries). Once a directory has been listed in
  this mount, its TTL is a strict bound: an expired listing is fetched again
  before it answers.
* Walk prefetch: a listing queues its subdirectories for background listing,
  a few at a time, while a walker (find, rsync, a file manager) keeps asking
  for directories in the foreground. A tree walk then costs about depth ×
  round trip, not directories × round trip. Prefetch never takes a request
  slot a foreground listing is waiting for: it has its own small limit.
* Lookup walks: rsync's generator does not list the destination, it stats
  each name it might send. Lookups in a directory we have no listing of go to
  the server one by one (1,000 files at 40 ms: 44 s); from the second, the
  directory is listed in the background and answers the rest, and the walk
  prefetch lists its subdirectories ahead of the program.
* Warm-up: at mount the root is listed, in the background: what comes first
  after a mount (ls, a file manager, find, rsync) starts there. Nothing below
  it is listed until a program walks: a 1 s walk at mount did not make a cold
  find at 40 ms faster (it starts at once and drives its own walk), and on a
  fast link it cost a file read right after the mount 50 ms.
* Persistence: changed listings are written to the metastore every few
  seconds and at unmount.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from ..remote import protocol as p
from .meta import MetaCache, join
from .metastore import MetaStore, encode_entries

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 2.0
WALKER_IDLE = 5.0  # seconds without foreground listings after which prefetch pauses
LOOKUPS_BEFORE_LISTING = 2  # lookups of one unlisted directory's names sent to the server
UNLISTABLE_FOR = 60.0  # seconds a directory whose listing was refused is not asked again

ListFn = Callable[[bytes], Awaitable[list[tuple[bytes, p.Attrs]]]]
ChangeFn = Callable[[bytes, list[bytes]], None]
SettleFn = Callable[[bytes], Awaitable[None]]


class Lister:
    def __init__(self, list_remote: ListFn, meta: MetaCache, store: MetaStore | None, *,
                 max_stale: float, prefetch: int = 32, prefetch_queue: int = 2000,
                 revalidate: int = 8, before_listing: SettleFn | None = None,
                 unsettled: Callable[[bytes], bool] | None = None) -> None:
        self._list_remote = list_remote
        # Write-back: our queued changes that move `path` must reach the server before
        # it is listed there; background listings skip such paths instead of waiting.
        self._before_listing = before_listing
        self._unsettled = unsettled or (lambda path: False)
        self.meta = meta
        self.store = store
        self.max_stale = max_stale
        self.on_change: ChangeFn = lambda path, names: None
        self._inflight: dict[bytes, trio.Event] = {}
        self._loaded: set[bytes] = set()
        self._unchecked: set[bytes] = set()  # loaded from disk, not yet relisted
        self._prefetch_workers = prefetch
        self._queue: deque[bytes] = deque()
        self._queued: set[bytes] = set()
        self._queue_max = prefetch_queue
        self._wake = trio.Event()
        self._revalidating: set[bytes] = set()
        self._revalidate_limit = trio.Semaphore(revalidate)
        self._last_foreground = -1e9
        self._lookups: dict[bytes, int] = {}  # unlisted directory -> lookups sent to the server
        self._refused: dict[bytes, float] = {}  # directory -> when its listing was refused
        self._nursery: trio.Nursery | None = None
        self.stats = {"listed": 0, "prefetched": 0, "revalidated": 0, "served_stale": 0}

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                for _ in range(self._prefetch_workers):
                    n.start_soon(self._prefetch_worker)
                if self.store is not None:
                    n.start_soon(self._flusher)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()

    # ---- foreground ---------------------------------------------------------------

    async def listdir(self, path: bytes) -> list[tuple[bytes, p.Attrs]]:
        """Entries of a directory: fresh, or stale-but-bounded while revalidated."""
        starting = not self._walker_active()
        self._last_foreground = trio.current_time()
        fresh = self.meta.listing(path)
        if fresh is not None:
            if starting and self._prefetch_workers:
                # A walk starts from a listing we have (the root, listed at mount):
                # its subdirectories were not queued then, with nobody walking.
                self._queue_subdirs(path, fresh)
            return fresh
        stale = await self.stale_listing(path)
        if stale is not None:
            return stale
        return await self.fetch(path)

    def looked_up(self, parent: bytes) -> None:
        """A lookup in `parent`, whose listing we do not have, went to the server."""
        if not self._prefetch_workers:
            return
        self._last_foreground = trio.current_time()  # someone is walking, by lookups
        n = self._lookups.get(parent, 0) + 1
        if n < LOOKUPS_BEFORE_LISTING:
            if len(self._lookups) > 10_000:
                self._lookups.clear()
            self._lookups[parent] = n
            return
        self._lookups.pop(parent, None)
        if parent in self._inflight or parent in self._queued or self.meta.listed(parent):
            return
        refused = self._refused.get(parent)
        if refused is not None and trio.current_time() - refused < UNLISTABLE_FOR:
            return  # e.g. mode 0711: names can be looked up, not listed
        self._queue.appendleft(parent)  # before the walk's guesses: someone is waiting
        self._queued.add(parent)
        self._wake.set()

    async def stale_listing(self, path: bytes) -> list[tuple[bytes, p.Attrs]] | None:
        """A listing from disk within `max_stale`, with its revalidation started."""
        if self.max_stale <= self.meta.ttl:
            return None
        await self.load_stored(path)
        if path not in self._unchecked:
            return None
        stale = self.meta.listing(path, max_age=self.max_stale)
        if stale is not None:
            self.stats["served_stale"] += 1
            self.revalidate_soon(path)
        return stale

    async def usable(self, parent: bytes) -> bool:
        """Whether `parent`'s listing may answer lookups (fresh, or stale and revalidating)."""
        if self.meta.listed(parent):
            return True
        return await self.stale_listing(parent) is not None

    async def fetch(self, path: bytes, *, background: bool = False) -> list[tuple[bytes, p.Attrs]]:
        """List `path` on the server now (or join a listing already running).

        In the `background`, a path our queued changes move is skipped (empty
        result): waiting for them would hurry uploads nobody waits for."""
        ev = self._inflight.get(path)
        if ev is not None:
            await ev.wait()
            got = self.meta.listing(path, max_age=float("inf"))
            if got is not None:
                return got
        ev = self._inflight[path] = trio.Event()
        try:
            for _attempt in range(3):
                if background and self._unsettled(path):
                    return []
                if self._before_listing is not None:
                    await self._before_listing(path)
                since = self.meta.mark()
                entries = await self._list_remote(path)
                self.stats["listed"] += 1
                changed = self.meta.put_listing(path, entries, since)
                self._unchecked.discard(path)
                if changed:
                    self.on_change(path, changed)
                self._queue_subdirs(path, entries)
                listing = self.meta.listing(path)
                if listing is not None:
                    return listing
                # Entries changed here while the listing was on its way: it was
                # not stored. Ask again; a busy directory gets our best overlay.
            return self.meta.overlay(path, entries)
        finally:
            del self._inflight[path]
            ev.set()

    async def load_stored(self, path: bytes) -> None:
        """Bring `path`'s listing from disk into memory, once, as a stale one."""
        if self.store is None or path in self._loaded or self.meta.listing_time(path) is not None:
            return
        self._loaded.add(path)
        got = await trio.to_thread.run_sync(self.store.load, path)
        if got is None or self.meta.listing_time(path) is not None:
            return
        entries, listed = got
        # Never fresh: it may be from before a crash, or older than it says.
        stale_at = min(listed, self.meta.clock() - self.meta.ttl - 1)
        self.meta.put_listing(path, entries, fetched=stale_at)
        self._unchecked.add(path)

    # ---- background ---------------------------------------------------------------

    def warm_up(self, root: bytes = b"") -> None:
        """List `root` now, in the background (off with prefetch=0)."""
        if not self._prefetch_workers or self._nursery is None:
            return
        self._nursery.start_soon(self._warm_root, root)

    async def _warm_root(self, root: bytes) -> None:
        try:
            if await self.stale_listing(root) is None:  # a remount revalidates instead
                await self.fetch(root)
        except OSError as e:
            log.info("listing the root at mount failed: %s", e)

    def revalidate_soon(self, path: bytes) -> None:
        if path in self._revalidating or path in self._inflight or self._nursery is None:
            return
        self._revalidating.add(path)
        self._nursery.start_soon(self._revalidate, path)

    async def _revalidate(self, path: bytes) -> None:
        try:
            async with self._revalidate_limit:
                await self.fetch(path, background=True)
                self.stats["revalidated"] += 1
        except OSError as e:
            log.info("revalidating %r failed: %s", path, e)
        finally:
            self._revalidating.discard(path)

    def _queue_subdirs(self, path: bytes, entries: list[tuple[bytes, p.Attrs]]) -> None:
        if not self._prefetch_workers or not self._walker_active():
            return
        added = False
        for name, a in entries:
            sub = join(path, name)
            if (a.is_dir and sub not in self._queued and len(self._queue) < self._queue_max
                    and not self.meta.listed(sub)):
                self._queue.append(sub)
                self._queued.add(sub)
                added = True
        if added:
            self._wake.set()

    def _walker_active(self) -> bool:
        return trio.current_time() - self._last_foreground < WALKER_IDLE

    async def _prefetch_worker(self) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event() if self._wake.is_set() else self._wake
                await self._wake.wait()
            path = self._queue.popleft()
            self._queued.discard(path)
            if not self._walker_active():
                self._queue.clear()
                self._queued.clear()
                continue
            if self.meta.listed(path) or path in self._inflight or self._unsettled(path):
                continue
            try:
                await self.load_stored(path)
                if self.meta.listed(path, max_age=self.max_stale):
                    # Known from disk: revalidate, and walk on from what we know.
                    listing = self.meta.listing(path, max_age=self.max_stale) or []
                    self._queue_subdirs(path, listing)
                await self.fetch(path, background=True)
                self.stats["prefetched"] += 1
            except OSError as e:
                log.debug("prefetch of %r failed: %s", path, e)
                if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR):
                    if len(self._refused) > 10_000:
                        self._refused.clear()
                    self._refused[path] = trio.current_time()

    # ---- persistence ---------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Write listings changed since the last flush to the metastore."""
        if self.store is None or not self.meta.dirty:
            return
        rows: list[tuple[bytes, float, bytes | None]] = []
        for path in self.meta.dirty:
            listing = self.meta.listing(path, max_age=float("inf"))
            listed = self.meta.listing_time(path)
            rows.append((path, listed or 0.0, None if listing is None else encode_entries(listing)))
        self.meta.dirty.clear()
        await trio.to_thread.run_sync(self.store.save, rows)
