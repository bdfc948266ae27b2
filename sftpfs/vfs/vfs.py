"""The local view of the remote tree: server state as cached, plus our changes.

Path-based (bytes relative to the mount root, b"" is the root); the fs layer
above maps inodes to paths. Every change goes to the server first and then
updates the cache, so the view never shows what the server refused.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import trio

from ..remote import protocol as p
from ..remote.client import Remote
from ..remote.errors import SftpError
from .deferred import Deferred
from .files import OpenFile, open_flags_to_pflags
from .lister import Lister
from .meta import MetaCache, is_below, join, parent_of
from .metastore import MetaStore
from .readahead import ReadAhead, ReadOptions
from .writeback import WriteBack, claim_slot

log = logging.getLogger(__name__)

NAME_MAX = 255


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


def _applied(a: p.Attrs, ch: p.Attrs) -> p.Attrs:
    """Attributes after a successful SETSTAT of `ch`."""
    mode = a.mode if ch.mode is None else (a.mode or 0) & ~0o7777 | ch.mode
    return p.Attrs(size=a.size if ch.size is None else ch.size,
                   uid=a.uid if ch.uid is None else ch.uid, gid=a.gid if ch.gid is None else ch.gid,
                   mode=mode, atime=a.atime if ch.atime is None else ch.atime,
                   mtime=a.mtime if ch.mtime is None else ch.mtime)


class _Control:
    """The control socket's view of write-back (see control.ControlHandler)."""

    def __init__(self, wb: WriteBack) -> None:
        self.wb = wb

    def status(self) -> dict:
        return self.wb.status()

    async def sync(self, progress) -> dict:
        ok = await self.wb.sync_all(progress)  # ok: nothing failed during this sync
        return {**self.wb.status(), "ok": ok}


