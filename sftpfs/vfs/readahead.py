"""Read-ahead: within a file (per open handle) and across the files of a directory.

Over a link with 40 ms of latency, a read that waits for its own request runs
at 128 KiB per round trip (3 MB/s). The per-handle `Reader` notices
sequential reads and keeps a window of blocks in flight ahead of the reader,
doubling it on every sequential read up to `readahead_max` (sized to cover the
bandwidth-delay product) and dropping back on a jump. Small files are fetched
whole on the first read.

Tools that copy or scan trees (rsync, cp -r, tar, grep -r, file, thumbnailers)
read many small files one after another; each costs a few round trips (open,
read, close) however small it is. `DirPrefetcher` notices files of a
directory being opened in name order and fetches the next ones (walking on
into the following directories, depth first in name order, the order rsync
and sorted argument lists use) into the block cache. An open of a file whose
attributes are fresh and whose blocks are all cached is then answered
locally, with no round trip at all (`ReadAhead.open_local`).

Consistency: blocks are per file version (see blocks.py), and a version is only
trusted if its mtime is at least `RECENT` seconds old (SFTP mtimes are whole
seconds: two writes within one second can leave size and mtime equal). While
this mount has the file open for writing, reads bypass the cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..remote import protocol as p
from ..remote.sftp import SftpSession
from ..slots import Slots
from .blocks import BlockCache, BlockUnavailable, Version, default_cache_size
from .files import OpenFile
from .meta import is_below, join, name_of, parent_of

if TYPE_CHECKING:
    from ..remote.protocol import Attrs
    from .vfs import Vfs

log = logging.getLogger(__name__)

RECENT = 2.0  # seconds: a younger mtime may still change without changing
INITIAL_WINDOW = 512 * 1024  # read-ahead after the first sequential read
SEQ_SLACK = 2 * 2**20  # the kernel's own read-ahead arrives a little out of order
LOCAL_OPEN_MAX_BLOCKS = 256  # larger files always open on the server (1 RTT is nothing for them)
SEEN_MAX = 100_000
TOUCHED_MAX = 100_000

# Directory prefetch
WALK_INITIAL_FILES = 8
WALK_MAX_FILES = 512
WALK_IDLE = 30.0  # a walk that sees no hit for this long ends
MAX_WALKS = 4
BATCH_FILES = 16  # files fetched together: their OPENs share a send, then their READs
FIRST_BATCH_FILES = 2  # the nearest files ahead of the program go in batches this small
BATCH_REQUESTS = 64  # most READs and CLOSEs in one batch
BATCHES_IN_FLIGHT = 4
BULK_SLOTS = 128  # requests in flight on the prefetch channel


async def _nothing(_f: OpenFile) -> None:
    pass


@dataclass
class ReadOptions:
    """What -o cache_size, readahead_max and small_file set."""

    cache_size: int | None = None  # None: default_cache_size(); 0: no disk cache
    readahead_max: int = 16 * 2**20
    small_file: int = 256 * 1024


class ReadAhead:
    """Per mount: the block cache, readers for open files, the directory prefetcher."""

    def __init__(self, vfs: Vfs, opts: ReadOptions | None = None) -> None:
        self.vfs = vfs
        self.opts = opts or ReadOptions()
        directory = None
        if vfs.cache_dir is not None and self.opts.cache_size != 0:
            directory = vfs.cache_dir / "blocks"
        limit = self.opts.cache_size or default_cache_size(vfs.cache_dir)
        self.blocks = BlockCache(directory, limit)
        self.prefetcher = DirPrefetcher(self)
        self._seen: OrderedDict[bytes, Version] = OrderedDict()  # version at the last open
        self._touched: OrderedDict[bytes, None] = OrderedDict()  # blocks read at random once
        # A file opened locally turned out changed: the fs layer drops the kernel's size.
        self.on_version_change: Callable[[OpenFile], Awaitable[None]] = _nothing
        self._own_uids: set[int] = set()  # owners whose owner-only files the server let us read
        self.nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as n:
                await n.start(self.blocks.run)
                self.nursery = n
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.nursery = None
            self.prefetcher.bulk.close()

    @property
    def max_read(self) -> int:
        return self.vfs.remote.io_sizes[0]

    # ---- versions -------------------------------------------------------------------

    def writing(self, path: bytes | None) -> bool:
        """This mount has `path` open for writing: its reads bypass the cache."""
        return path is not None and any(f.writable and f.path == path for f in self.vfs.open_files)

    async def version(self, path: bytes, a: Attrs) -> Version | None:
        """The version whose blocks may be used for `path` now; None: do not cache."""
        if a.size is None or a.mtime is None or (a.mode is not None and not a.is_reg):
            return None
        if time.time() - a.mtime < RECENT or self.writing(path) or self.dirty(path) is not None:
            return None
        return Version(path, a.size, a.mtime, await self.blocks.epoch(path))

    def touched_before(self, key: bytes) -> bool:
        """Whether a random read touched this block before (and note that it has now)."""
        if key in self._touched:
            self._touched.move_to_end(key)
            return True
        self._touched[key] = None
        if len(self._touched) > TOUCHED_MAX:
            self._touched.popitem(last=False)
        return False

    def dirty(self, path: bytes | None):
        """Local changes of `path` not yet on the server (write-back), or None."""
        deferred = getattr(self.vfs, "deferred", None)
        if deferred is None or path is None:
            return None
        return deferred.wb.file_for(path)

    async def overlay_read(self, dirty, offset: int, size: int, server_read) -> bytes:
        """Read a file with pending local changes: dirty ranges over the server's bytes.

        The same rule as write-back's own open files (deferred.PendingFile.read).
        """
        wb = self.vfs.deferred.wb
        end = min(offset + size, dirty.size)
        if offset >= end:
            return b""
        if dirty.new or dirty.ranges.covers(offset, end):
            return wb.read_local(dirty, offset, end - offset)
        out = bytearray(await server_read(offset, end - offset))
        out.extend(b"\0" * (end - offset - len(out)))  # past the server's end: zeros
        for s, e in dirty.ranges:
            lo, hi = max(s, offset), min(e, end)
            if lo < hi:
                out[lo - offset:hi - offset] = wb.read_local(dirty, lo, hi - lo)
        return bytes(out)

    def changed(self, path: bytes) -> None:
        """This mount changes the contents of `path` (write, truncate, rename onto it)."""
        self.blocks.bump(path)
        self._seen.pop(path, None)

    def all_cached(self, v: Version) -> bool:
        """Every block of `v` in memory, in flight or on disk (stops at the first missing)."""
        return all(self.blocks.available(v.block_key(i)) for i in range(v.nblocks()))

    # ---- opens ------------------------------------------------------------------------

    def _readable(self, a: Attrs) -> bool:
        """Whether the mode alone says the server would let us read the file (an open
        answered locally must not succeed where the server's would fail): readable by
        all, or by its owner if that is us (an upload showed it, or the server let us
        read a file only its owner may read)."""
        mode, uid = a.mode, a.uid
        if mode is None:
            return False
        deferred = getattr(self.vfs, "deferred", None)
        if deferred is not None and deferred.owner[0] is not None:
            self._own_uids.add(deferred.owner[0])
        if uid is not None and uid in self._own_uids:
            return bool(mode & stat.S_IRUSR)
        return mode & 0o444 == 0o444

    def opened_on_server(self, a: Attrs) -> None:
        """A read open the server allowed: if only the owner may read, we own it (or are root)."""
        if a.mode is not None and a.uid is not None and a.mode & 0o444 == stat.S_IRUSR:
            self._own_uids.add(a.uid)

    async def open_local(self, path: bytes) -> OpenFile | None:
        """Open read-only without asking the server, if fresh attributes name a cacheable version.

        Fresh means within cache_timeout, the bound close-to-open has anyway.
        The server OPEN (with its stat, close-to-open's check) waits for the
        first read, and is skipped if every block of the version is cached:
        then the open costs no round trip at all. A file opened and never
        read (rsync's basis for a file it replaces) costs none either.
        """
        a = self.vfs.meta.attrs(path)
        if a is None or not self._readable(a):
            return None
        v = await self.version(path, a)
        if v is None or v.nblocks() > LOCAL_OPEN_MAX_BLOCKS:
            return None
        if self._seen.get(path) == v and not self.all_cached(v):
            # The kernel may hold pages of it: a change found at the first read that
            # reaches us would be ESTALE; on the server, it drops them at open.
            return None
        f = OpenFile(self.vfs, path, self.vfs.remote.open(self.vfs.rpath(path), p.FXF_READ),
                     writable=False)
        self._attach(f, v, local=True)
        return f

    async def opened(self, f: OpenFile, a: Attrs) -> None:
        """A file was opened on the server; `a` are its attributes as of the open."""
        if f.path is None:
            return
        if f.writable:
            self.changed(f.path)
            return
        self.opened_on_server(a)
        v = await self.version(f.path, a)
        if v is None:
            self._seen.pop(f.path, None)
            if a.size is not None and a.mtime is not None and a.is_reg and not self.writing(f.path):
                # Not trusted past this open (e.g. modified just now): read ahead all the
                # same, into memory only, under a version no other open shares.
                f.reader = Reader(self, f, Version(f.path, a.size, a.mtime, -time.time_ns(),
                                                   persist=False), local=False)
        else:
            self._attach(f, v, local=False)

    def _attach(self, f: OpenFile, v: Version, *, local: bool) -> None:
        assert f.path is not None
        f.keep_cache = self._seen.get(f.path) == v
        self._seen[f.path] = v
        self._seen.move_to_end(f.path)
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        f.reader = Reader(self, f, v, local=local)
        if f.keep_cache:
            f.reader.announce()  # the kernel may answer every read from its page cache


class Reader:
    """Reads of one open file through the block cache, with a read-ahead window."""

    def __init__(self, ra: ReadAhead, f: OpenFile, v: Version, *, local: bool) -> None:
        self.ra = ra
        self.bc = ra.blocks
        self.file = f
        self.version = v
        self.verified = not local  # opened on the server, with a stat of this version
        self.verify_first: bool | None = None if local else False  # before any byte? (decided once)
        self.stale = False  # ESTALE from now on: the file is not the one opened
        self.announced = False  # the directory prefetcher knows this file is being read
        self._verify_lock = trio.Lock()
        self.window = INITIAL_WINDOW
        self.next_off = 0
        self.ra_next = 0  # first block not yet scheduled for read-ahead
        self.scopes: set[trio.CancelScope] = set()  # every fetch run reading through the handle
        self.closed = False
        self.served = False  # some data of `version` was returned
        self.bypass = False  # read from the server, uncached, from now on

    def _source(self, v: Version):
        """The server reads of fetch runs for `v`: never into `v` if the file is not `v`."""

        async def read(offset: int, length: int) -> bytes | memoryview:
            await self._verify()
            if self.version is not v or self.bypass:
                raise BlockUnavailable(f"{v.path!r} is not the version being fetched")
            return await self.file.remote.read(offset, length, view=True)  # copied into a block

        return read

    def announce(self) -> None:
        """Tell the directory prefetcher that this file is being read (at the first
        read, not at open: files opened and never read must not start walks)."""
        if not self.announced:
            self.announced = True
            if self.file.path is not None:
                self.ra.prefetcher.reading(self.file.path)

    async def _verify(self) -> None:
        """A file opened locally opens on the server before its first byte is returned
        (unless every block is cached) and at its first miss: same version?

        If not, and nothing of the cached version was returned yet (and the
        kernel dropped its pages at open), this handle reads the server's
        version instead; otherwise mixing would be possible: ESTALE, for good.
        """
        if self.verified:
            return
        async with self._verify_lock:
            if self.verified:
                return
            if self.stale or self.file.path is None:
                # Unlinked or replaced here before it was opened on the server: its
                # name is another file's now, or nobody's.
                self.stale = True
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            await self.ra.vfs.settle_for_server(self.file.path)  # e.g. renamed here
            rf = self.file.remote
            try:
                # Opened already by a direct read (say, of a file with local changes):
                # stat that handle rather than open a second one.
                a = await (rf.fstat() if rf.is_open else rf.open())
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                # Gone from the server since we looked (within cache_timeout): as NFS says.
                self.stale = True
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None
            if self.closed:
                await rf.close()  # released meanwhile (say, pinned by a rename): ours to close
            self.ra.opened_on_server(a)
            v = self.version
            if (a.size, a.mtime) != (v.size, v.mtime):
                if self.served or self.file.keep_cache:
                    log.warning("%r changed on the server while open (cached version %d bytes, "
                                "mtime %d; now %s bytes, mtime %s): stale file handle",
                                v.path, v.size, v.mtime, a.size, a.mtime)
                    self.stale = True
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
                log.info("%r changed on the server since it was listed; reading the new version",
                         v.path)
                if self.file.path is not None:
                    self.ra.vfs.meta.put_attrs(self.file.path, a)
                await self.ra.on_version_change(self.file)  # the kernel's size is the old one
                nv = await self.ra.version(v.path, a)
                if nv is None:
                    self.bypass = True
                else:
                    self.version = nv
            self.verified = True

    async def pin(self) -> None:
        """The file is about to be unlinked or replaced through this mount: open it on
        the server first, so this handle keeps reading the file it opened."""
        if not self.verified and not self.closed:  # rsync releases its basis before the rename
            try:
                await self._verify()
            except OSError as e:  # its reads will say so
                log.debug("cannot open %r before it is replaced: %s", self.version.path, e)

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        f = self.file
        if not self.announced:
            self.announce()
        if not self.verified:
            if self.verify_first is None:
                # Partly cached: check the version before returning any of it, so a
                # file changed on the server is read whole from its new version.
                self.verify_first = not self.ra.all_cached(self.version)
            if self.verify_first or self.stale:
                await self._verify()  # concurrent reads wait for the first one's check
        for _attempt in range(3):
            dirty = self.ra.dirty(f.path)
            if dirty is not None:
                # Written through this mount, not all uploaded yet (write-back): our
                # changes over the server's version, uncached.
                return await self.ra.overlay_read(dirty, offset, size, f.read_direct)
            if self.bypass or self.ra.writing(f.path):
                # Uncacheable, or open for writing here: the server has it in order.
                return await f.read_direct(offset, size)
            v = self.version
            if size <= 0:
                return b""
            if offset >= v.size:
                # Beyond this version's end (the kernel saw the file grow): ask the server.
                await self._verify()
                if self.version is v and not self.bypass:
                    return await f.read_direct(offset, size)
                continue
            data = await self._cached(v, offset, size)
            if data is not None:
                self.served = True
                return data
            # A fetch failed (or a block was evicted meanwhile): read directly, after
            # making sure a locally opened file is still the version it was opened as.
            await self._verify()
            if self.version is v and not self.bypass:
                return await f.read_direct(offset, size)
        return await f.read_direct(offset, size)

    async def _cached(self, v: Version, offset: int, size: int) -> bytes | memoryview | None:
        """The bytes from blocks (fetched if needed); None: read directly instead."""
        end = min(offset + size, v.size)
        bs = self.bc.block_size
        first, last = offset // bs, (end - 1) // bs
        if self.closed:
            return None
        src, m = self._source(v), self.ra.max_read
        if v.size <= self.ra.opts.small_file:
            self.bc.fetch(v, 0, v.nblocks() - 1, src, m, demand=True, scopes=self.scopes)
        elif self._sequential(offset, end):
            self.bc.fetch(v, first, last, src, m, demand=True, scopes=self.scopes)
            self._read_ahead(end)
        elif not all(self.bc.available(v.block_key(i), v.persist) for i in range(first, last + 1)):
            # A random read of blocks not cached. The first touch of a block reads just
            # the bytes asked for (one small request: a whole block would cost a random
            # reader on a fast link 10x sshfs's time); a block touched again is worth
            # caching, and is fetched and kept.
            keys = [v.block_key(i) for i in range(first, last + 1)]
            if not all(self.ra.touched_before(k) for k in keys):
                return None
            self.bc.fetch(v, first, last, src, m, demand=True, scopes=self.scopes)
        parts = []
        for idx in range(first, last + 1):
            data = await self.bc.get(v.block_key(idx), v.persist)
            if data is None or len(data) != v.block_len(idx, bs):
                return None
            parts.append(data)
        lo = offset - first * bs
        whole = parts[0] if len(parts) == 1 else b"".join(parts)
        if lo == 0 and end - offset == len(whole):
            return whole
        return memoryview(whole)[lo: lo + end - offset]  # the kernel copies it: no copy here

    def _sequential(self, offset: int, end: int) -> bool:
        """Track the access pattern: a read near the last one widens the window."""
        if self.next_off - SEQ_SLACK <= offset <= self.next_off + self.window:
            self.window = min(self.window * 2, self.ra.opts.readahead_max)
            self.next_off = max(self.next_off, end)
            return True
        self.window = INITIAL_WINDOW  # a jump: random access reads what it asks for
        self.next_off = end
        self.ra_next = 0
        return False

    def _read_ahead(self, end: int) -> None:
        v, bs = self.version, self.bc.block_size
        target = min(v.size, end + self.window)
        lo = max((end - 1) // bs + 1, self.ra_next)
        hi = (target - 1) // bs
        if hi >= lo and not self.closed:
            self.bc.fetch(v, lo, hi, self._source(v), self.ra.max_read, demand=False,
                          scopes=self.scopes)
            self.ra_next = hi + 1

    def close(self) -> None:
        """The handle is closing: stop every fetch through it before its CLOSE is sent.

        A READ sent after the CLOSE could hit the same handle number reused by
        another OPEN and cache another file's bytes. Cancelled runs stop at
        their next checkpoint, before sending anything (other readers of the
        same blocks refetch them).
        """
        self.closed = True
        for scope in list(self.scopes):
            scope.cancel()


# --------------------------------------------------------------------- directory walks


class _Walk:
    def __init__(self, start: bytes, files_first: bool) -> None:
        self.start = start
        self.files_first = files_first
        self.dir = parent_of(start)
        self.window = WALK_INITIAL_FILES
        self.expected: OrderedDict[bytes, int] = OrderedDict()  # upcoming files -> size
        self.bytes_ahead = 0
        self.wake = trio.Event()
        self.scope = trio.CancelScope()
        self.last_hit = trio.current_time()

    def hit(self, path: bytes) -> None:
        """The program opened `path`, which this walk predicted: widen and move on."""
        while self.expected:
            q, size = self.expected.popitem(last=False)
            self.bytes_ahead -= size
            if q == path:
                break
        self.dir = parent_of(path)
        self.window = min(self.window * 2, WALK_MAX_FILES)
        self.last_hit = trio.current_time()
        self.wake.set()


class DirPrefetcher:
    """Notices a program reading the files of a directory in name order and reads ahead of it."""

    def __init__(self, ra: ReadAhead) -> None:
        self.ra = ra
        self.walks: list[_Walk] = []
        self._last_in_dir: OrderedDict[bytes, bytes] = OrderedDict()  # dir -> last name read
        self._last_read: bytes | None = None
        # The order programs walk a tree in: rsync reads a directory's files, then its
        # subdirectories; cp -r, tar and grep -r go by name, files and subdirectories
        # interleaved (our listings are sorted). Learnt from what the program does.
        self.files_first = True
        self._batches = trio.Semaphore(BATCHES_IN_FLIGHT)
        self.files_prefetched = 0
        self.bulk = BulkChannel(ra)

    @property
    def max_file(self) -> int:
        return self.ra.opts.small_file

    def reading(self, path: bytes) -> None:
        """A program started reading `path`."""
        d, name = parent_of(path), name_of(path)
        order = self._order_shown(path)
        self._last_read = path
        prev = self._last_in_dir.pop(d, None)
        self._last_in_dir[d] = name
        if len(self._last_in_dir) > 4096:
            self._last_in_dir.popitem(last=False)
        if order is not None and order != self.files_first:
            self.files_first = order
            for w in self.walks:  # they predict the other order
                w.scope.cancel()
            self.walks.clear()
            if self.ra.nursery is not None:
                self._start(path)
            return
        for w in self.walks:
            if path in w.expected:
                w.hit(path)
                return
        if prev is not None and prev < name and self.ra.nursery is not None:
            self._start(path)

    def _order_shown(self, path: bytes) -> bool | None:
        """Whether this read shows the program walking files first (True), in name
        order (False), or says nothing of it (None)."""
        d = parent_of(path)
        last = self._last_read
        last_dir = parent_of(last) if last is not None else None
        if last_dir is None or last_dir == d:
            return None
        if is_below(last_dir, d):
            # Back in d after a subdirectory: name order (d/a, d/sub/..., d/z).
            sub = last_dir[len(d) + 1:] if d else last_dir
            return False if name_of(path) > sub.split(b"/", 1)[0] else None
        if d and parent_of(d) == last_dir:
            # Into a subdirectory that sorts before the parent's file read last:
            # the parent's files came first (d/a, d/z, d/sub/...).
            return True if name_of(d) < name_of(last) else None
        return None

    def _start(self, path: bytes) -> None:
        d = parent_of(path)
        for w in [w for w in self.walks if w.dir == d]:
            w.scope.cancel()
            self.walks.remove(w)
        while len(self.walks) >= MAX_WALKS:
            self.walks.pop(0).scope.cancel()
        w = _Walk(path, self.files_first)
        self.walks.append(w)
        assert self.ra.nursery is not None
        self.ra.nursery.start_soon(self._walk, w)

    async def _walk(self, w: _Walk) -> None:
        budget = self.ra.opts.readahead_max
        try:
            with w.scope:
                await self._walk_files(w, budget)
        except* Exception as eg:  # prefetch is an optimisation: never fatal
            log.warning("directory prefetch stopped: %s", eg.exceptions[0], exc_info=eg)
        finally:
            if w in self.walks:
                self.walks.remove(w)

    async def _walk_files(self, w: _Walk, budget: int) -> None:
        async with trio.open_nursery() as n, contextlib.aclosing(self._files_after(w.start, w.files_first)) as files:
            if w.dir:
                # The walk goes on into the sibling directories: list the parent now, so
                # the lister's walk prefetch lists them (depth x RTT) before we get there.
                n.start_soon(self._listing, parent_of(w.dir))
            batch: list[tuple[bytes, Attrs]] = []
            requests = 0

            async def send_batch() -> None:
                nonlocal requests
                if batch:
                    await self._batches.acquire()
                    n.start_soon(self._fetch_batch, list(batch))
                    batch.clear()
                    requests = 0

            exhausted = False
            while True:
                w.wake = trio.Event()
                # Refill in batches, not a file per file the program opens: a batch
                # costs two sends whatever its size.
                if w.window - len(w.expected) >= min(BATCH_FILES, w.window // 2) and \
                        budget - w.bytes_ahead >= budget // 8:
                    refill = True
                else:
                    refill = not w.expected
                while refill and not exhausted and len(w.expected) < w.window and w.bytes_ahead < budget:
                    item = await anext(files, None)
                    if item is None:
                        exhausted = True
                        break
                    path, a = item
                    size = a.size or 0
                    fetch = 0 < size <= self.max_file
                    w.expected[path] = size if fetch else 0
                    if fetch:
                        w.bytes_ahead += size
                        cost = size // self.ra.max_read + 2  # READs (one past the end) and CLOSE
                        # The files the program reads next go in small batches: a batch
                        # arrives whole, and at zero latency its time grows with its size.
                        most = min(BATCH_FILES, max(FIRST_BATCH_FILES, len(w.expected) - len(batch)))
                        if batch and (len(batch) >= most or requests + cost > BATCH_REQUESTS):
                            await send_batch()
                        batch.append((path, a))
                        requests += cost
                await send_batch()
                if not w.wake.is_set():
                    with trio.move_on_after(WALK_IDLE):
                        await w.wake.wait()
                if trio.current_time() - w.last_hit >= WALK_IDLE:
                    break
            n.cancel_scope.cancel()

    async def _files_after(self, start: bytes, files_first: bool) -> AsyncIterator[tuple[bytes, Attrs]]:
        """Regular files after `start`, depth first, in name order: a directory's files
        and subdirectories interleaved, or (`files_first`) its files, then its
        subdirectories (the order rsync reads in)."""
        d, after = parent_of(start), name_of(start)
        in_start_dir = True
        while True:
            listing = await self._listing(d)
            if files_first:
                if in_start_dir:  # above it, the files were read before we went down
                    for name, a in listing:
                        if a.is_reg and name > after:
                            yield join(d, name), a
                # The start directory's subdirectories, all of them; above it, those
                # after the one the walk came up from.
                for name, a in listing:
                    if a.is_dir and (in_start_dir or name > after):
                        async for item in self._files_below(join(d, name), files_first):
                            yield item
            else:
                for name, a in listing:
                    if name <= after:
                        continue
                    if a.is_dir:
                        async for item in self._files_below(join(d, name), files_first):
                            yield item
                    elif a.is_reg:
                        yield join(d, name), a
            if not d:
                return
            d, after = parent_of(d), name_of(d)
            in_start_dir = False

    async def _files_below(self, d: bytes, files_first: bool,
                           depth: int = 0) -> AsyncIterator[tuple[bytes, Attrs]]:
        if depth > 64:
            return
        listing = await self._listing(d)
        for name, a in listing:
            path = join(d, name)
            if a.is_dir and not files_first:
                async for item in self._files_below(path, files_first, depth + 1):
                    yield item
            elif a.is_reg:
                yield path, a
        if files_first:
            for name, a in listing:
                if a.is_dir:
                    async for item in self._files_below(join(d, name), files_first, depth + 1):
                        yield item

    async def _listing(self, d: bytes) -> list[tuple[bytes, Attrs]]:
        try:
            return await self.ra.vfs.listdir(d)
        except OSError as e:
            log.debug("prefetch: cannot list %r: %s", d, e)
            return []

    async def _fetch_batch(self, items: list[tuple[bytes, Attrs]]) -> None:
        """Fetch small files whole, together: their OPENs in one send, then every READ
        and CLOSE in one send (two round trips for the batch; at zero latency the
        cost is per send, and one per file was most of a prefetch's CPU)."""
        bc = self.ra.blocks
        todo: list[tuple[bytes, Version, list]] = []  # path, version, (key, block or None)
        try:
            wanted: list[tuple[bytes, Version, list[bytes]]] = []
            for path, a in items:
                v = await self.ra.version(path, a)
                if v is None:
                    continue
                keys = [v.block_key(i) for i in range(v.nblocks())]
                if not any(bc.inflight(k) is not None for k in keys) and \
                        not all(bc.available(k, disk=False) for k in keys):
                    wanted.append((path, v, keys))
            present = await bc.on_disk([k for _path, _v, keys in wanted for k in keys])
            for path, v, keys in wanted:
                if all(k in present or bc.available(k, disk=False) for k in keys) or \
                        any(bc.inflight(k) is not None for k in keys):
                    continue  # cached, or fetched by someone else meanwhile
                todo.append((path, v, [(k, bc.begin(k)) for k in keys]))
            if not todo:
                return
            with bc.fetching():
                contents = await self._read_files([(path, v.size) for path, v, _b in todo])
            bs = bc.block_size
            for (path, v, blocks), data in zip(todo, contents, strict=True):
                if data is not None and len(data) == v.size:
                    for i, (k, b) in enumerate(blocks):
                        if b is not None:
                            bc.complete(k, b, data[i * bs:(i + 1) * bs])
                    self.files_prefetched += 1
                elif data is not None:
                    log.debug("prefetch: %r changed since listed (%d bytes, listed %d)",
                              path, len(data), v.size)
                    self.ra.vfs.meta.invalidate(path)  # an open asks the server then
        except Exception as e:  # noqa: BLE001 - a failed prefetch only costs the reader a fetch
            log.debug("prefetch of %d files from %r failed: %s", len(items), items[0][0], e)
        finally:
            for _path, _v, blocks in todo:
                for k, b in blocks:
                    if b is not None and not b.event.is_set():
                        bc.fail(k, b)
            self._batches.release()

    async def _read_files(self, files: list[tuple[bytes, int]]) -> list[bytes | None]:
        """Each file's bytes (None if it cannot be read), asking one byte more than its
        size to notice growth.

        Shielded from OPEN to CLOSE: a handle abandoned half way would stay
        open on the server, and a second CLOSE could hit a reused handle.
        (A dead link still ends it: the session times out.)
        """
        s, slots = await self.bulk.session()
        m = self.ra.max_read
        with trio.CancelScope(shield=True):
            opens = [(p.FXP_OPEN, p.string(self.ra.vfs.rpath(path)), p.u32(p.FXF_READ), p.Attrs().encode())
                     for path, _size in files]
            async with slots.take(len(opens)):
                opened = await s.pipeline(*opens)
            handles = [r.string() if rtype == p.FXP_HANDLE else None for rtype, r in opened]
            reads: list[tuple] = []
            spans: list[tuple[int, int]] = []  # per file: its READs in `reads`
            for (_path, size), h in zip(files, handles, strict=True):
                start = len(reads)
                if h is not None:
                    reads += [(p.FXP_READ, p.string(h), p.u64(off), p.u32(min(m, size + 1 - off)))
                              for off in range(0, size + 1, m)]
                spans.append((start, len(reads)))
            closes = [(p.FXP_CLOSE, p.string(h)) for h in handles if h is not None]
            if not closes:
                return [None] * len(files)
            async with slots.take(len(reads) + len(closes)):
                replies = await s.pipeline(*reads, *closes)
        return [_whole(replies[start:end]) for start, end in spans]


def _whole(replies: list[tuple[int, p.Reader]]) -> bytes | None:
    """A file's bytes from the replies to its READs; None if it could not be read."""
    if not replies:
        return None
    chunks = []
    for rtype, r in replies:
        if rtype == p.FXP_DATA:
            chunks.append(r.string())
        elif rtype == p.FXP_STATUS and r.u32() == p.FX_EOF:
            break
        else:
            return None
    return b"".join(chunks)


class BulkChannel:
    """A second SFTP channel on the same SSH connection, for the directory prefetcher.

    Prefetching small files is bound by requests in flight (OPEN, then READ
    and CLOSE: two round trips a file, however small). On its own channel it
    has its own request slots and its own sftp-server process, so it can keep
    many files in flight without queueing the mount's own requests behind
    them. Until the channel is open (or if the server refuses a second one),
    prefetch uses the main session within the read-ahead share of its slots.
    """

    RETRY_AFTER = 60.0

    def __init__(self, ra: ReadAhead) -> None:
        self.ra = ra
        self._session: SftpSession | None = None
        self._base: SftpSession | None = None  # the main session it shares a transport with
        self._slots = Slots(BULK_SLOTS)
        self._opening = False
        self._retry_at = 0.0

    async def session(self) -> tuple[SftpSession, Slots]:
        main = await self.ra.vfs.remote.session()
        s = self._session
        if s is not None and not s.closed and self._base is main:
            return s, self._slots
        if not self._opening and trio.current_time() >= self._retry_at and self.ra.nursery:
            self._opening = True
            self.ra.nursery.start_soon(self._open, main)
        return main, self.ra.blocks.readahead_slots

    async def _open(self, main: SftpSession) -> None:
        try:
            transport = main.chan.get_transport()
            s = await SftpSession.start(transport, request_timeout=main.request_timeout,
                                        max_inflight=BULK_SLOTS + 8)
        except Exception as e:  # noqa: BLE001 - then prefetch shares the main session
            log.info("no second SFTP channel for prefetching (%s); using the main one", e)
            self._retry_at = trio.current_time() + self.RETRY_AFTER
            return
        finally:
            self._opening = False
        old, self._session, self._base = self._session, s, main
        if old is not None:
            old.close("replaced")
        log.debug("prefetch channel open")

    def close(self) -> None:
        if self._session is not None:
            self._session.close("unmounting")
            self._session = None
