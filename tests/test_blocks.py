"""Block cache and read-ahead logic, without a server: fake sources, a real diskcache."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
import time
from pathlib import Path

import pytest
import trio

from sftpfs.options import OptionError, build_config, parse_size
from sftpfs.remote.protocol import Attrs
from sftpfs.vfs import blocks as blocks_mod
from sftpfs.vfs import epochlog
from sftpfs.vfs.blocks import BlockCache, Version, default_cache_size, read_stats
from sftpfs.vfs.readahead import INITIAL_WINDOW, DirPrefetcher, ReadAhead, Reader, ReadOptions

BS = blocks_mod.BLOCK_SIZE


class Source:
    """A file on a fake server: counts and records READs."""

    def __init__(self, data: bytes, *, short: int | None = None, delay: float = 0.0) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.short = short  # at most this many bytes per reply (like a server's short reads)
        self.delay = delay

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        n = length if self.short is None else min(length, self.short)
        return self.data[offset:offset + n]


def version(data: bytes, path: bytes = b"f", mtime: int = 1000) -> Version:
    return Version(path, len(data), mtime)


# ---------------------------------------------------------------- pure helpers


def test_version_keys_differ_by_every_part():
    base = Version(b"a/b", 10, 5, 0)
    others = [Version(b"a/c", 10, 5, 0), Version(b"a/b", 11, 5, 0), Version(b"a/b", 10, 6, 0),
              Version(b"a/b", 10, 5, 1)]
    keys = {base.key} | {v.key for v in others}
    assert len(keys) == 5
    assert base == Version(b"a/b", 10, 5, 0) and base.key == Version(b"a/b", 10, 5, 0).key
    assert base.block_key(0) != base.block_key(1)


def test_block_geometry():
    v = Version(b"f", 2 * BS + 5, 1)
    assert v.nblocks(BS) == 3
    assert [v.block_len(i, BS) for i in range(4)] == [BS, BS, 5, 0]
    assert Version(b"f", 0, 1).nblocks(BS) == 0


@pytest.mark.parametrize("text,want", [("4096", 4096), ("64k", 65536), ("500M", 500 * 2**20),
                                       ("2G", 2 * 2**30), ("1.5g", int(1.5 * 2**30)),
                                       ("10MiB", 10 * 2**20), ("0", 0)])
def test_parse_size(text, want):
    assert parse_size("cache_size", text) == want


@pytest.mark.parametrize("text", ["", "big", "-1G", "5X", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError, match="cache_size"):
        parse_size("cache_size", text)


def test_size_options_reach_the_config():
    cfg = build_config("h:/p", "/mnt", options=["cache_size=2G,readahead_max=8M,small_file=64k"])
    assert (cfg.cache_size, cfg.readahead_max, cfg.small_file) == (2 * 2**30, 8 * 2**20, 65536)
    assert build_config("h:/p", "/mnt").cache_size is None


def test_default_cache_size_respects_free_space(tmp_path):
    size = default_cache_size(tmp_path)
    free = shutil.disk_usage(tmp_path).free
    assert blocks_mod.DEFAULT_CACHE_MIN <= size <= blocks_mod.DEFAULT_CACHE_MAX
    assert size <= max(free // 10, blocks_mod.DEFAULT_CACHE_MIN)
    # a directory that does not exist yet: its parent's free space counts
    assert default_cache_size(tmp_path / "not" / "yet") == size


# ---------------------------------------------------------------- BlockCache


async def _with_cache(directory, fn, **kw):
    bc = BlockCache(directory, kw.pop("size_limit", 64 * 2**20), **kw)
    async with trio.open_nursery() as n:
        await n.start(bc.run)
        try:
            return await fn(bc)
        finally:
            n.cancel_scope.cancel()


async def _get_range(bc: BlockCache, v: Version, src, offset: int, size: int, max_read: int) -> bytes:
    end = min(offset + size, v.size)
    first, last = offset // BS, (end - 1) // BS
    bc.fetch(v, first, last, src.read, max_read, demand=True)
    parts = [await bc.get(v.block_key(i)) for i in range(first, last + 1)]
    assert all(p is not None for p in parts)
    return b"".join(parts)[offset - first * BS: offset - first * BS + end - offset]


async def test_disk_writes_wait_for_reads_to_pause(tmp_path, monkeypatch):
    """Writing blocks to disk competes with the reader for the CPU: a tree copied out
    of the mount at zero latency took a quarter longer with writes between fetches."""
    quiet = 1.0
    monkeypatch.setattr(blocks_mod, "WRITE_QUIET", quiet)

    async def body(bc):
        key = b"k" * 24
        with bc.fetching():
            bc.put(key, b"x" * 1000)
            await trio.sleep(quiet / 2)
            assert key in bc._queued  # blocks are arriving: not yet
        await trio.sleep(quiet / 4)
        assert key in bc._queued  # a moment after: more may come
        with trio.fail_after(5):
            while key in bc._queued:
                await trio.sleep(0.01)
        assert bc.disk.contains(key)

    await _with_cache(tmp_path / "blocks", body)


async def test_disk_writer_catches_up_while_reads_go_on(tmp_path, monkeypatch):
    """Past WRITE_EAGER_BYTES the writer writes while blocks still arrive, down to
    WRITE_CATCH_UP_TO. With the mark at the queue's limit, the queue sat just below
    it, nothing was written, and every new block missed the disk."""
    assert blocks_mod.WRITE_CATCH_UP_TO < blocks_mod.WRITE_EAGER_BYTES < blocks_mod.WRITE_QUEUE_BYTES
    monkeypatch.setattr(blocks_mod, "WRITE_QUEUE_BYTES", 10_000)
    monkeypatch.setattr(blocks_mod, "WRITE_EAGER_BYTES", 8_000)
    monkeypatch.setattr(blocks_mod, "WRITE_CATCH_UP_TO", 3_000)

    async def body(bc):
        keys = [b"%024d" % i for i in range(40)]
        with bc.fetching():  # one long read: no pause at all
            for key in keys:
                bc.put(key, b"x" * 1500)  # six fit below the limit, the seventh would not
                await trio.sleep(0.02)
            assert bc.stats["dropped"] == 0
        with trio.fail_after(5):
            while bc._queued:
                await trio.sleep(0.01)
        assert all(bc.disk.contains(k) for k in keys)

    await _with_cache(tmp_path / "blocks", body)


async def test_an_empty_disk_cache_is_not_asked(tmp_path, monkeypatch):
    """A cold cache costs no lookups (SQLite queries, some on the event loop) until
    something is stored; a cache that had blocks when opened is asked as always."""
    asked: list[str] = []
    usable = blocks_mod.Disk._usable

    def counting(self, *, check=False):
        asked.append("write" if check else "read")
        return usable(self, check=check)

    monkeypatch.setattr(blocks_mod.Disk, "_usable", counting)
    monkeypatch.setattr(blocks_mod, "WRITE_QUIET", 0.01)
    key = b"k" * 24

    async def cold(bc):
        asked.clear()  # (opening reads the epochs)
        assert not bc.available(key) and await bc.on_disk([key]) == set()
        assert await bc.get(key) is None
        assert asked == []  # found empty when opened: nobody asked the database
        bc.put(key, b"x" * 100)
        with trio.fail_after(5):
            while bc._queued:
                await trio.sleep(0.01)
        bc._mem.clear()
        assert bc.available(key) and await bc.get(key) == b"x" * 100

    await _with_cache(tmp_path / "blocks", cold)
    asked.clear()

    async def warm(bc):
        asked.clear()
        assert bc.available(key)
        assert "read" in asked

    await _with_cache(tmp_path / "blocks", warm)


async def test_fetch_assembles_blocks_exactly(tmp_path):
    data = random.Random(1).randbytes(3 * BS + 1234)
    src = Source(data)
    v = version(data)

    async def body(bc):
        rng = random.Random(2)
        for _ in range(200):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 300_000)
            assert await _get_range(bc, v, src, off, n, 100_000) == data[off:off + n]
        # requests are never larger than max_read, and every block was fetched once
        assert max(n for _o, n in src.reads) <= 100_000
        assert sum(n for _o, n in src.reads) == len(data)

    await _with_cache(tmp_path / "blocks", body)


async def test_short_reads_are_completed(tmp_path):
    data = os.urandom(BS + 777)
    src = Source(data, short=10_000)
    v = version(data)
    got = await _with_cache(tmp_path / "b", lambda bc: _get_range(bc, v, src, 0, len(data), 65536))
    assert got == data


async def test_concurrent_readers_share_one_fetch(tmp_path):
    data = os.urandom(4 * BS)
    src = Source(data, delay=0.05)
    v = version(data)

    async def body(bc):
        results = []

        async def reader():
            results.append(await _get_range(bc, v, src, 0, len(data), 65536))

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(reader)
        assert results == [data] * 5
        assert sum(n for _o, n in src.reads) == len(data)  # fetched once, not five times

    await _with_cache(tmp_path / "b", body)


async def test_file_shorter_than_its_version_fails_instead_of_caching(tmp_path):
    data = os.urandom(BS + 100)
    src = Source(data[:BS + 50])  # the file shrank on the server
    v = version(data)

    async def body(bc):
        bc.fetch(v, 0, 1, src.read, 65536, demand=True)
        assert await bc.get(v.block_key(1)) is None  # failed: the reader goes to the server
        assert not bc.available(v.block_key(1))

    await _with_cache(tmp_path / "b", body)


async def test_blocks_persist_across_instances_and_count_hits(tmp_path):
    d = tmp_path / "blocks"
    data = os.urandom(2 * BS + 10)
    v = version(data)
    await _with_cache(d, lambda bc: _get_range(bc, v, Source(data), 0, len(data), 65536))
    src = Source(b"")  # a second mount must not need the server at all

    async def body(bc):
        assert all(bc.available(v.block_key(i)) for i in range(3))
        return await _get_range(bc, v, src, 0, len(data), 65536)

    assert await _with_cache(d, body) == data
    assert src.reads == []
    st = read_stats(d)
    assert st["misses"] == 3 and st["hits"] == 3
    assert st["fetched_bytes"] == st["hit_bytes"] == len(data)
    # another version of the same path: nothing is served for it
    v2 = Version(v.path, v.size, v.mtime + 1)

    async def other(bc):
        return [bc.available(v2.block_key(i)) for i in range(3)]

    assert await _with_cache(d, other) == [False, False, False]


async def test_size_limit_is_respected(tmp_path):
    import diskcache

    d = tmp_path / "blocks"
    limit = 6 * BS

    async def body(bc):
        for i in range(300):  # many small blocks, then large ones: 3.5 limits in all
            data = os.urandom(20_000)
            v = Version(b"s%d" % i, len(data), 1)
            await _get_range(bc, v, Source(data), 0, len(data), 65536)
        for i in range(15):
            data = os.urandom(BS)
            v = Version(b"f%d" % i, BS, 1)
            await _get_range(bc, v, Source(data), 0, BS, 65536)
            await trio.sleep(0.01)

    await _with_cache(d, body, size_limit=limit)
    with diskcache.Cache(str(d)) as c:
        assert c.volume() <= limit + 2 * BS
        assert 3 <= len(c) < 315


async def test_removed_directory_falls_back_with_one_warning(tmp_path, caplog):
    d = tmp_path / "blocks"
    data = os.urandom(BS * 2)
    caplog.set_level(logging.WARNING, logger="sftpfs.vfs.blocks")

    async def body(bc):
        v = version(data)
        assert await _get_range(bc, v, Source(data), 0, len(data), 65536) == data
        await trio.sleep(0.2)  # written
        shutil.rmtree(d)
        bc.disk._last_check = 0
        bc._mem.clear()
        # on disk no more: a miss (None), never an exception
        assert await bc.get(v.block_key(0)) is None
        for i in range(5):
            v2 = Version(b"g%d" % i, len(data), 1)
            assert await _get_range(bc, v2, Source(data), 0, len(data), 65536) == data
            bc.disk._last_check = 0

    await _with_cache(d, body)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "removed" in warnings[0].getMessage()
    assert d.exists()  # recreated (private) for the rest of the mount
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


async def test_full_disk_falls_back_with_one_warning(tmp_path, caplog, monkeypatch):
    import diskcache

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Cache, "set", full)
    caplog.set_level(logging.WARNING, logger="sftpfs.vfs.blocks")
    data = os.urandom(3 * BS)

    async def body(bc):
        for i in range(4):
            v = Version(b"f%d" % i, len(data), 1)
            assert await _get_range(bc, v, Source(data), 0, len(data), 65536) == data
            await trio.sleep(0.05)

    await _with_cache(tmp_path / "b", body)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "disk is full" in msgs[0]


async def test_disk_disabled_still_reads(tmp_path):
    data = os.urandom(BS + 1)
    v = version(data)
    assert await _with_cache(None, lambda bc: _get_range(bc, v, Source(data), 0, len(data), 4096)) \
        == data


async def test_epochs_persist(tmp_path):
    d = tmp_path / "blocks"

    async def bump(bc):
        assert await bc.epoch(b"x") == 0
        bc.bump(b"x")
        return await bc.epoch(b"x")

    e = await _with_cache(d, bump)
    assert e > 0

    async def read(bc):
        return await bc.epoch(b"x"), await bc.epoch(b"y")

    assert await _with_cache(d, read) == (e, 0)


def test_epoch_log_records_survive_any_name_and_a_torn_end(tmp_path):
    log = epochlog.EpochLog(tmp_path)
    names = [b"plain", b"with space", b"new\nline", b"\xff\xfe latin", b"a/b/c"]
    for i, n in enumerate(names):
        log.append(n, 10**18 + i)
    with open(log.path, "ab") as f:
        f.write(b"123 torn-by-a-cras")  # no terminator: the writer died mid-record
    os.close(log.fd)  # the mount is gone, without folding: nobody holds the log now
    records, held = epochlog.recover(tmp_path)
    assert records == [(n, 10**18 + i) for i, n in enumerate(names)]
    epochlog.release(held, done=True)
    assert not list(tmp_path.iterdir())


def test_epoch_log_of_a_live_mount_is_read_not_taken(tmp_path):
    live = epochlog.EpochLog(tmp_path)
    live.append(b"x", 1)
    # another mount starting beside it learns x's epoch, and leaves the log alone
    assert epochlog.recover(tmp_path) == ([(b"x", 1)], [])
    assert live.path.exists()
    live.append(b"y", 2)
    live.restart([(b"y", 2)])  # x is in the Index now; y is not
    assert epochlog.parse(live.path.read_bytes()) == [(b"y", 2)]
    assert len(list(tmp_path.iterdir())) == 1
    live.close(folded=False)
    records, held = epochlog.recover(tmp_path)
    epochlog.release(held, done=True)
    assert records == [(b"y", 2)]


def test_a_late_fold_never_undoes_a_newer_epoch(tmp_path):
    """A crashed mount's log folded after another mount stored a newer epoch."""
    disk = blocks_mod.Disk(tmp_path / "blocks", 2**20)
    assert disk.set_epochs([(b"p", 200)])
    assert disk.set_epochs([(b"p", 100), (b"q", 5)])
    assert (disk.epoch(b"p"), disk.epoch(b"q")) == (200, 5)
    disk.close()


