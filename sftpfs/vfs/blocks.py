"""Clean file contents by block: the second read runs at disk speed, not link speed.

A block is keyed by the *version* of the file it was read from: path, size,
mtime, and an epoch that this machine bumps whenever it changes the file
through the mount. A file changed on the server has another version, so its
old blocks are never served for it: they just miss, and age out of the LRU.

Three tiers, all behind one `BlockCache` per mount:

* memory: the blocks fetched last (read-ahead lands here until it is read);
* in flight: a block being fetched has one `_Block` that every reader waits
  on, so two readers (or a reader and the directory prefetcher) never fetch
  the same block twice;
* disk: a size-bounded LRU (diskcache) in `<cache_dir>/blocks`, persistent
  across mounts, filled by a writer task in a thread (a diskcache set costs
  0.7-3 ms, too long for the event loop) when fetches pause or much is
  queued (on a fast link writing competes with the reader for the CPU), and
  read in a thread too (with LRU every get is a small write transaction
  that can wait on the writer).

The disk tier is best effort. A removed cache directory, a full disk or a
broken database cost one warning and send reads to the server; they never
fail a read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import trio

from ..slots import Slots
from . import epochlog

log = logging.getLogger(__name__)

# 1 MiB, measured against 256 and 512 KiB (docs/architecture.md, "Block cache"): a 64 MiB
# re-read from disk in 0.21 s instead of 0.40 s, a cold read at 0 ms RTT 25% faster (fewer
# diskcache entries and runs), random reads unharmed (they are answered by a direct read).
BLOCK_SIZE = 1024 * 1024
MEM_BYTES = 64 * 2**20  # recent blocks kept in RAM: read-ahead waits here to be read
WRITE_QUEUE_BYTES = 96 * 2**20  # blocks waiting for the disk; beyond this, new ones are not cached
WRITE_EAGER_BYTES = 80 * 2**20  # write while blocks still arrive once this much waits...
WRITE_CATCH_UP_TO = 48 * 2**20  # ...until this little does (below WRITE_QUEUE_BYTES, or it stalls)
WRITE_QUIET = 0.1  # seconds without fetches before the disk writer starts
READAHEAD_SLOTS = 32  # READ requests in flight for read-ahead and prefetch (of 64 per session)
DEMAND_SLOTS = 16  # READ requests in flight that a reader is waiting for
RUN_MAX = 4 * 2**20  # one fetch run covers at most this many bytes
DEFAULT_CACHE_MAX = 10 * 2**30
DEFAULT_CACHE_MIN = 64 * 2**20
STATS_FILE = "stats.json"
WARN_EVERY = 600.0  # seconds between repeated warnings about the disk cache
SMALL_VALUE = 2**15  # diskcache keeps values below this inside SQLite (its disk_min_file_size)
EPOCHS_IN_MEMORY = 100_000
DB_NAME = "cache.db"  # diskcache's database file
EPOCH_BATCH = 10_000  # epochs logged before they are moved into the Index in one commit

def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def default_cache_size(directory: Path | None) -> int:
    """min(10 GiB, 10% of the free space where the cache lives), at least 64 MiB."""
    free = None
    d = directory
    while d is not None:
        try:
            free = shutil.disk_usage(d).free
            break
        except OSError:
            d = d.parent if d.parent != d else None
    if free is None:
        return DEFAULT_CACHE_MAX
    return max(DEFAULT_CACHE_MIN, min(DEFAULT_CACHE_MAX, free // 10))


@dataclass(frozen=True)
class Version:
    """One version of a remote file: what its cached blocks belong to."""

    path: bytes
    size: int
    mtime: int
    epoch: int = 0
    persist: bool = True  # False: memory only (a version that cannot be trusted later)
    key: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ident = b"%b\0%d\0%d\0%d" % (self.path, self.size, self.mtime, self.epoch)
        object.__setattr__(self, "key", hashlib.sha256(ident).digest()[:16])

    def block_key(self, idx: int) -> bytes:
        return self.key + idx.to_bytes(8, "big")

    def nblocks(self, bs: int = BLOCK_SIZE) -> int:
        return (self.size + bs - 1) // bs

    def block_len(self, idx: int, bs: int = BLOCK_SIZE) -> int:
        return max(0, min(bs, self.size - idx * bs))


class BlockUnavailable(Exception):
    """A block could not be fetched (the reader goes to the server directly)."""


# --------------------------------------------------------------------------- disk


class Disk:
    """The diskcache store, made best effort. Thread-safe; every call is blocking.

    Errors never escape: a failure logs a warning (at most every WARN_EVERY
    seconds), the store pauses for a while, then tries again, reopening the
    directory if it was removed.
    """

    RETRY_AFTER = 30.0

    def __init__(self, directory: Path | None, size_limit: int) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self._cache = None
        self._epochs = None
        self._ino: tuple[int, int] | None = None  # the database file we opened
        self.generation = 0  # successful opens: a new one means a new directory
        self._paused_until = 0.0
        self._last_warning = -WARN_EVERY
        self._lock = threading.Lock()
        self._last_check = 0.0
        # Nothing on disk: found empty when opened, nothing stored since. A cold cache
        # then costs no lookups (an SQLite query each, on the event loop for some).
        # Another mount sharing the directory may store meanwhile: a miss, not an error.
        self.empty = False
        if directory is not None:
            self._open()

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _open(self) -> bool:
        import diskcache  # imported here: `sftpfs --help` should not pay for it

        assert self.directory is not None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for d in (self.directory.parent, self.directory):  # private, also when recreated
                if os.stat(d).st_uid == os.getuid():
                    os.chmod(d, 0o700)
            # timeout: a busy database makes a read miss, it never makes it wait long.
            self._cache = diskcache.Cache(str(self.directory), timeout=2, size_limit=self.size_limit,
                                          eviction_policy="least-recently-used", cull_limit=1)
            self._epochs = diskcache.Index(str(self.directory / "epochs"), timeout=2)
            self._ino = self._identity()
            self.empty = len(self._cache) == 0
            self._recover_epochs()
            self.generation += 1
            return True
        except Exception as e:  # noqa: BLE001 - any failure: run without the disk tier
            self._failed("open", e)
            self._cache = self._epochs = None
            return False

    def warn(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def _failed(self, what: str, e: BaseException) -> None:
        self._paused_until = time.monotonic() + self.RETRY_AFTER
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "full" in str(e)
        why = "the disk is full" if full else f"{type(e).__name__}: {e}"
        self.warn("block cache in %s unusable (%s during %s); reading from the server",
                   self.directory, why, what)

    def _identity(self) -> tuple[int, int] | None:
        """Which database file is at our path (None: none). diskcache re-creates
        missing directories when it writes a value, never the database itself."""
        assert self.directory is not None
        try:
            st = os.stat(self.directory / DB_NAME)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _usable(self, *, check: bool = False):
        """The cache if it may be used now; notices a removed directory.

        Reads check at most once a second; writes (`check`) every time, so no
        value lands in a re-created directory before it is made private again.
        """
        if self.directory is None:
            return None
        now = time.monotonic()
        if now < self._paused_until:
            return None
        if check or now - self._last_check >= 1.0:
            self._last_check = now
            if self._identity() != self._ino or self._cache is None:
                with self._lock:
                    if self._cache is not None:
                        self.warn("block cache directory %s was removed; reads go to the server "
                                   "until it is recreated", self.directory)
                        self._close_quietly()
                    if not self._open():
                        return None
        return self._cache

    def _close_quietly(self) -> None:
        for c in (self._cache, self._epochs):
            with contextlib.suppress(Exception):
                if c is not None:
                    (c.cache if hasattr(c, "cache") else c).close()
        self._cache = self._epochs = None

    def get(self, key: bytes) -> bytes | None:
        c = self._usable()
        if c is None:
            return None
        try:
            return c.get(key, default=None)
        except Exception as e:  # noqa: BLE001
            self._failed("read", e)
            return None

    def contains(self, key: bytes) -> bool:
        if self.empty:
            return False
        c = self._usable()
        if c is None:
            return False
        try:
            return key in c
        except Exception as e:  # noqa: BLE001
            self._failed("lookup", e)
            return False

    def put_many(self, items: list[tuple[bytes, bytes]]) -> int:
        """Store blocks; returns how many were stored.

        Small blocks (stored inside the database) share one transaction; large
        ones (files) get one each, so a reader never waits long for the lock.
        """
        c = self._usable(check=True)
        if c is None:
            return 0
        self.empty = False
        small = [(k, d) for k, d in items if len(d) < SMALL_VALUE]
        n = 0
        try:
            if small:
                with c.transact(retry=True):
                    for key, data in small:
                        c.set(key, data)
                n += len(small)
            for key, data in items:
                if len(data) >= SMALL_VALUE:
                    # As a file object: diskcache writes bytes values by iterating
                    # a BytesIO, i.e. line by line (thousands of writes per binary
                    # block, holding the GIL: a sixth of a cold read's CPU).
                    c.set(key, io.BytesIO(data), read=True)
                    n += 1
            # Each set evicts at most one entry (the least recently used): that holds the
            # limit while blocks replace blocks. Many small entries replaced by large
            # ones creep over it: then evict until under.
            if c.volume() > self.size_limit + 2 * BLOCK_SIZE:
                c.cull(retry=True)
        except Exception as e:  # noqa: BLE001
            self._failed("write", e)
        return n

    def all_epochs(self, limit: int) -> dict[bytes, int] | None:
        """Every epoch, if there are at most `limit` (usually a few: files changed here)."""
        if self._usable() is None or self._epochs is None:
            return None
        try:
            if len(self._epochs) > limit:
                return None
            return {k: int(v) for k, v in self._epochs.items()}
        except Exception as e:  # noqa: BLE001
            self._failed("epoch lookup", e)
            return None

    def epoch(self, path: bytes) -> int | None:
        """None: unknown (no usable disk)."""
        if self._usable() is None or self._epochs is None:
            return None
        try:
            return int(self._epochs.get(path, 0))
        except Exception as e:  # noqa: BLE001
            self._failed("epoch lookup", e)
            return None

    def set_epochs(self, items: Iterable[tuple[bytes, int]]) -> bool:
        """Into the Index, in one commit (17 instead of 70 µs an entry); False: not stored."""
        if self._usable(check=True) is None or self._epochs is None:
            return False
        try:
            self._store_epochs(items)
            return True
        except Exception as e:  # noqa: BLE001
            self._failed("epoch write", e)
            return False

    def _store_epochs(self, items: Iterable[tuple[bytes, int]]) -> None:
        """Keep the larger epoch of each path: a log folded late (another mount's,
        a crashed one's) must not undo a newer one."""
        assert self._epochs is not None
        with self._epochs.transact():
            for path, value in items:
                if value > int(self._epochs.get(path, 0)):
                    self._epochs[path] = value

    def _recover_epochs(self) -> None:
        """Fold the epoch logs into the Index (epochlog.py), deleting those of dead mounts."""
        assert self.directory is not None
        records, dead = epochlog.recover(self.directory)
        done = False
        try:
            if records:
                self._store_epochs(records)
                if dead:
                    log.info("recovered the epochs of %d ended mount(s)", len(dead))
            done = True
        finally:
            epochlog.release(dead, done=done)

    def add_stats(self, delta: dict[str, int]) -> None:
        if self.directory is None or not any(delta.values()):
            return
        try:
            add_stats(self.directory, delta)
        except OSError as e:
            log.debug("cannot update cache statistics: %s", e)

    def close(self) -> None:
        with self._lock:
            self._close_quietly()


def read_stats(directory: Path) -> dict[str, int]:
    try:
        data = json.loads((directory / STATS_FILE).read_text())
        return {k: int(v) for k, v in data.items() if isinstance(v, (int, float))}
    except (OSError, ValueError):
        return {}


def add_stats(directory: Path, delta: dict[str, int]) -> None:
    """Add counters to stats.json (locked: two mounts of one remote may share it)."""
    with open(directory / ".stats.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stats = read_stats(directory)
        for k, v in delta.items():
            stats[k] = stats.get(k, 0) + v
        tmp = directory / f".{STATS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(stats, sort_keys=True))
        os.replace(tmp, directory / STATS_FILE)


# --------------------------------------------------------------------- the cache


class _Block:
    """A block being fetched: readers wait on `event`; `data` None means it failed."""

    __slots__ = ("event", "data")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None


Source = Callable[[int, int], Awaitable[bytes | memoryview]]  # read(offset, length); b"" at EOF


class BlockCache:
    """Blocks of every open file of one mount: memory, in flight, disk.

    Only ever touched from trio tasks; the disk is reached through threads.
    """

    def __init__(self, directory: Path | None, size_limit: int, *, block_size: int = BLOCK_SIZE,
                 mem_bytes: int = MEM_BYTES, readahead_slots: int = READAHEAD_SLOTS,
                 demand_slots: int = DEMAND_SLOTS) -> None:
        self.block_size = block_size
        self.disk = Disk(directory, size_limit) if directory is not None else Disk(None, 0)
        self.mem_bytes = mem_bytes
        self._mem: OrderedDict[bytes, bytes] = OrderedDict()
        self._mem_used = 0
        self._inflight: dict[bytes, _Block] = {}
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._queued: dict[bytes, bytes] = {}  # key -> data, until it is on disk
        self._queued_bytes = 0
        self._epoch_queue: list[tuple[bytes, int]] = []  # logged, not yet in the Index
        self._epochs_folding: list[tuple[bytes, int]] = []  # on their way into the Index
        self._epochs: dict[bytes, int] = {}
        self._epoch_log: epochlog.EpochLog | None = None
        self._log_generation = 0  # the disk directory the log lives in
        self._all_epochs = False  # _epochs holds every epoch on disk: a miss means 0
        self._wake = trio.Event()
        self._fetching = 0  # fetch runs going on
        self._fetched_at = 0.0  # when the last one ended
        self._catching_up = False  # the writer is past WRITE_EAGER_BYTES, writing while reads go on
        self.readahead_slots = Slots(readahead_slots)
        self.demand_slots = Slots(demand_slots)
        self._disk_threads = trio.CapacityLimiter(4)
        self.stats = {"hits": 0, "misses": 0, "hit_bytes": 0, "fetched_bytes": 0, "dropped": 0}
        self._stats_flushed = dict(self.stats)
        self.nursery: trio.Nursery | None = None

    # ---- lifecycle ---------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own fetch runs and the disk writer; on cancel, write what is queued."""
        try:
            async with trio.open_nursery() as n:
                self.nursery = n
                if self.disk.enabled:
                    self._open_epoch_log()
                    known = await trio.to_thread.run_sync(self.disk.all_epochs, EPOCHS_IN_MEMORY)
                    if known is not None:
                        known.update(self._epochs)
                        self._epochs, self._all_epochs = known, True
                n.start_soon(self._writer)
                n.start_soon(self._stats_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await self._drain()
                await self._flush_stats()
            if self._epoch_log is not None:
                log_, self._epoch_log = self._epoch_log, None
                with contextlib.suppress(OSError):
                    log_.close(folded=not self._epoch_queue)
            self.disk.close()

    # ---- lookups ---------------------------------------------------------------------

    def peek(self, key: bytes) -> bytes | None:
        """A block in memory (recently fetched, or waiting to be written)."""
        data = self._mem.get(key)
        if data is not None:
            self._mem.move_to_end(key)
            return data
        return self._queued.get(key)

    def available(self, key: bytes, disk: bool = True) -> bool:
        """In memory, in flight or (if `disk`) on disk; no data is read."""
        if key in self._mem or key in self._queued or key in self._inflight:
            return True
        return disk and self.disk.enabled and self.disk.contains(key)

    async def on_disk(self, keys: list[bytes]) -> set[bytes]:
        """Which of `keys` are in the disk cache, looked up in a thread (the
        directory prefetcher asks about many files at once)."""
        if not keys or not self.disk.enabled or self.disk.empty:
            return set()
        return await trio.to_thread.run_sync(
            lambda: {k for k in keys if self.disk.contains(k)}, limiter=self._disk_threads)

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        """Blocks are arriving (a fetch outside `fetch`, like the directory
        prefetcher's): the disk writer waits for a pause, as for fetch runs."""
        self._fetching += 1
        try:
            yield
        finally:
            self._fetching -= 1
            self._fetched_at = trio.current_time()

    def inflight(self, key: bytes) -> _Block | None:
        return self._inflight.get(key)

    async def get(self, key: bytes, disk: bool = True) -> bytes | None:
        """The block from memory, a fetch in flight, or (if `disk`) disk; None if nowhere."""
        data = self.peek(key)
        if data is not None:
            return data
        b = self._inflight.get(key)
        if b is None:
            if not disk or not self.disk.enabled or self.disk.empty:
                return None
            b = self.begin(key)
            assert b is not None
            await self._load(key, b)
        else:
            await b.event.wait()
        return b.data

    async def _load(self, key: bytes, b: _Block) -> None:
        """Read a block from disk into memory; concurrent readers wait on `b`."""
        data = None
        try:
            data = await trio.to_thread.run_sync(self.disk.get, key, limiter=self._disk_threads)
        finally:
            if data is not None:
                self.stats["hits"] += 1
                self.stats["hit_bytes"] += len(data)
                self._remember(key, data)
                b.data = data
            if self._inflight.get(key) is b:
                del self._inflight[key]
            b.event.set()

    def _preload(self, key: bytes) -> None:
        """A block on disk that a reader will want soon: into memory in the background."""
        if self.nursery is None:
            return
        b = self.begin(key)
        if b is not None:
            self.nursery.start_soon(self._load, key, b)

    # ---- storing -------------------------------------------------------------------

    def _remember(self, key: bytes, data: bytes) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_used -= len(old)
        self._mem[key] = data
        self._mem_used += len(data)
        while self._mem_used > self.mem_bytes and self._mem:
            _k, d = self._mem.popitem(last=False)
            self._mem_used -= len(d)

    def put(self, key: bytes, data: bytes, persist: bool = True) -> None:
        """A block fetched from the server: keep it in memory, queue it for disk."""
        self._remember(key, data)
        if not persist or not self.disk.enabled or key in self._queued:
            return
        if self._queued_bytes + len(data) > WRITE_QUEUE_BYTES:
            self.stats["dropped"] += 1  # the disk cannot keep up: never slow reads for it
            return
        self._queue.append((key, data))
        self._queued[key] = data
        self._queued_bytes += len(data)
        self._wake.set()

    def begin(self, key: bytes) -> _Block | None:
        """Register a fetch of `key`; None if one is in flight already."""
        if key in self._inflight:
            return None
        b = self._inflight[key] = _Block()
        return b

    def complete(self, key: bytes, b: _Block, data: bytes, persist: bool = True) -> None:
        self.stats["misses"] += 1
        self.stats["fetched_bytes"] += len(data)
        self.put(key, data, persist)
        b.data = data
        if self._inflight.get(key) is b:
            del self._inflight[key]
        b.event.set()

    def fail(self, key: bytes, b: _Block) -> None:
        if self._inflight.get(key) is b:
            del self._inflight[key]
        b.event.set()

    # ---- epochs: local changes make new versions --------------------------------------

    async def epoch(self, path: bytes) -> int:
        """The newest epoch of `path` and of its directories: a directory renamed
        here makes new versions of everything below it."""
        e = await self._own_epoch(path)
        while path:
            path = path.rpartition(b"/")[0]
            e = max(e, await self._own_epoch(path))
        return e

    async def _own_epoch(self, path: bytes) -> int:
        e = self._epochs.get(path)
        if e is None:
            e = 0
            if self.disk.enabled and not self._all_epochs:
                found = await trio.to_thread.run_sync(self.disk.epoch, path,
                                                      limiter=self._disk_threads)
                if path in self._epochs:  # bumped meanwhile: that one is newer
                    return self._epochs[path]
                if found is None:
                    # Unknown: an epoch no block was ever stored under, not remembered.
                    return -time.time_ns()
                e = found
            if not self._all_epochs:
                if len(self._epochs) > EPOCHS_IN_MEMORY:
                    self._epochs.clear()
                    # Those not in the Index yet are known only here.
                    self._epochs.update(self._epochs_folding)
                    self._epochs.update(self._epoch_queue)
                self._epochs[path] = e
        return e

    def bump(self, path: bytes) -> None:
        """This mount changes `path`: blocks read before are not its content any more.

        Logged at once (epochlog.py), so a later mount does not serve the old
        blocks either, not even after a crash.
        """
        # Later than any epoch the path had here, even if the clock stepped back.
        e = max(time.time_ns(), self._epochs.get(path, 0) + 1)
        self._epochs[path] = e
        if self.disk.enabled:
            self._epoch_queue.append((path, e))
            if self._epoch_log is not None and self._log_generation != self.disk.generation:
                # The cache directory was removed and made anew: so must the log be.
                self._close_epoch_log()
                self._open_epoch_log()
            elif self._epoch_log is not None:
                try:
                    self._epoch_log.append(path, e)
                except OSError as err:
                    self.disk.warn("cannot log an epoch in %s (%s): moving epochs into the "
                                   "block cache's index now", self.disk.directory, err)
                    self._close_epoch_log()
            if len(self._epoch_queue) >= EPOCH_BATCH or self._epoch_log is None:
                self._wake.set()

    def _open_epoch_log(self) -> None:
        """A new log, holding what is not in the Index yet."""
        assert self.disk.directory is not None
        generation = self.disk.generation
        try:
            self._epoch_log = epochlog.EpochLog(self.disk.directory,
                                                [*self._epochs_folding, *self._epoch_queue])
            self._log_generation = generation
        except OSError as e:
            self.disk.warn("cannot start an epoch log in %s (%s): epochs go into the block "
                           "cache's index directly", self.disk.directory, e)

    def _close_epoch_log(self) -> None:
        """Give up the log; it stays for a later mount to fold (nothing is lost)."""
        log_, self._epoch_log = self._epoch_log, None
        if log_ is not None:
            with contextlib.suppress(OSError):
                log_.close(folded=False)

    async def _fold_epochs(self, *, final: bool = False) -> None:
        """Move the logged epochs into the Index and start a fresh log."""
        self._epochs_folding, self._epoch_queue = self._epoch_queue, []
        done = False
        try:
            done = await trio.to_thread.run_sync(self.disk.set_epochs, self._epochs_folding,
                                                 limiter=self._disk_threads)
        finally:
            if not done:
                self._epoch_queue[:0] = self._epochs_folding
            self._epochs_folding = []
        if not done or final:
            return  # the log still holds everything / is deleted at close
        if self._epoch_log is None or self._log_generation != self.disk.generation:
            self._close_epoch_log()
            self._open_epoch_log()
        else:
            try:
                self._epoch_log.restart(self._epoch_queue)
            except OSError as e:
                log.debug("cannot restart the epoch log: %s", e)  # the old one stays: harmless

    # ---- fetching ---------------------------------------------------------------------

    def fetch(self, v: Version, first: int, last: int, read: Source, max_read: int, *,
              demand: bool, scopes: set[trio.CancelScope] | None = None) -> list[int]:
        """Fetch blocks first..last of `v` that are nowhere yet, in the background.

        Missing blocks are grouped into runs of adjacent blocks; each run goes
        out as READs of `max_read` bytes, many in flight. Returns the indexes
        started. `scopes` collects cancel scopes so an owner can stop its runs.
        """
        started: list[int] = []
        run: list[tuple[int, _Block]] = []
        per_run = max(1, RUN_MAX // self.block_size)

        def flush() -> None:
            if run:
                self._start_run(v, list(run), read, max_read, demand, scopes)
                run.clear()

        for idx in range(first, last + 1):
            key = v.block_key(idx)
            if key in self._mem or key in self._queued or key in self._inflight:
                flush()
                continue
            if v.persist and self.disk.enabled and self.disk.contains(key):
                flush()
                self._preload(key)
                continue
            b = self.begin(key)
            assert b is not None
            run.append((idx, b))
            started.append(idx)
            if len(run) >= per_run:
                flush()
        flush()
        return started

    def _start_run(self, v: Version, blocks: list[tuple[int, _Block]], read: Source, max_read: int,
                   demand: bool, scopes: set[trio.CancelScope] | None) -> None:
        scope = trio.CancelScope()
        if scopes is not None:
            scopes.add(scope)
        if self.nursery is None:  # not running (unit tests without run()): fail fast
            for idx, b in blocks:
                self.fail(v.block_key(idx), b)
            return
        self.nursery.start_soon(self._run, v, blocks, read, max_read, demand, scope, scopes)

    async def _run(self, v: Version, blocks: list[tuple[int, _Block]], read: Source, max_read: int,
                   demand: bool, scope: trio.CancelScope, scopes: set[trio.CancelScope] | None) -> None:
        bs = self.block_size
        first = blocks[0][0]
        start = first * bs
        end = min((blocks[-1][0] + 1) * bs, v.size)
        # Each block is joined once from the replies' bytes (views into what arrived):
        # one copy, no zero-filled buffer to fault in.
        pieces: dict[int, list[tuple[int, bytes | memoryview]]] = {idx: [] for idx, _b in blocks}
        waiting = {idx: 0 for idx, _b in blocks}
        byidx = dict(blocks)
        reqs = [(off, min(max_read, end - off)) for off in range(start, end, max_read)]
        for off, n in reqs:
            for idx in range(off // bs, (off + n - 1) // bs + 1):
                waiting[idx] += 1
        slots = self.demand_slots if demand else self.readahead_slots
        done: set[int] = set()

        def place(pos: int, data: bytes | memoryview) -> None:
            mv = memoryview(data)
            while mv:
                idx = pos // bs
                part = mv[: (idx + 1) * bs - pos]
                pieces[idx].append((pos, part))
                pos += len(part)
                mv = mv[len(part):]

        async def one(off: int, n: int) -> None:
            async with slots.take(1):
                got = 0
                while got < n:
                    data = await read(off + got, n - got)
                    if not data:
                        raise BlockUnavailable(f"end of file at {off + got}, expected {v.size}")
                    place(off + got, data if len(data) <= n - got else data[: n - got])
                    got += len(data)
            for idx in range(off // bs, (off + n - 1) // bs + 1):
                waiting[idx] -= 1
                if waiting[idx] == 0:
                    block = b"".join(part for _pos, part in sorted(pieces.pop(idx), key=itemgetter(0)))
                    if len(block) != v.block_len(idx, bs):
                        raise BlockUnavailable(f"block {idx} of {v.path!r}: {len(block)} bytes")
                    self.complete(v.block_key(idx), byidx[idx], block, v.persist)
                    done.add(idx)

        self._fetching += 1
        try:
            with scope:
                async with trio.open_nursery() as n:
                    for off, ln in reqs:
                        n.start_soon(one, off, ln)
        except* Exception as eg:  # the reader retries directly and reports errors
            log.debug("fetching %r blocks %d-%d failed: %s", v.path, first, blocks[-1][0],
                      eg.exceptions[0])
        finally:
            self._fetching -= 1
            self._fetched_at = trio.current_time()
            for idx, b in blocks:
                if idx not in done:
                    self.fail(v.block_key(idx), b)
            if scopes is not None:
                scopes.discard(scope)

    # ---- the disk writer -------------------------------------------------------------

    def _reading(self) -> bool:
        """Blocks are arriving, or were a moment ago: writing them now would compete
        with the reader for the CPU (and the GIL), unless much is queued already."""
        if self._queued_bytes >= WRITE_EAGER_BYTES:
            self._catching_up = True
        elif self._queued_bytes <= WRITE_CATCH_UP_TO:
            self._catching_up = False
        if self._catching_up:
            return False
        return bool(self._fetching) or trio.current_time() - self._fetched_at < WRITE_QUIET

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while True:
                while self._reading():
                    with trio.move_on_after(WRITE_QUIET / 2):
                        await self._wake.wait()  # a block queued: maybe past the eager mark
                    self._wake = trio.Event()
                if await self._write_some(yield_to_readers=True):
                    break

    async def _write_some(self, *, final: bool = False, yield_to_readers: bool = False) -> bool:
        """Write what is queued; False if it stopped early because reads resumed."""
        if self._epoch_queue and (final or len(self._epoch_queue) >= EPOCH_BATCH
                                  or self._epoch_log is None):
            await self._fold_epochs(final=final)
        while self._queue:
            if yield_to_readers and self._reading():
                return False
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            while self._queue and len(batch) < 16 and size < 4 * 2**20:
                key, data = self._queue.popleft()
                batch.append((key, data))
                size += len(data)
            if not batch:
                continue
            try:
                await trio.to_thread.run_sync(self.disk.put_many, batch, limiter=self._disk_threads)
            except BaseException:
                # Cancelled before the thread ran (unmount): keep them for the final drain.
                self._queue.extendleft(reversed(batch))
                raise
            for key, data in batch:
                if self._queued.pop(key, None) is not None:
                    self._queued_bytes -= len(data)
        return True

    async def _drain(self) -> None:
        await self._write_some(final=True)

    async def _stats_loop(self) -> None:
        while True:
            await trio.sleep(5)
            await self._flush_stats()

    async def _flush_stats(self) -> None:
        delta = {k: v - self._stats_flushed.get(k, 0) for k, v in self.stats.items()}
        if any(delta.values()):
            self._stats_flushed = dict(self.stats)
            await trio.to_thread.run_sync(self.disk.add_stats, delta, limiter=self._disk_threads)
