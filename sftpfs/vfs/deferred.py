"""The change operations of the view when write-back is on.

Each one does what a local disk would: it checks what the disk would refuse
(the name exists, the parent is missing or not writable, the directory is
not empty) against the cached view, answers at once, and leaves the server
work to writeback.WriteBack. The view (MetaCache) shows the change from
then on; pins keep server answers from hiding it until it is uploaded.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TYPE_CHECKING

from ..remote import protocol as p
from .files import OpenFile
from .meta import is_below, parent_of
from .writeback import DirtyFile, WriteBack

if TYPE_CHECKING:
    from .vfs import Vfs


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Deferred:
    def __init__(self, vfs: Vfs, wb: WriteBack) -> None:
        self.vfs = vfs
        self.wb = wb
        self.meta = vfs.meta

    @property
    def owner(self) -> tuple[int | None, int | None]:
        """The login's uid and gid on the server, once an upload has shown them."""
        return self.wb.owner or (None, None)

    # ---- checks a local disk would make ---------------------------------------------------

    async def _lookup(self, path: bytes) -> p.Attrs | None:
        try:
            return await self.vfs.getattr(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    async def _new_name(self, path: bytes) -> p.Attrs:
        """`path` may be created: returns its parent's attributes."""
        parent = await self._lookup(parent_of(path))
        if parent is None:
            raise _err(errno.ENOENT)
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        self._check_writable(parent)
        if await self._lookup(path) is not None:
            raise _err(errno.EEXIST)
        return parent

    def _check_writable(self, parent: p.Attrs) -> None:
        """Refuse what the server obviously would, at once: a directory nobody may
        write to (only a root login could), or one of ours without write permission."""
        mode = parent.mode
        if mode is None:
            return
        uid = self.owner[0]
        if not mode & 0o222 or (uid is not None and parent.uid == uid and not mode & stat.S_IWUSR):
            raise _err(errno.EACCES)

    def _attrs(self, parent: p.Attrs, mode: int, size: int = 0) -> p.Attrs:
        now = int(time.time())
        uid, gid = self.owner
        return p.Attrs(size=size, uid=parent.uid if uid is None else uid,
                       gid=parent.gid if gid is None else gid, mode=mode, atime=now, mtime=now)

    def _touch_dir(self, path: bytes) -> None:
        self.meta.update(path, mtime=int(time.time()))

    # ---- changes -----------------------------------------------------------------------------

    async def mkdir(self, path: bytes, mode: int) -> p.Attrs:
        parent = await self._new_name(path)
        a = self._attrs(parent, stat.S_IFDIR | (mode & 0o7777), 4096)
        self.wb.mkdir(path, mode & 0o7777)
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        return a

    async def symlink(self, path: bytes, target: bytes) -> p.Attrs:
        parent = await self._new_name(path)
        a = self._attrs(parent, stat.S_IFLNK | 0o777, len(target))
        self.wb.symlink(path, target)
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        return a

    async def readlink(self, path: bytes) -> bytes | None:
        """The target of a symlink made here and not yet uploaded, else None."""
        for op in reversed(self.wb.ops):
            if op.state != "done" and op.kind == "symlink" and op.paths[-1] == path:
                return op.args["target"].encode("latin-1")
        await self.vfs.settle_for_server(path)  # e.g. renamed while pending: ask the server
        return None

    async def link(self, src: bytes, dst: bytes) -> p.Attrs:
        a = await self._lookup(src)
        if a is None:
            raise _err(errno.ENOENT)
        await self._new_name(dst)
        if self.wb.file_for(src) is not None:
            await self.wb.settle(src)  # the link must share the uploaded contents
        self.wb.link(src, dst)
        self.meta.added(dst, a)
        self._touch_dir(parent_of(dst))
        return a

    async def unlink(self, path: bytes) -> None:
        a = await self._lookup(path)
        if a is None:
            raise _err(errno.ENOENT)
        if a.is_dir:
            raise _err(errno.EISDIR)
        self._check_writable(await self.vfs.getattr(parent_of(path)))
        self.meta.removed(path)
        self.wb.unlink(path)
        self._touch_dir(parent_of(path))

    async def rmdir(self, path: bytes) -> None:
        a = await self._lookup(path)
        if a is None:
            raise _err(errno.ENOENT)
        if not a.is_dir:
            raise _err(errno.ENOTDIR)
        if await self.vfs.listdir(path):
            raise _err(errno.ENOTEMPTY)
        self.meta.removed(path)
        self.wb.rmdir(path)
        self._touch_dir(parent_of(path))

    async def rename(self, old: bytes, new: bytes, noreplace: bool) -> None:
        src = await self._lookup(old)
        if src is None:
            raise _err(errno.ENOENT)
        if old == new:
            return
        if is_below(new, old):
            raise _err(errno.EINVAL)
        dst = await self._lookup(new)
        if dst is not None:
            if noreplace:
                raise _err(errno.EEXIST)
            if dst.is_dir and not src.is_dir:
                raise _err(errno.EISDIR)
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR)
            if dst.is_dir and await self.vfs.listdir(new):
                raise _err(errno.ENOTEMPTY)
        else:
            parent = await self._lookup(parent_of(new))
            if parent is None:
                raise _err(errno.ENOENT)
            self._check_writable(parent)
        self.meta.renamed(old, new)  # moves the pins of pending changes below `old` first
        self.wb.rename(old, new, noreplace)  # then pins `old` absent and `new` present
        self._touch_dir(parent_of(old))
        self._touch_dir(parent_of(new))

    async def setattr(self, path: bytes, changes: p.Attrs, file: OpenFile | None) -> p.Attrs:
        cur = await self._lookup(path) if file is None or file.path is not None else None
        if cur is None and isinstance(file, PendingFile):
            cur = self.wb.overlay(path, None)
        if cur is None:
            raise _err(errno.ENOENT)
        if changes.size is not None:
            if cur.is_dir:
                raise _err(errno.EISDIR)
            f = file.dirty if isinstance(file, PendingFile) and file.dirty is not None else None
            f = f or self.wb.file_for(path) or self.wb.open_for_write(path, cur)
            self.wb.truncate(f, changes.size)
        rest = p.Attrs(mode=changes.mode, uid=changes.uid, gid=changes.gid,
                       atime=changes.atime, mtime=changes.mtime)
        if rest != p.Attrs():
            self.wb.setattr(path, rest, follow=not cur.is_link)
        mode = cur.mode if changes.mode is None else (cur.mode or 0) & ~0o7777 | changes.mode
        now = int(time.time())
        a = p.Attrs(size=cur.size if changes.size is None else changes.size,
                    uid=cur.uid if changes.uid is None else changes.uid,
                    gid=cur.gid if changes.gid is None else changes.gid, mode=mode,
                    atime=cur.atime if changes.atime is None else changes.atime,
                    mtime=(now if changes.size is not None else cur.mtime)
                    if changes.mtime is None else changes.mtime)
        if file is None or file.path is not None:
            self.meta.put_local(path, a)
        return a

    # ---- files ---------------------------------------------------------------------------------

    async def create(self, path: bytes, mode: int, flags: int) -> tuple[OpenFile, p.Attrs] | None:
        """None: the name exists after all (a stale negative entry); open it instead."""
        parent = await self._lookup(parent_of(path))
        if parent is None:
            raise _err(errno.ENOENT)
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if await self._lookup(path) is not None:
            if flags & os.O_EXCL:
                raise _err(errno.EEXIST)
            return None
        self._check_writable(parent)
        dirty = self.wb.create(path, mode & 0o7777)
        a = self._attrs(parent, stat.S_IFREG | (mode & 0o7777))
        self.meta.added(path, a)
        self._touch_dir(parent_of(path))
        return PendingFile(self, path, dirty, a, writable=True), a

    async def open(self, path: bytes, flags: int) -> OpenFile | None:
        """A file with local changes opens locally; None means: open it on the server."""
        dirty = self.wb.file_for(path)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if dirty is None and not writable:
            return None  # from the cache or the server (Vfs.open)
        a = await self._lookup(path)
        if a is None:
            raise _err(errno.ENOENT)
        if dirty is None and flags & os.O_TRUNC:
            dirty = self.wb.open_for_write(path, a)
        f = PendingFile(self, path, dirty, a, writable=writable)
        if flags & os.O_TRUNC:
            self.wb.truncate(f.dirty, 0)
            self.meta.update(path, size=0, mtime=int(time.time()))
        return f