async def test_a_mount_starting_beside_another_knows_its_epochs(tmp_path):
    d = tmp_path / "blocks"

    async def both(a):
        a.bump(b"x")
        mine = await a.epoch(b"x")
        # mount b starts while a runs, before a folded anything into the Index
        return mine, await _with_cache(d, lambda b: b.epoch(b"x"))

    mine, theirs = await _with_cache(d, both)
    assert theirs == mine > 0


async def test_epoch_log_follows_a_recreated_cache_directory(tmp_path):
    """rm -rf of the cache while mounted: the log went with it; the next bump starts
    one in the new directory with every epoch not yet in the (new) Index."""
    d = tmp_path / "blocks"

    async def body(bc):
        bc.bump(b"a")
        shutil.rmtree(d)
        assert bc.disk._usable(check=True) is not None  # what the next disk write does
        bc.bump(b"b")
        logs = list(d.glob("epochs-*.log"))
        assert len(logs) == 1
        assert {p for p, _e in epochlog.parse(logs[0].read_bytes())} == {b"a", b"b"}

    await _with_cache(d, body)


async def test_epochs_are_logged_and_folded_in_batches(tmp_path, monkeypatch):
    """A bump costs a log append; the Index gets them EPOCH_BATCH at a time and at the end."""
    monkeypatch.setattr(blocks_mod, "EPOCH_BATCH", 50)
    d = tmp_path / "blocks"
    commits = []
    real = blocks_mod.Disk.set_epochs

    def counted(self, items):
        commits.append(len(items))
        return real(self, items)

    monkeypatch.setattr(blocks_mod.Disk, "set_epochs", counted)

    async def bump(bc):
        for i in range(120):
            bc.bump(b"f%d" % i)
            await trio.sleep(0)
        await trio.sleep(0.2)
        assert commits and all(n >= 50 for n in commits)
        assert len(epochlog.parse(next(d.glob("epochs-*.log")).read_bytes())) < 50
        return [await bc.epoch(b"f%d" % i) for i in range(120)]

    made = await _with_cache(d, bump)
    assert sum(commits) == 120 and not list(d.glob("epochs-*.log"))

    async def read(bc):
        return [await bc.epoch(b"f%d" % i) for i in range(120)]

    assert await _with_cache(d, read) == made


