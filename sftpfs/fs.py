"""The kernel's side: pyfuse3 operations over the vfs view.

Thin on purpose: it maps inodes and handles to vfs paths and files, turns
Attrs into EntryAttributes, and OSError into FUSEError. Caching policy lives
in vfs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from . import openreply
from .remote.protocol import Attrs
from .vfs.files import OpenFile
from .vfs.meta import join, parent_of
from .vfs.vfs import Vfs

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
BLKSIZE = 128 * 1024  # st_blksize: cp and friends size their buffers by it


@dataclass
class Presentation:
    """How server attributes are shown: timeouts and sshfs-style overrides."""

    attr_timeout: float = 20.0
    entry_timeout: float = 20.0
    negative_timeout: float = 20.0
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    kernel_dircache: bool = True  # let the kernel keep listings (openreply.py)


class InodeTable:
    """Inode numbers for paths, with the kernel's lookup counts.

    An inode lives until the kernel forgets it, not until it is unlinked: an
    unlinked inode keeps its last attributes so fstat of an open file works.
    """

    def __init__(self) -> None:
        self._path: dict[int, bytes | None] = {ROOT: b""}
        self._ino: dict[bytes, int] = {b"": ROOT}
        self._count: dict[int, int] = {ROOT: 1}
        self._last: dict[int, Attrs] = {}
        self._next = ROOT + 1

    def path(self, ino: int) -> bytes:
        p = self._path.get(ino)
        if p is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return p

    def ino_of(self, path: bytes) -> int:
        return self._ino.get(path, ROOT)

    def find(self, path: bytes) -> int | None:
        return self._ino.get(path)

    def last_attrs(self, ino: int) -> Attrs | None:
        return self._last.get(ino)

    def remember(self, path: bytes, attrs: Attrs) -> int:
        """One more kernel reference to `path`: returns its inode."""
        ino = self._ino.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self._ino[path] = ino
            self._path[ino] = path
            self._count[ino] = 0
        self._count[ino] += 1
        self._last[ino] = attrs
        return ino

    def forget(self, ino: int, n: int) -> bool:
        """Drop `n` kernel references; True if that was the last."""
        if ino == ROOT or ino not in self._count:
            return False
        self._count[ino] -= n
        if self._count[ino] > 0:
            return False
        del self._count[ino]
        self._last.pop(ino, None)
        p = self._path.pop(ino, None)
        if p is not None and self._ino.get(p) == ino:
            del self._ino[p]
        return True

    def _subtree(self, path: bytes) -> list[bytes]:
        """Known paths at or below `path`; only a directory needs a scan."""
        ino = self._ino.get(path)
        if ino is None:
            return []  # the kernel holds a directory's inode while it holds any child
        last = self._last.get(ino)
        if last is not None and not last.is_dir:
            return [path]
        prefix = path + b"/"
        return [p for p in self._ino if p == path or p.startswith(prefix)]

    def removed(self, path: bytes) -> None:
        for p in self._subtree(path):
            self._path[self._ino.pop(p)] = None

    def renamed(self, old: bytes, new: bytes) -> None:
        self.removed(new)
        for p in self._subtree(old):
            ino = self._ino.pop(p)
            np = new + p[len(old):]
            self._ino[np] = ino
            self._path[ino] = np

    def __len__(self) -> int:
        return len(self._count)


def _errors(fn: Callable) -> Callable:
    """Handlers may only raise FUSEError: map OSError, log the unexpected.

    With -d, every request is logged with its duration and outcome.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        t0 = time.perf_counter() if log.isEnabledFor(logging.DEBUG) else None
        outcome = "ok"
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as e:
            outcome = errno.errorcode.get(e.errno, str(e.errno))
            raise
        except OSError as e:
            outcome = f"{errno.errorcode.get(e.errno or errno.EIO, e.errno)} ({e.strerror})"
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            outcome = "internal error"
            log.exception("internal error in %s", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if t0 is not None:
                log.debug("%s%r: %s in %.2f ms", name, _brief(args[1:]), outcome,
                          (time.perf_counter() - t0) * 1000)

    return wrapper


def _brief(args: tuple) -> tuple:
    """Request arguments for the debug log: no file contents, no request contexts."""
    return tuple(f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64 else a
                 for a in args if not isinstance(a, pyfuse3.RequestContext))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # our write-back lives in user space (DESIGN.md)
    enable_acl = False

    def __init__(self, vfs: Vfs, show: Presentation) -> None:
        super().__init__()
        self.vfs = vfs
        self.show = show
        self.inodes = InodeTable()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[tuple[bytes, Attrs]]] = {}
        self._dir_paths: dict[int, bytes] = {}
        # Kernel directory cache: what each open directory shows (a fingerprint),
        # and per directory inode what the kernel last got from READDIRPLUS, when.
        self._dir_fp: dict[int, tuple[int, int]] = {}  # fh -> (inode, fingerprint)
        self._dir_served: dict[int, tuple[int, float]] = {}  # inode -> (fingerprint, time)
        self._kernel_listings = 0  # listings the kernel read from us (not from its cache)
        self._flushes = 0  # close(2)s that waited for us (none for read-only opens)
        self._next_fh = 1
        self.after_init: Callable[[], None] | None = None  # runs once the kernel has our INIT
        vfs.lister.on_change = self._server_changed
        vfs.reads.on_version_change = self._file_changed

    def init(self) -> None:
        # Called inside libfuse's INIT handler, before its reply: what depends on the
        # kernel having the reply (it resets the mount's read-ahead) runs right after.
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self._run_after_init)

    def _run_after_init(self) -> None:
        try:
            self.after_init()  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - an exception here would end trio's run loop
            log.exception("after the FUSE INIT")

    def _server_changed(self, dir_path: bytes, names: list[bytes]) -> None:
        """A relisting found changes made by someone else: drop the kernel's copies."""
        parent = self.inodes.find(dir_path)
        if parent is None:
            return
        self._dir_served.pop(parent, None)  # the next opendir lists through us
        for name in names:
            self.vfs.nursery.start_soon(self._invalidate_entry, parent, name,
                                        self.inodes.find(join(dir_path, name)))

    async def _file_changed(self, f: OpenFile) -> None:
        """A file opened without asking the server turned out changed there at its
        first read: the kernel's size for it is the old one, and it clips reads to it.
        (Attribute-only invalidation touches no page a read holds locked.)"""
        if f.ino:
            with trio.move_on_after(1):
                await self._invalidate_attrs(f.ino)

    async def _invalidate_entry(self, parent: int, name: bytes, ino: int | None) -> None:
        # Off the request path, in a thread: the kernel takes the directory's
        # lock, which a request being answered right now may hold.
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
        except OSError:
            pass  # not in the kernel's cache: nothing to drop
        if ino is not None:
            await self._invalidate_attrs(ino)

    def stats(self) -> dict[str, int]:
        rtt = self.vfs.remote.rtt
        return {"inodes": len(self.inodes), "open_files": len(self._files),
                "rtt_us": -1 if rtt is None else round(rtt * 1e6),
                "open_dirs": len(self._dirs), "requests": self.vfs.remote.requests,
                "kernel_listings": self._kernel_listings, "flushes": self._flushes,
                "files_prefetched": self.vfs.reads.prefetcher.files_prefetched,
                **self.vfs.lister.stats,
                **{f"cache_{k}": v for k, v in self.vfs.reads.blocks.stats.items()}}

    # ---- helpers ----------------------------------------------------------------------

    def entry(self, ino: int, a: Attrs) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = self.show.entry_timeout
        e.attr_timeout = self.show.attr_timeout
        mode = a.mode if a.mode is not None else stat.S_IFREG | 0o644
        if self.show.umask is not None:
            mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~self.show.umask)
        e.st_mode = mode
        e.st_nlink = 1  # SFTP v3 has no link count; 1 tells find not to guess
        e.st_uid = self.show.uid if self.show.uid is not None else (a.uid or 0)
        e.st_gid = self.show.gid if self.show.gid is not None else (a.gid or 0)
        size = a.size or 0
        e.st_size = size
        e.st_blksize = BLKSIZE
        e.st_blocks = (size + 511) // 512
        mtime_ns = (a.mtime or 0) * 10**9
        e.st_atime_ns = (a.atime or a.mtime or 0) * 10**9
        e.st_mtime_ns = mtime_ns
        e.st_ctime_ns = mtime_ns
        return e

    def _remember(self, path: bytes, a: Attrs) -> pyfuse3.EntryAttributes:
        return self.entry(self.inodes.remember(path, a), a)

    def _child(self, parent_ino: int, name: bytes) -> bytes:
        return join(self.inodes.path(parent_ino), name)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ---- metadata -----------------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            path = parent_of(parent)
        else:
            path = join(parent, name)
        try:
            a = await self.vfs.getattr(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            # A zero inode is a negative entry the kernel caches for a while.
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.show.negative_timeout
            return neg
        return self._remember(path, a)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            if self.inodes.forget(ino, n):
                self._dir_served.pop(ino, None)

    @_errors
    async def getattr(self, inode, ctx=None):
        try:
            path = self.inodes.path(inode)
        except pyfuse3.FUSEError:
            # Unlinked but maybe still open: the handle knows the file.
            for f in self._files.values():
                if getattr(f, "ino", None) != inode:
                    continue
                reader = getattr(f, "reader", None)
                if reader is not None and not reader.verified:
                    continue  # opened from the cache, never on the server: its path is another file's
                with contextlib.suppress(OSError):
                    return self.entry(inode, await f.fstat())
            last = self.inodes.last_attrs(inode)
            if last is None:
                raise
            return self.entry(inode, last)
        return self.entry(inode, await self.vfs.getattr(path))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.inodes.path(inode) if fh is None or fh not in self._files else None
        f = self._files.get(fh) if fh is not None else None
        if path is None and f is not None:
            path = f.path or b""
        ch = Attrs()
        if fields.update_mode:
            ch.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid or fields.update_gid:
            cur = await self.vfs.getattr(path)
            ch.uid = attr.st_uid if fields.update_uid else cur.uid
            ch.gid = attr.st_gid if fields.update_gid else cur.gid
        if fields.update_size:
            ch.size = attr.st_size
        if fields.update_atime:
            ch.atime = attr.st_atime_ns // 10**9
        if fields.update_mtime:
            ch.mtime = attr.st_mtime_ns // 10**9
        if ch == Attrs():  # e.g. only ctime: nothing SFTP can set
            return await self.getattr(inode)
        a = await self.vfs.setattr(path, ch, f)
        return self.entry(inode, a)

    @_errors
    async def readlink(self, inode, ctx):
        return await self.vfs.readlink(self.inodes.path(inode))

    @_errors
    async def opendir(self, inode, ctx):
        path = self.inodes.path(inode)
        listing = await self.vfs.listdir(path)
        here = await self.vfs.getattr(path)
        up = await self.vfs.known_attrs(parent_of(path)) if path else here
        fh = self._new_fh()
        # A snapshot: offsets stay stable while the directory changes.
        snapshot = self._dirs[fh] = [(b".", here), (b"..", up), *listing]
        self._dir_paths[fh] = path
        if self.show.kernel_dircache and openreply.active:
            fp = hash(tuple((n, a.mode, a.size, a.mtime, a.uid, a.gid) for n, a in snapshot))
            self._dir_fp[fh] = (inode, fp)
            # The kernel's copy holds names only; the attributes it got with them
            # expire. Keep it while both it and they are current.
            served = self._dir_served.get(inode)
            ttl = min(self.show.attr_timeout, self.show.entry_timeout)
            keep = served is not None and served[0] == fp and time.monotonic() - served[1] < ttl
            openreply.next_opendir(keep)  # last: pyfuse3 replies right after we return
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        parent = self._dir_paths[fh]
        entries = self._dirs[fh]
        if start_id == 0:
            self._kernel_listings += 1
        served = self._dir_fp.get(fh)
        if served is not None:  # the kernel is (re)filling its copy from this snapshot
            self._dir_served[served[0]] = (served[1], time.monotonic())
        for i in range(start_id, len(entries)):
            name, a = entries[i]
            if name in (b".", b".."):
                # The kernel takes no reference for these (fuse_direntplus_link).
                path = parent if name == b"." else parent_of(parent)
                if not pyfuse3.readdir_reply(token, name, self.entry(self.inodes.ino_of(path), a), i + 1):
                    return
                continue
            ino = self.inodes.remember(join(parent, name), a)
            # readdirplus: an entry the kernel accepted counts as a lookup.
            if not pyfuse3.readdir_reply(token, name, self.entry(ino, a), i + 1):
                self.inodes.forget(ino, 1)
                return

    @_errors
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)
        self._dir_paths.pop(fh, None)
        self._dir_fp.pop(fh, None)

    @_errors
    async def fsyncdir(self, fh, datasync):
        """`sync DIR`: everything pending below the directory reaches the server."""
        if self.vfs.deferred is not None:
            await self.vfs.deferred.wb.settle(self._dir_paths[fh], below=True)

    @_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        v = await self.vfs.statfs()
        if v is None:  # server without statvfs@openssh.com: report plenty of room
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = 2**40 // 4096
            s.f_files = s.f_ffree = s.f_favail = 2**20
            s.f_namemax = 255
            return s
        s.f_bsize = v.bsize
        s.f_frsize = v.frsize or v.bsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.blocks, v.bfree, v.bavail
        s.f_files, s.f_ffree, s.f_favail = v.files, v.ffree, v.favail
        s.f_namemax = v.namemax or 255
        return s

    async def access(self, inode, mode, ctx):
        # The server enforces permissions; only a read-only mount is decided here.
        return not (mode & os.W_OK and self.vfs.readonly)

    # ---- xattrs: SFTP v3 has none. ENOSYS makes the kernel stop asking and
    # answer EOPNOTSUPP itself, so `ls -l` and `cp -a` pay nothing for them.

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # ---- changing the tree -----------------------------------------------------------------

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        return self._remember(path, await self.vfs.mkdir(path, mode))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        return self._remember(path, await self.vfs.symlink(path, target))

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        src = self.inodes.path(inode)
        dst = self._child(new_parent_inode, new_name)
        return self._remember(dst, await self.vfs.link(src, dst))

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # SFTP cannot make devices, FIFOs or sockets
        path = self._child(parent_inode, name)
        f, a = await self.vfs.create(path, mode, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        await f.release()
        return self._remember(path, a)

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        await self.vfs.unlink(path)
        self.inodes.removed(path)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        await self.vfs.rmdir(path)
        self.inodes.removed(path)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # SFTP has no atomic exchange
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self.vfs.rename(old, new, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        self.inodes.renamed(old, new)
        for fh, p in self._dir_paths.items():
            if p == old or p.startswith(old + b"/"):
                self._dir_paths[fh] = new + p[len(old):]

    # ---- files -----------------------------------------------------------------------------------

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        f, a = await self.vfs.create(path, mode, flags)
        fh = self._new_fh()
        self._files[fh] = f
        entry = self._remember(path, a)
        f.ino = entry.st_ino
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), entry

    @_errors
    async def open(self, inode, flags, ctx):
        f, changed = await self.vfs.open(self.inodes.path(inode), flags)
        if changed:
            # Another writer changed the file: the kernel's size and mtime are
            # stale. Attribute-only invalidation takes no kernel lock an open
            # holds; still, run it in a thread and never wait for it long.
            with trio.move_on_after(1):
                await self._invalidate_attrs(inode)
        fh = self._new_fh()
        self._files[fh] = f
        f.ino = inode
        if flags & os.O_ACCMODE == os.O_RDONLY:
            openreply.next_open_readonly()  # last: pyfuse3 replies right after we return
        # Same version as at the last open: the kernel's page cache is still right.
        return pyfuse3.FileInfo(fh=fh, keep_cache=f.keep_cache)

    async def _invalidate_attrs(self, inode: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True,
                                          abandon_on_cancel=True)
        except OSError as e:  # the kernel may have forgotten the inode already
            log.debug("invalidate_inode(%d): %s", inode, e)

    @_errors
    async def read(self, fh, off, size):
        return await self._files[fh].read(off, size)

    @_errors
    async def write(self, fh, off, buf):
        return await self._files[fh].write(off, buf)

    @_errors
    async def flush(self, fh):
        self._flushes += 1
        await self._files[fh].flush()

    @_errors
    async def fsync(self, fh, datasync):
        await self._files[fh].fsync()

    @_errors
    async def release(self, fh):
        f = self._files.pop(fh)
        await f.release()