class PendingFile(OpenFile):
    """An open file whose writes go to local dirty storage (write-back)."""

    def __init__(self, owner: Deferred, path: bytes, dirty: DirtyFile | None, attrs: p.Attrs, *,
                 writable: bool) -> None:
        vfs = owner.vfs
        super().__init__(vfs, path, vfs.remote.open(vfs.rpath(path), p.FXF_READ), writable=writable)
        self.owner = owner
        self.wb = owner.wb
        self.dirty: DirtyFile | None = None
        self.attrs = attrs
        self._server_open = False
        if dirty is not None:
            self._attach(dirty)

    async def fstat(self) -> p.Attrs:
        if self.dirty is None:
            return await super().fstat()
        a = self.attrs
        return p.Attrs(size=self.dirty.size, uid=a.uid, gid=a.gid, mode=a.mode,
                       atime=a.atime, mtime=self.dirty.mtime)

    def _attach(self, dirty: DirtyFile) -> None:
        self.dirty = dirty
        self.wb.opened(dirty)

    async def read(self, offset: int, size: int) -> bytes:
        self._raise_pending()
        f = self.dirty or (self.wb.file_for(self.path) if self.path is not None else None)
        if f is None:
            return await self._server_read(offset, size)
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        if f.new or f.ranges.covers(offset, end):
            return self.wb.read_local(f, offset, end - offset)
        # Mixed: dirty pieces from the local file, the rest from the server's version.
        out = bytearray(await self._server_read(offset, end - offset))
        out.extend(b"\0" * (end - offset - len(out)))  # past the server's end: zeros
        for s, e in f.ranges:
            lo, hi = max(s, offset), min(e, end)
            if lo < hi:
                out[lo - offset:hi - offset] = self.wb.read_local(f, lo, hi - lo)
        return bytes(out)

    async def _server_read(self, offset: int, size: int) -> bytes:
        if self.path is not None and self.owner.meta.pinned(self.path) and not self._server_open:
            await self.wb.settle(self.path)
        self._server_open = True
        return await self.read_direct(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        self._raise_pending()
        if self.dirty is None:
            if self.path is None:
                raise _err(errno.ESTALE)
            self._attach(self.wb.open_for_write(self.path, self.attrs))
        assert self.dirty is not None
        await self.wb.write(self.dirty, offset, data)
        if self.path is not None:
            self.owner.meta.update(self.path, size=self.dirty.size, mtime=self.dirty.mtime)
        return len(data)

    def _raise_pending(self) -> None:
        e = self.wb.error_for(self.dirty, self.path)
        if e is not None:
            raise e

    async def flush(self) -> None:
        self._raise_pending()

    async def fsync(self) -> None:
        if self.path is not None:
            await self.wb.settle(self.path)
            self._raise_pending()
            if self.vfs.remote.has(b"fsync@openssh.com"):
                rf = self.vfs.remote.open(self.vfs.rpath(self.path), p.FXF_READ)
                await rf.open()
                try:
                    await rf.fsync()
                finally:
                    await rf.close()

    async def release(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.dirty is not None:
            self.wb.closed(self.dirty)
        if self._server_open:
            try:
                await self.remote.close()
            except OSError:
                pass
        self.vfs.open_files.discard(self)
        self._raise_pending()