async def test_renamed_directory_makes_new_versions_below(tmp_path):
    """`mv a b` here: b/x is another file than the b/x read before, even with the
    same size and mtime; its blocks must not be served for it."""
    async def rename(bc):
        before = await bc.epoch(b"b/sub/x")
        bc.bump(b"b")  # what Vfs.rename does to the new name
        return before, await bc.epoch(b"b/sub/x"), await bc.epoch(b"b"), await bc.epoch(b"bb/x")

    before, below, top, other = await _with_cache(tmp_path / "blocks", rename)
    assert before == 0 and below == top > 0 and other == 0


async def test_cancelled_run_fails_its_blocks(tmp_path):
    data = os.urandom(2 * BS)
    v = version(data)
    src = Source(data, delay=10)

    async def body(bc):
        scopes: set = set()
        bc.fetch(v, 0, 1, src.read, 65536, demand=False, scopes=scopes)
        await trio.sleep(0.05)
        assert scopes
        for s in list(scopes):
            s.cancel()
        with trio.fail_after(2):
            assert await bc.get(v.block_key(0)) is None
        assert not scopes

    await _with_cache(tmp_path / "b", body)


# ---------------------------------------------------------------- Reader


class FakeRemoteFile:
    def __init__(self, src: Source, attrs: Attrs) -> None:
        self.src = src
        self.attrs = attrs
        self.opened = 0

    async def read(self, offset: int, length: int, *, view: bool = False) -> bytes | memoryview:
        data = await self.src.read(offset, length)
        return memoryview(data) if view else data

    @property
    def is_open(self) -> bool:
        return self.opened > 0

    async def open(self) -> Attrs:
        self.opened += 1
        return self.attrs

    async def fstat(self) -> Attrs:
        return self.attrs

    async def close(self) -> None:
        pass


