"""An SFTP v3 client for trio with many requests in flight on one channel.

paramiko's SFTPClient is blocking, caps requests at 32 KiB and waits for each
reply in turn. Here trio tasks queue a packet and wait on an event; replies
are parsed in the trio thread (which waits on paramiko's channel pipe) and
matched by request id. N concurrent stats therefore cost one round trip, and
reads and writes go out in the largest size the server allows.

Sending happens in the trio thread when it cannot block, else in a writer
thread that owns the channel's send side while the window is full; order is
kept either way. Session state is only touched from the trio thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Iterable

import paramiko
import trio

from ..slots import Slots
from . import protocol as p
from .channel import WINDOW_SIZE, SftpChannel, open_sftp_channel
from .errors import ConnectionLost, RequestTimeout, SftpError

log = logging.getLogger(__name__)

DEFAULT_IO_SIZE = 32768  # what every SFTP server accepts; raised by limits@openssh.com
READDIR_AHEAD = 8  # most READDIRs in flight per listing (OpenSSH answers them in order)


class _Waiter:
    __slots__ = ("event", "body", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.body: memoryview | None = None
        self.error: BaseException | None = None


class SftpSession:
    """One SFTP channel. Create with `await SftpSession.start(transport)`."""

    def __init__(self, chan: paramiko.Channel, version: int, exts: dict[bytes, bytes], *,
                 request_timeout: float, max_inflight: int) -> None:
        self.chan = chan
        self.version = version
        self.extensions = exts
        self.request_timeout = request_timeout
        self.max_read = DEFAULT_IO_SIZE
        self.max_write = DEFAULT_IO_SIZE
        self.closed = False
        self.close_reason = ""
        self._ids = itertools.count(1)
        self.sent = 0  # requests sent, for stats
        self.rtt: float | None = None  # the quickest answer seen: the link's round trip
        self._pending: dict[int, _Waiter] = {}
        self._slots = Slots(max_inflight)
        self._sendq: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._last_rx = trio.current_time()
        self._send_lock = threading.Lock()
        self._backlog = 0  # packets handed to the writer thread and not yet sent
        self._writer = threading.Thread(target=self._write_loop, name="sftp-writer", daemon=True)

    # ---- setup and teardown -------------------------------------------------

    @classmethod
    async def start(cls, transport: paramiko.Transport, *, request_timeout: float = 30.0,
                    max_inflight: int = 256, channel: SftpChannel | None = None) -> SftpSession:
        """`channel`: one already set up on `transport` (see handshake.py)."""
        if channel is None:
            channel = await trio.to_thread.run_sync(open_sftp_channel, transport, request_timeout)
        chan, version, exts = channel
        self = cls(chan, version, exts, request_timeout=request_timeout, max_inflight=max_inflight)
        self._writer.start()
        trio.lowlevel.spawn_system_task(self._read_loop, name="sftp-reader")
        log.debug("SFTP v%d, extensions %s", version, sorted(k.decode(errors="replace") for k in exts))
        if self.has(b"limits@openssh.com"):
            # Not awaited: it is answered along with the session's first requests
            # (a mount's realpath and stat) instead of costing a round trip of its own.
            # Until then I/O goes in DEFAULT_IO_SIZE pieces, which every server takes.
            trio.lowlevel.spawn_system_task(self._read_limits, name="sftp-limits")
        return self

    async def _read_limits(self) -> None:
        try:
            lim = p.Limits.decode(await self._extended(b"limits@openssh.com"))
        except Exception as e:  # noqa: BLE001 - without them the default sizes stay
            log.debug("limits@openssh.com failed: %s", e)
            return
        # Leave room for the packet header in the server's max packet length.
        cap = max(DEFAULT_IO_SIZE, (lim.max_packet or 2**18) - 1024)
        self.max_read = min(lim.max_read or cap, cap)
        self.max_write = min(lim.max_write or cap, cap)
        log.debug("SFTP I/O sizes: read %d, write %d", self.max_read, self.max_write)

    def has(self, ext: bytes) -> bool:
        return ext in self.extensions

    def close(self, reason: str = "closed") -> None:
        """Drop the channel and fail every waiting request."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._sendq.put(None)
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001 - closing a broken channel may raise anything
            pass
        self._fail_all(reason)

    # ---- I/O ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Parse replies as they arrive, in the trio thread.

        paramiko marks a pipe readable whenever the channel has data, so trio
        waits on it like any socket: no thread hand-off per reply.
        """
        rest = b""  # the start of a packet whose end has not arrived yet
        reason = "server closed the SFTP channel"
        fd = self.chan.fileno()
        try:
            while not self.closed:
                await trio.lowlevel.wait_readable(fd)
                if not self.chan.recv_ready():
                    if self.chan.closed or self.chan.eof_received:
                        break
                    continue
                # Take everything buffered: paramiko's pipe copies what stays behind
                # on every partial read, which made big reads quadratic.
                data = self.chan.recv(WINDOW_SIZE)  # data is ready: this does not block
                if not data:
                    break
                packets, rest = p.split_packets(rest, data)
                for body in packets:
                    self._deliver(body)
        except Exception as e:  # noqa: BLE001 - any transport failure ends the session
            reason = f"SFTP channel failed: {e}"
        self.close(reason)

    def _send(self, data: bytes) -> None:
        """Send a packet, keeping order with packets queued before it.

        Small packets go out directly from the trio thread when the writer
        thread is idle and the channel window has room (no blocking, no
        hand-off); anything else waits its turn in the writer's queue.
        """
        with self._send_lock:
            if self._backlog == 0 and self.chan.out_window_size >= len(data) + 1024:
                try:
                    self.chan.sendall(memoryview(data))
                except Exception as e:  # noqa: BLE001
                    self.close(f"SFTP send failed: {e}")
                return
            self._backlog += 1
        self._sendq.put(data)

    def _write_loop(self) -> None:
        while True:
            data = self._sendq.get()
            if data is None:
                return
            try:
                self.chan.sendall(memoryview(data))
            except Exception as e:  # noqa: BLE001
                try:
                    self._token.run_sync_soon(self.close, f"SFTP send failed: {e}")
                except trio.RunFinishedError:
                    pass
                return
            finally:
                with self._send_lock:
                    self._backlog -= 1

    # ---- trio side -------------------------------------------------------------

    def _deliver(self, body: memoryview) -> None:
        self._last_rx = trio.current_time()
        if len(body) < 5:
            return
        w = self._pending.pop(int.from_bytes(body[1:5], "big"), None)
        if w is not None:
            w.body = body
            w.event.set()

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for w in pending.values():
            w.error = ConnectionLost(f"SFTP connection lost: {reason}")
            w.event.set()

    async def request(self, ptype: int, *fields: bytes) -> tuple[int, p.Reader]:
        """Send one request and wait for its reply: (reply type, reader after the id)."""
        (reply,) = await self.pipeline((ptype, *fields))
        return reply

    async def pipeline(self, *requests: tuple) -> list[tuple[int, p.Reader]]:
        """Send requests back to back, in order, then wait for all replies.

        OpenSSH handles a channel's requests in order, so e.g. OPEN then LSTAT
        of the same path creates and stats a file in one round trip.
        """
        waiters: list[tuple[int, _Waiter]] = []
        async with self._slots.take(len(requests)):
            if self.closed:
                raise ConnectionLost(f"SFTP connection lost: {self.close_reason}")
            packets = []
            for ptype, *fields in requests:
                rid = next(self._ids) & 0xFFFFFFFF
                w = _Waiter()
                self._pending[rid] = w
                self.sent += 1
                waiters.append((rid, w))
                packets.append(p.packet(ptype, rid, *fields))
            # One send: the requests share SSH packets (one encryption, one syscall).
            t0 = trio.current_time()
            self._send(b"".join(packets))
            try:
                for _rid, w in waiters:
                    await self._wait(w)
                took = trio.current_time() - t0
                if self.rtt is None or took < self.rtt:
                    self.rtt = took
            finally:
                for rid, _w in waiters:
                    self._pending.pop(rid, None)
        out = []
        for _rid, w in waiters:
            if w.error is not None:
                raise w.error
            assert w.body is not None
            out.append((w.body[0], p.Reader(w.body, 5)))
        return out

    async def submit(self, ptype: int, *fields: bytes | memoryview
                     ) -> Callable[[], Awaitable[tuple[int, p.Reader]]]:
        """Queue a request now, in call order, and return a function awaiting its reply.

        Writes use this: the request is on the wire before the syscall
        returns, so a later read or write of the same file cannot overtake it.
        """
        slot = self._slots.take(1)
        await slot.__aenter__()
        if self.closed:
            await slot.__aexit__()
            raise ConnectionLost(f"SFTP connection lost: {self.close_reason}")
        rid = next(self._ids) & 0xFFFFFFFF
        w = _Waiter()
        self._pending[rid] = w
        self.sent += 1
        self._send(p.packet(ptype, rid, *fields))

        async def reply() -> tuple[int, p.Reader]:
            try:
                await self._wait(w)
            finally:
                self._pending.pop(rid, None)
                await slot.__aexit__()
            if w.error is not None:
                raise w.error
            assert w.body is not None
            return w.body[0], p.Reader(w.body, 5)

        return reply

    async def _wait(self, w: _Waiter) -> None:
        # A slow reply is fine while the server keeps sending something; silence
        # for a whole timeout means the link is dead, and a syscall must not hang.
        while True:
            with trio.move_on_after(self.request_timeout):
                await w.event.wait()
                return
            if trio.current_time() - self._last_rx >= self.request_timeout:
                self.close(f"no answer for {self.request_timeout:g} s")
                raise RequestTimeout(self.request_timeout)

    async def _status(self, ptype: int, *fields: bytes, path: bytes | None = None) -> None:
        rtype, r = await self.request(ptype, *fields)
        _check_status(rtype, r, path)

    async def _extended(self, name: bytes, *fields: bytes, path: bytes | None = None) -> p.Reader:
        rtype, r = await self.request(p.FXP_EXTENDED, p.string(name), *fields)
        if rtype == p.FXP_EXTENDED_REPLY:
            return r
        _check_status(rtype, r, path)
        return r

    async def _expect(self, want: int, ptype: int, *fields: bytes, path: bytes | None = None) -> p.Reader:
        rtype, r = await self.request(ptype, *fields)
        if rtype != want:
            _check_status(rtype, r, path)
            raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {rtype}", path)
        return r

    # ---- operations -----------------------------------------------------------

    async def realpath(self, path: bytes) -> bytes:
        r = await self._expect(p.FXP_NAME, p.FXP_REALPATH, p.string(path), path=path)
        if r.u32() < 1:
            raise SftpError(p.FX_BAD_MESSAGE, "empty REALPATH reply", path)
        return r.string()

    async def stat(self, path: bytes) -> p.Attrs:
        return (await self._expect(p.FXP_ATTRS, p.FXP_STAT, p.string(path), path=path)).attrs()

    async def realpath_and_stat(self, path: bytes) -> tuple[bytes, p.Attrs]:
        """The canonical path and the attributes it leads to, in one round trip."""
        (t1, r1), (t2, r2) = await self.pipeline((p.FXP_REALPATH, p.string(path)),
                                                 (p.FXP_STAT, p.string(path)))
        if t1 != p.FXP_NAME:
            _check_status(t1, r1, path)
            raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {t1}", path)
        if r1.u32() < 1:
            raise SftpError(p.FX_BAD_MESSAGE, "empty REALPATH reply", path)
        real = r1.string()
        if t2 != p.FXP_ATTRS:
            _check_status(t2, r2, path)
            raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {t2}", path)
        return real, r2.attrs()

    async def lstat(self, path: bytes) -> p.Attrs:
        return (await self._expect(p.FXP_ATTRS, p.FXP_LSTAT, p.string(path), path=path)).attrs()

    async def fstat(self, handle: bytes) -> p.Attrs:
        return (await self._expect(p.FXP_ATTRS, p.FXP_FSTAT, p.string(handle))).attrs()

    async def setstat(self, path: bytes, attrs: p.Attrs) -> None:
        await self._status(p.FXP_SETSTAT, p.string(path), attrs.encode(), path=path)

    async def lsetstat(self, path: bytes, attrs: p.Attrs) -> None:
        """setstat that does not follow a symlink (lsetstat@openssh.com)."""
        await self._extended(b"lsetstat@openssh.com", p.string(path), attrs.encode(), path=path)

    async def fsetstat(self, handle: bytes, attrs: p.Attrs) -> None:
        await self._status(p.FXP_FSETSTAT, p.string(handle), attrs.encode())

    async def open(self, path: bytes, pflags: int, attrs: p.Attrs | None = None) -> bytes:
        fields = (p.string(path), p.u32(pflags), (attrs or p.Attrs()).encode())
        return (await self._expect(p.FXP_HANDLE, p.FXP_OPEN, *fields, path=path)).string()

    async def opendir(self, path: bytes) -> bytes:
        return (await self._expect(p.FXP_HANDLE, p.FXP_OPENDIR, p.string(path), path=path)).string()

    async def close_handle(self, handle: bytes) -> None:
        await self._status(p.FXP_CLOSE, p.string(handle))

    async def read(self, handle: bytes, offset: int, length: int, *,
                   view: bool = False) -> bytes | memoryview:
        """Up to `length` bytes at `offset`; b"" at end of file. With `view`, a view
        into the received data (see Reader.string_view) instead of a copy."""
        rtype, r = await self.request(p.FXP_READ, p.string(handle), p.u64(offset), p.u32(length))
        if rtype == p.FXP_DATA:
            return r.string_view() if view else r.string()
        if rtype == p.FXP_STATUS and r.u32() == p.FX_EOF:
            return b""
        r.pos = 5
        _check_status(rtype, r, None)
        raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {rtype}")

    async def write(self, handle: bytes, offset: int, data: bytes | memoryview) -> None:
        await (await self.submit_write(handle, offset, data))()

    async def submit_write(self, handle: bytes, offset: int,
                           data: bytes | memoryview) -> Callable[[], Awaitable[None]]:
        """Put a WRITE on the wire now; the returned function awaits its status."""
        # The data goes in as a length and a view: copied once, into the packet.
        reply = await self.submit(p.FXP_WRITE, p.string(handle), p.u64(offset), p.u32(len(data)),
                                  data)

        async def status() -> None:
            rtype, r = await reply()
            _check_status(rtype, r, None)

        return status

    async def submit_finish(self, handle: bytes,
                            attrs: p.Attrs) -> Callable[[], Awaitable[p.Attrs]]:
        """Send FSETSTAT, FSTAT and CLOSE of a written file now; await the result later.

        Sent right behind the file's last WRITEs, they cost no round trip of their own.
        """
        replies = [await self.submit(p.FXP_FSETSTAT, p.string(handle), attrs.encode()),
                   await self.submit(p.FXP_FSTAT, p.string(handle)),
                   await self.submit(p.FXP_CLOSE, p.string(handle))]

        async def result() -> p.Attrs:
            (t1, r1), (t2, r2), (t3, r3) = [await reply() for reply in replies]
            _check_status(t1, r1, None)
            _check_status(t3, r3, None)
            if t2 != p.FXP_ATTRS:
                _check_status(t2, r2, None)
                raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {t2}")
            return r2.attrs()

        return result

    async def fstat_and_close(self, handle: bytes) -> p.Attrs | None:
        """Final attributes of a written file and its close, in one round trip."""
        (t1, r1), (t2, r2) = await self.pipeline((p.FXP_FSTAT, p.string(handle)),
                                                 (p.FXP_CLOSE, p.string(handle)))
        _check_status(t2, r2, None)
        return r1.attrs() if t1 == p.FXP_ATTRS else None

    async def listdir(self, path: bytes) -> list[tuple[bytes, bytes | None, p.Attrs]]:
        """All entries of a directory: (name, longname, attrs), '.' and '..' included.

        READDIRs go out several at a time on the one handle (OpenSSH answers
        them in order): two at first, since most directories fit in one
        batch of ~100 names, then more while the directory keeps going. The
        handle is closed without waiting for the answer.
        """
        handle = await self.opendir(path)
        out: list[tuple[bytes, bytes | None, p.Attrs]] = []
        try:
            ahead = 2
            done = False
            while not done:
                replies = await self.pipeline(*[(p.FXP_READDIR, p.string(handle))] * ahead)
                for rtype, r in replies:
                    batch = _names(rtype, r, path)
                    if batch is None:
                        done = True
                        break
                    out.extend(batch)
                ahead = min(ahead * 2, READDIR_AHEAD)
        finally:
            self.close_nowait(handle)
        return out

    def close_nowait(self, handle: bytes) -> None:
        """Close a handle in the background: nobody needs to wait for it."""
        if not self.closed:
            trio.lowlevel.spawn_system_task(self._close_quietly, handle, name="sftp-close")

    async def _close_quietly(self, handle: bytes) -> None:
        try:
            await self.close_handle(handle)
        except OSError:
            pass

    async def open_and_lstat(self, path: bytes, pflags: int, attrs: p.Attrs) -> tuple[bytes, p.Attrs]:
        """Open (create) a file and stat it in one round trip."""
        (t1, r1), (t2, r2) = await self.pipeline(
            (p.FXP_OPEN, p.string(path), p.u32(pflags), attrs.encode()),
            (p.FXP_LSTAT, p.string(path)))
        if t1 != p.FXP_HANDLE:
            _check_status(t1, r1, path)
            raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {t1}", path)
        handle = r1.string()
        if t2 != p.FXP_ATTRS:
            _check_status(t2, r2, path)
        return handle, r2.attrs()

    async def then_lstat(self, ptype: int, *fields: bytes, path: bytes) -> p.Attrs:
        """A STATUS request on `path` followed by an LSTAT of it, in one round trip."""
        (t1, r1), (t2, r2) = await self.pipeline((ptype, *fields), (p.FXP_LSTAT, p.string(path)))
        _check_status(t1, r1, path)
        if t2 != p.FXP_ATTRS:
            _check_status(t2, r2, path)
            raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {t2}", path)
        return r2.attrs()

    async def remove(self, path: bytes) -> None:
        await self._status(p.FXP_REMOVE, p.string(path), path=path)

    async def mkdir(self, path: bytes, attrs: p.Attrs) -> None:
        await self._status(p.FXP_MKDIR, p.string(path), attrs.encode(), path=path)

    async def rmdir(self, path: bytes) -> None:
        await self._status(p.FXP_RMDIR, p.string(path), path=path)

    async def rename(self, old: bytes, new: bytes) -> None:
        """Plain SFTP rename: fails if `new` exists."""
        await self._status(p.FXP_RENAME, p.string(old), p.string(new), path=old)

    async def posix_rename(self, old: bytes, new: bytes) -> None:
        """rename(2) semantics: atomically replaces `new` (posix-rename@openssh.com)."""
        await self._extended(b"posix-rename@openssh.com", p.string(old), p.string(new), path=old)

    async def readlink(self, path: bytes) -> bytes:
        r = await self._expect(p.FXP_NAME, p.FXP_READLINK, p.string(path), path=path)
        if r.u32() < 1:
            raise SftpError(p.FX_BAD_MESSAGE, "empty READLINK reply", path)
        return r.string()

    async def symlink(self, target: bytes, linkpath: bytes) -> None:
        # OpenSSH swapped the arguments of SYMLINK long ago and every client
        # follows it (PROTOCOL section 4.1): target first, then the link.
        await self._status(p.FXP_SYMLINK, p.string(target), p.string(linkpath), path=linkpath)

    async def hardlink(self, old: bytes, new: bytes) -> None:
        await self._extended(b"hardlink@openssh.com", p.string(old), p.string(new), path=new)

    async def statvfs(self, path: bytes) -> p.Statvfs:
        return p.Statvfs.decode(await self._extended(b"statvfs@openssh.com", p.string(path), path=path))

    async def fsync(self, handle: bytes) -> None:
        await self._extended(b"fsync@openssh.com", p.string(handle))


def _names(rtype: int, r: p.Reader, path: bytes) -> list | None:
    """Entries of one READDIR reply; None at end of directory."""
    if rtype == p.FXP_STATUS:
        if r.u32() == p.FX_EOF:
            return None
        r.pos = 5
        _check_status(rtype, r, path)
    if rtype != p.FXP_NAME:
        raise SftpError(p.FX_BAD_MESSAGE, f"unexpected reply type {rtype}", path)
    entries = []
    for _ in range(r.u32()):
        name = r.string()
        longname = r.string()
        entries.append((name, longname, r.attrs()))
    return entries


def _check_status(rtype: int, r: p.Reader, path: bytes | None) -> None:
    if rtype != p.FXP_STATUS:
        return
    code = r.u32()
    if code == p.FX_OK:
        return
    msg = ""
    try:
        msg = r.string().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the message is optional in practice
        pass
    raise SftpError(code, msg, path)


def valid_names(entries: Iterable[tuple[bytes, bytes | None, p.Attrs]]):
    """Drop names a server must never send: they would escape the directory."""
    for name, _longname, attrs in entries:
        if name in (b".", b".."):
            continue
        if not name or b"/" in name or b"\0" in name:
            log.warning("ignoring invalid file name from server: %r", name)
            continue
        yield name, attrs