class Vfs:
    def __init__(self, remote: Remote, root: bytes, *, meta_ttl: float, readonly: bool = False,
                 cache_dir: Path | None = None, max_stale: float = 0.0,
                 prefetch: int = 32, reads: ReadOptions | None = None) -> None:
        self.remote = remote
        self.root = root.rstrip(b"/")
        self.cache_dir = cache_dir  # private (0700) directory of this remote tree
        self.meta = MetaCache(meta_ttl)
        store = MetaStore(cache_dir) if cache_dir is not None and max_stale > meta_ttl else None
        self.lister = Lister(self._list_remote, self.meta, store, max_stale=max_stale,
                             prefetch=prefetch, before_listing=self.settle_for_server,
                             unsettled=self._unsettled)
        self.readonly = readonly
        self.open_files: set[OpenFile] = set()
        self.reads = ReadAhead(self, reads)  # block cache, read-ahead, directory prefetch
        self.deferred: Deferred | None = None  # write-back mode, see enable_writeback
        self.nursery: trio.Nursery  # set by run()

    def control_handler(self) -> _Control | None:
        """What `sftpfs sync` and `status` talk to (control.py); None without write-back."""
        return _Control(self.deferred.wb) if self.deferred is not None else None

    def enable_writeback(self, **options) -> WriteBack:
        """Changes return at once and are uploaded in the background (deferred.py)."""
        assert self.cache_dir is not None
        directory = claim_slot(self.cache_dir / "writeback")
        wb = WriteBack(self.remote, self.rpath, self.meta, directory, **options)
        self.deferred = Deferred(self, wb)
        return wb

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the background tasks (write completions, listings) until cancelled."""
        async with trio.open_nursery() as n:
            self.nursery = n
            await n.start(self.lister.run)
            self.lister.warm_up()
            await n.start(self.reads.run)
            if self.deferred is not None:
                await n.start(self.deferred.wb.run)
            task_status.started()
            await trio.sleep_forever()

    async def _list_remote(self, path: bytes) -> list[tuple[bytes, p.Attrs]]:
        return await self.remote.listdir(self.rpath(path))

    async def settle_for_server(self, path: bytes) -> None:
        """Before asking the server about `path`: our pending changes to it or above it
        must be there first, else it answers about the old tree (ENOENT below a renamed
        directory whose rename is still queued)."""
        if self._unsettled(path):
            assert self.deferred is not None
            await self.deferred.wb.settle(path, patient=False)

    def rpath(self, path: bytes) -> bytes:
        return self.root + b"/" + path if path else (self.root or b"/")

    def _check_write(self, path: bytes | None = None) -> None:
        if self.readonly:
            raise _err(errno.EROFS)
        if path is not None and len(path.rpartition(b"/")[2]) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)

    # ---- reading the tree -----------------------------------------------------------

    async def getattr(self, path: bytes) -> p.Attrs:
        a = self.meta.attrs(path)
        if a is not None:
            return a
        if self.meta.absent(path):
            raise _err(errno.ENOENT)
        if self.deferred is not None and self.meta.pinned(path):
            return await self._pinned_attrs(path)
        if len(path.rpartition(b"/")[2]) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if path and self._unsettled(parent_of(path)):
            a = self.meta.attrs(path, max_age=float("inf"))
            if a is not None:
                return a
            # A name missing from an old listing may be someone else's new file by
            # now, which a create here would overwrite: that takes the server.
        if path and await self.lister.usable(parent_of(path)):
            # The parent's listing answers, stale or not (then it is being revalidated).
            a = self.meta.attrs(path, max_age=self.lister.max_stale)
            if a is not None:
                return a
            if self.meta.absent(path, max_age=self.lister.max_stale):
                raise _err(errno.ENOENT)
        if path:
            self.lister.looked_up(parent_of(path))
        await self.settle_for_server(path)
        since = self.meta.mark()
        try:
            a = await self.remote.lstat(self.rpath(path))
        except SftpError as e:
            if e.errno == errno.ENOENT and not self.meta.changed_since(path, since):
                self.meta.put_absent(path)
            raise
        self.meta.put_attrs_if_unchanged(path, a, since)
        return a

    async def known_attrs(self, path: bytes) -> p.Attrs:
        """Attributes of any age: enough for a listing's "..", of which the kernel
        uses the type (an expired parent cost every opendir a round trip)."""
        return self.meta.attrs(path, max_age=float("inf")) or await self.getattr(path)

    async def listdir(self, path: bytes) -> list[tuple[bytes, p.Attrs]]:
        if self._unsettled(path):
            held = self.meta.listing(path, max_age=float("inf"))
            if held is not None:
                return held
        return await self.lister.listdir(path)

    def _unsettled(self, path: bytes) -> bool:
        """Changes to `path` or above are still queued (say, its directory was renamed
        and the rename waits behind uploads): what we hold, with our pending changes,
        is more current than the server, which would have to be waited for. Seeing
        others' changes there waits until ours are uploaded."""
        return self.deferred is not None and self.deferred.wb.unsettled(path)

    async def _pinned_attrs(self, path: bytes) -> p.Attrs:
        """Attributes of a path with pending changes but none cached (after a restart)."""
        assert self.deferred is not None
        for settled in (False, True):
            try:
                server: p.Attrs | None = await self.remote.lstat(self.rpath(path))
            except SftpError as e:
                if e.errno != errno.ENOENT:
                    raise
                server = None
            a = self.deferred.wb.overlay(path, server)
            if a is not None:
                self.meta.put_local(path, a)
                return a
            if settled:
                break
            # E.g. the target of a queued rename of a server directory: neither we
            # nor the server can tell its attributes until the rename is there.
            await self.settle_for_server(path)
        raise _err(errno.ENOENT)

    async def readlink(self, path: bytes) -> bytes:
        if self.deferred is not None:
            target = await self.deferred.readlink(path)
            if target is not None:
                return target
        return await self.remote.readlink(self.rpath(path))

    async def statfs(self) -> p.Statvfs | None:
        return await self.remote.statvfs(self.rpath(b""))

    # ---- changing the tree ------------------------------------------------------------

    async def mkdir(self, path: bytes, mode: int) -> p.Attrs:
        self._check_write(path)
        if self.deferred is not None:
            self.reads.changed(path)
            return await self.deferred.mkdir(path, mode)
        a = await self.remote.mkdir(self.rpath(path), mode)
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        return a

    async def symlink(self, path: bytes, target: bytes) -> p.Attrs:
        self._check_write(path)
        if self.deferred is not None:
            return await self.deferred.symlink(path, target)
        a = await self.remote.symlink(target, self.rpath(path))
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        return a

    async def link(self, src: bytes, dst: bytes) -> p.Attrs:
        self._check_write(dst)
        if self.deferred is not None:
            self.reads.changed(dst)
            return await self.deferred.link(src, dst)
        a = await self.remote.hardlink(self.rpath(src), self.rpath(dst))
        self.reads.changed(dst)
        self.meta.added(dst, a)
        self.meta.invalidate(src)  # its ctime changed
        self._touch_dir(parent_of(dst))
        return a

    async def unlink(self, path: bytes) -> None:
        self._check_write()
        await self._pin_readers(path)
        if self.deferred is not None:
            await self.deferred.unlink(path)
        else:
            await self.remote.remove(self.rpath(path))
        self._gone(path)

    async def rmdir(self, path: bytes) -> None:
        self._check_write()
        if self.deferred is not None:
            await self.deferred.rmdir(path)
        else:
            await self.remote.rmdir(self.rpath(path))
        self._gone(path)

    async def rename(self, old: bytes, new: bytes, *, noreplace: bool = False) -> None:
        self._check_write(new)
        if not noreplace:
            await self._pin_readers(new)
        if self.deferred is not None:
            await self.deferred.rename(old, new, noreplace)
        else:
            if noreplace and self.meta.attrs(new) is not None:
                raise _err(errno.EEXIST)
            await self.remote.rename(self.rpath(old), self.rpath(new), replace=not noreplace)
            self.meta.renamed(old, new)
            self._touch_dir(parent_of(old))
            self._touch_dir(parent_of(new))
        self.reads.changed(new)  # another file's contents under this name now
        for f in self.open_files:
            if f.path is not None:
                if f.path == new and not is_below(new, old):
                    f.path = None  # replaced: still open, no longer reachable
                elif is_below(f.path, old):
                    f.path = new + f.path[len(old):]
                    f.remote.path = self.rpath(f.path)

    async def setattr(self, path: bytes, changes: p.Attrs, file: OpenFile | None = None) -> p.Attrs:
        """chmod/chown/utimens/truncate in one SETSTAT; returns the new attributes."""
        self._check_write()
        if changes.size is not None:
            self.reads.changed(path)  # truncate: cached blocks are not its content any more
        if self.deferred is not None:
            return await self.deferred.setattr(path, changes, file)
        if file is not None:
            await file.flush()
        if (changes.atime is None) != (changes.mtime is None):
            # SFTP v3 sets both times or neither: keep the one not being changed.
            cur = await self.getattr(path) if file is None or file.path else await file.remote.fstat()
            changes.atime = cur.atime if changes.atime is None else changes.atime
            changes.mtime = cur.mtime if changes.mtime is None else changes.mtime
        if file is not None and (file.path is None or changes.size is not None):
            await file.remote.fsetstat(changes)
            a = await file.remote.fstat()
        else:
            cached = self.meta.attrs(path)
            follow = not (cached is not None and cached.is_link)
            if cached is not None and changes.size is None:
                # We know exactly what SETSTAT changes: skip the LSTAT after it.
                await self.remote.setstat(self.rpath(path), changes, follow=follow, stat=False)
                a = _applied(cached, changes)
            else:
                a = await self.remote.setstat(self.rpath(path), changes, follow=follow)
        if file is None or file.path is not None:
            self.meta.put_attrs(path, a)
        return a

    # ---- files ----------------------------------------------------------------------------

    async def create(self, path: bytes, mode: int, flags: int) -> tuple[OpenFile, p.Attrs]:
        self._check_write(path)
        if self.deferred is not None:
            self.reads.changed(path)
            made = await self.deferred.create(path, mode, flags)
            if made is None:  # it exists after all: open it
                f, _changed = await self.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
                return f, await self.getattr(path)
            self.open_files.add(made[0])
            return made
        pflags = open_flags_to_pflags(flags) | p.FXF_CREAT | p.FXF_WRITE
        rf = self.remote.open(self.rpath(path), pflags)
        a = await rf.open(mode)
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        f = OpenFile(self, path, rf, writable=True)
        await self.reads.opened(f, a)
        self.open_files.add(f)
        return f, a

    async def open(self, path: bytes, flags: int) -> tuple[OpenFile, bool]:
        """Open a file; also says whether the server's version differs from the cached one."""
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writable:
            self._check_write()
        if self.deferred is not None:
            local = await self.deferred.open(path, flags)
            if local is not None:
                if writable:
                    self.reads.changed(path)
                self.open_files.add(local)
                return local, False
        if not writable:
            # Fresh attributes and every block cached: no round trip at all.
            local = await self.reads.open_local(path)
            if local is not None:
                self.open_files.add(local)
                return local, False
        await self.settle_for_server(path)  # e.g. renamed here, not yet on the server
        rf = self.remote.open(self.rpath(path), open_flags_to_pflags(flags))
        # Compare with what the kernel may hold: our last answer, however old.
        cached = self.meta.attrs(path, max_age=float("inf"))
        a = await rf.open()
        changed = cached is not None and (cached.size, cached.mtime) != (a.size, a.mtime)
        self.meta.put_attrs(path, a)
        f = OpenFile(self, path, rf, writable=writable)
        await self.reads.opened(f, a)
        self.open_files.add(f)
        return f, changed

    def wrote(self, path: bytes, end: int) -> None:
        """A write reached the server's queue: the cached size must not lag behind."""
        a = self.meta.attrs(path)
        size = max(end, a.size or 0) if a is not None else None
        self.meta.update(path, size=size, mtime=int(time.time()))

    def closed(self, f: OpenFile, attrs: p.Attrs | None, since: int) -> None:
        """The kernel's RELEASE comes asynchronously, possibly after a later
        utimens or chmod (rsync does both right after close): their answer wins."""
        self.open_files.discard(f)
        if f.path is not None and attrs is not None:
            self.meta.put_attrs_if_unchanged(f.path, attrs, since)

    # ---- cache upkeep ------------------------------------------------------------------------

    async def _pin_readers(self, path: bytes) -> None:
        """Before `path` is unlinked or replaced: its readers opened here but not yet on
        the server open there now, so they keep reading the file they opened."""
        for f in [f for f in self.open_files if f.path == path and f.reader is not None]:
            await f.reader.pin()

    def _gone(self, path: bytes) -> None:
        self.meta.removed(path)
        self._touch_dir(parent_of(path))
        for f in self.open_files:
            if f.path is not None and is_below(f.path, path):
                f.path = None

    def _touch_dir(self, path: bytes) -> None:
        """Changing a directory's entries changes its mtime, on the server too."""
        self.meta.update(path, mtime=int(time.time()))

    def child(self, parent: bytes, name: bytes) -> bytes:
        return join(parent, name)