class FakeFile:
    def __init__(self, path: bytes, remote: FakeRemoteFile) -> None:
        self.path = path
        self.remote = remote
        self.writable = False
        self.keep_cache = False
        self.direct: list[tuple[int, int]] = []

    async def read_direct(self, offset: int, size: int) -> bytes:
        self.direct.append((offset, size))
        return self.remote.src.data[offset:offset + size]


class FakeMeta:
    def __init__(self) -> None:
        self.attrs_: dict[bytes, Attrs] = {}
        self.listings: dict[bytes, list[tuple[bytes, Attrs]]] = {}

    def attrs(self, path):
        return self.attrs_.get(path)

    def put_attrs(self, path, a):
        self.attrs_[path] = a

    def invalidate(self, path):
        self.attrs_.pop(path, None)


class FakeRemote:
    io_sizes = (65536, 65536)


class FakeVfs:
    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self.meta = FakeMeta()
        self.remote = FakeRemote()
        self.open_files: set = set()
        self.listed: list[bytes] = []

    async def listdir(self, path):
        self.listed.append(path)
        return self.meta.listings.get(path, [])

    def rpath(self, path):
        return b"/srv/" + path

    async def settle_for_server(self, path):
        pass


OLD = int(time.time()) - 100


def reg(size: int, mtime: int = OLD) -> Attrs:
    return Attrs(size=size, mode=0o100644, mtime=mtime)


async def _with_readahead(tmp_path, fn, **opts):
    vfs = FakeVfs(tmp_path)
    ra = ReadAhead(vfs, ReadOptions(**opts))
    async with trio.open_nursery() as n:
        await n.start(ra.run)
        try:
            return await fn(vfs, ra)
        finally:
            n.cancel_scope.cancel()


def _reader(ra, data: bytes, path=b"d/f", *, local=False, attrs=None):
    src = Source(data)
    a = attrs or reg(len(data))
    f = FakeFile(path, FakeRemoteFile(src, a))
    v = Version(path, len(data), a.mtime)
    return Reader(ra, f, v, local=local), src, f


async def test_sequential_reads_grow_the_window_and_random_resets_it(tmp_path):
    data = random.Random(3).randbytes(16 * BS)
    ra_max = 2 * BS

    async def body(vfs, ra):
        r, src, f = _reader(ra, data)
        windows = []
        end = 3 * BS
        for off in range(0, end, 131072):
            assert await r.read(off, 131072) == data[off:off + 131072]
            windows.append(r.window)
        assert windows == sorted(windows) and windows[-1] == ra_max
        assert r.ra_next * BS >= end + ra_max  # read-ahead scheduled beyond what was read
        await trio.sleep(0.1)
        fetched = sum(n for _o, n in src.reads)
        assert end + ra_max <= fetched <= end + ra_max + BS
        # a jump far away: the window starts over; a first touch reads just what it asks
        off = 12 * BS + 5
        assert await r.read(off, 4096) == data[off:off + 4096]
        assert r.window == INITIAL_WINDOW and r.ra_next == 0
        assert f.direct == [(off, 4096)]
        assert not ra.blocks.available(r.version.block_key(12))
        off2 = 12 * BS + 700_000  # touched again: now it is worth a block
        assert await r.read(off2, 4096) == data[off2:off2 + 4096]
        assert ra.blocks.available(r.version.block_key(12)) and len(f.direct) == 1
        assert await r.read(len(data) - 10, 4096) == data[-10:]  # across the end: short
        assert await r.read(len(data) + 10, 4096) == b""

    await _with_readahead(tmp_path, body, readahead_max=ra_max)


async def test_small_file_is_fetched_whole_on_first_read(tmp_path):
    data = os.urandom(BS + 1000)

    async def body(vfs, ra):
        r, src, _f = _reader(ra, data)
        assert await r.read(0, 4096) == data[:4096]
        await trio.sleep(0.05)
        assert sum(n for _o, n in src.reads) == len(data)
        assert await r.read(BS, 1000) == data[BS:BS + 1000]

    await _with_readahead(tmp_path, body, small_file=2 * BS)


async def test_local_open_that_turns_out_stale_reads_the_new_version(tmp_path):
    old = os.urandom(1000)
    new = os.urandom(1500)

    async def body(vfs, ra):
        # opened locally as `old`, but the block is not there and the server has `new`
        r, src, f = _reader(ra, new, local=True, attrs=reg(1500, OLD + 5))
        r.version = Version(b"d/f", len(old), OLD)
        assert await r.read(0, 4096) == new
        assert f.remote.opened == 1 and r.version.size == 1500
        assert vfs.meta.attrs(b"d/f").size == 1500

    await _with_readahead(tmp_path, body)


async def test_stale_after_data_was_served_is_estale(tmp_path):
    data = os.urandom(3 * BS)

    async def body(vfs, ra):
        r, src, f = _reader(ra, data, local=True, attrs=reg(len(data), OLD + 5))
        r.version = Version(b"d/f", len(data), OLD)
        r.served = True
        with pytest.raises(OSError) as e:
            await r.read(0, 100)
        assert e.value.errno == errno.ESTALE

    await _with_readahead(tmp_path, body)


async def test_reads_bypass_the_cache_while_a_writer_is_open(tmp_path):
    data = os.urandom(5000)

    async def body(vfs, ra):
        r, src, f = _reader(ra, data)
        writer = FakeFile(b"d/f", None)
        writer.writable = True
        vfs.open_files.add(writer)
        assert await r.read(0, 100) == data[:100]
        assert f.direct == [(0, 100)] and src.reads == []
        vfs.open_files.discard(writer)
        assert await r.read(0, 100) == data[:100]
        assert f.direct == [(0, 100)]

    await _with_readahead(tmp_path, body)


async def test_versions_are_not_trusted_while_mtime_is_recent(tmp_path):
    async def body(vfs, ra):
        assert await ra.version(b"a", reg(10, int(time.time()))) is None
        assert await ra.version(b"a", reg(10)) is not None
        assert await ra.version(b"a", Attrs(size=1, mode=0o040755, mtime=OLD)) is None
        v1 = await ra.version(b"a", reg(10))
        ra.changed(b"a")  # written through this mount: a new epoch, a new version
        v2 = await ra.version(b"a", reg(10))
        assert v1 != v2 and v1.key != v2.key

    await _with_readahead(tmp_path, body)


# ---------------------------------------------------------------- directory walks


def _tree(vfs: FakeVfs) -> None:
    d = Attrs(size=4096, mode=0o040755, mtime=OLD)
    vfs.meta.listings[b""] = [(b"a", d), (b"b", d), (b"z.txt", reg(5))]
    vfs.meta.listings[b"a"] = [(b"f1", reg(1)), (b"f2", reg(2)), (b"sub", d), (b"x", reg(3))]
    vfs.meta.listings[b"a/sub"] = [(b"s1", reg(4))]
    vfs.meta.listings[b"b"] = [(b"big", reg(10 * 2**20)), (b"g1", reg(6))]


async def test_walk_orders(tmp_path):
    async def body(vfs, ra):
        _tree(vfs)
        pf = ra.prefetcher
        # cp -r, tar, grep -r: by name, files and subdirectories interleaved
        got = [p async for p, _a in pf._files_after(b"a/f1", False)]
        assert got == [b"a/f2", b"a/sub/s1", b"a/x", b"b/big", b"b/g1", b"z.txt"]
        # rsync: a directory's files, then its subdirectories (z.txt came before a/)
        got = [p async for p, _a in pf._files_after(b"a/f1", True)]
        assert got == [b"a/f2", b"a/x", b"a/sub/s1", b"b/big", b"b/g1"]

    await _with_readahead(tmp_path, body)


async def test_walk_starts_on_files_opened_in_name_order(tmp_path, monkeypatch):
    fetched: list[bytes] = []

    async def fake_fetch(self, items):
        fetched.extend(path for path, _a in items)
        self._batches.release()

    monkeypatch.setattr(DirPrefetcher, "_fetch_batch", fake_fetch)

    async def body(vfs, ra):
        _tree(vfs)
        pf = ra.prefetcher
        pf.reading(b"a/f1")
        await trio.sleep(0.05)
        assert fetched == [] and not pf.walks  # one open is not a walk
        pf.reading(b"a/f2")
        await trio.sleep(0.05)
        assert len(pf.walks) == 1
        # the next files in rsync's order, small ones only (b/big is skipped)
        assert fetched == [b"a/x", b"a/sub/s1", b"b/g1"]
        pf.reading(b"a/x")  # predicted: a hit, the walk goes on
        assert pf.walks[0].window == 16
        assert b"" in vfs.listed  # the parent was listed for the sibling directories

    await _with_readahead(tmp_path, body)


async def test_walk_order_is_learnt_from_the_program(tmp_path, monkeypatch):
    fetched: list[list[bytes]] = []

    async def fake_fetch(self, items):
        fetched.append([path for path, _a in items])
        self._batches.release()

    monkeypatch.setattr(DirPrefetcher, "_fetch_batch", fake_fetch)

    async def body(vfs, ra):
        _tree(vfs)
        pf = ra.prefetcher
        for path in (b"a/f1", b"a/f2", b"a/sub/s1"):  # either order so far
            pf.reading(path)
            await trio.sleep(0.05)
        assert pf.files_first
        pf.reading(b"a/x")  # back in a after a/sub: by name, as cp -r
        await trio.sleep(0.05)
        assert not pf.files_first and len(pf.walks) == 1 and not pf.walks[0].files_first
        assert fetched[-1] == [b"b/g1", b"z.txt"]  # the walk went on from a/x by name
        for path in (b"a/f1", b"a/f2", b"a/x"):
            pf.reading(path)
        pf.reading(b"a/sub/s1")  # into a/sub after a/x: files first, as rsync
        assert pf.files_first and pf.walks[0].files_first

    await _with_readahead(tmp_path, body)


async def test_first_batches_of_a_walk_are_small(tmp_path, monkeypatch):
    """A batch arrives whole: the files the program wants next must not wait for 16."""
    sizes: list[int] = []

    async def fake_fetch(self, items):
        sizes.append(len(items))
        self._batches.release()

    monkeypatch.setattr(DirPrefetcher, "_fetch_batch", fake_fetch)

    async def body(vfs, ra):
        vfs.meta.listings[b""] = [(b"f%02d" % i, reg(100)) for i in range(60)]
        pf = ra.prefetcher
        for i in range(6):
            pf.reading(b"f%02d" % i)
            await trio.sleep(0.02)
        assert sizes[:3] == [2, 3, 3] and max(sizes) <= 16 and sum(sizes) == 60 - 2

    await _with_readahead(tmp_path, body)


async def test_no_walk_for_opens_out_of_order(tmp_path, monkeypatch):
    monkeypatch.setattr(DirPrefetcher, "_start", lambda self, p: pytest.fail("walk started"))

    async def body(vfs, ra):
        _tree(vfs)
        ra.prefetcher.reading(b"a/x")
        ra.prefetcher.reading(b"a/f1")
        ra.prefetcher.reading(b"b/g1")

    await _with_readahead(tmp_path, body)


async def test_recent_file_reads_ahead_into_memory_only(tmp_path):
    data = os.urandom(3 * BS + 5)

    async def body(vfs, ra):
        src = Source(data)
        a = reg(len(data), int(time.time()))  # modified just now: not a trusted version
        f = FakeFile(b"d/new", FakeRemoteFile(src, a))
        await ra.opened(f, a)
        assert f.reader is not None and not f.reader.version.persist and not f.keep_cache
        got = bytearray()
        for off in range(0, len(data), 131072):
            got += await f.reader.read(off, 131072)
        assert got == data
        assert len(src.reads) > 3 and f.direct == []  # read ahead in big requests
        await trio.sleep(0.1)
        assert not ra.blocks._queue and not ra.blocks._queued  # nothing for the disk
        f2 = FakeFile(b"d/new", FakeRemoteFile(src, a))
        await ra.opened(f2, a)
        assert f2.reader.version.key != f.reader.version.key  # not shared with a later open

    await _with_readahead(tmp_path, body)


async def test_slots_taken_several_at_a_time_do_not_deadlock():
    from sftpfs.slots import Slots

    pool = Slots(4)
    done = []

    async def user(i: int) -> None:
        async with pool.take(1):  # like a prefetch: one slot for OPEN...
            await trio.sleep(0.001)
        async with pool.take(3):  # ...then READs and CLOSE together
            await trio.sleep(0.001)
            done.append(i)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(user, i)
    assert sorted(done) == list(range(40))
    async with pool.take(10):  # more than there are: all of them
        assert pool._sem.value == 0
    assert pool._sem.value == 4
