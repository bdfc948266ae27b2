"""The daemon's side of the control channel (protocol: control.py).

A client that sends too much, too slowly, or stops reading is dropped; no
client can disturb the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from . import runtime
from .control import _address, encode

log = logging.getLogger(__name__)

MAX_REQUEST = 4096            # bytes in a request line, newline included
REQUEST_TIMEOUT = 10.0        # seconds a client may take to send its request line
SEND_TIMEOUT = 30.0           # seconds one reply line may take to be taken by the client
HEARTBEAT = 1.0               # during a sync, a progress line at least this often
MAX_CLIENTS = 64              # connections served at once; more wait in the backlog


class ControlHandler(Protocol):
    """What the daemon answers with (the write-back layer implements it)."""

    def status(self) -> dict:
        """connected, pending_ops, pending_files, pending_bytes, uploaded_bytes,
        failures [{path, error, recovery_path}], recovery [paths], remote, mountpoint."""
        ...

    async def sync(self, progress: Callable[[dict], None]) -> dict:
        """Wait until everything queued before the call is on the server (or failed),
        calling progress(status-like dict) about every 0.5 s; return status plus "ok"."""
        ...


async def serve_control(path: Path, handler: ControlHandler, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `handler` on the Unix socket `path` until cancelled, then remove it.

    Setup errors (the directory cannot be made private, bind fails) raise OSError
    before task_status.started(); afterwards nothing a client does ends this task.
    """
    path = Path(path)
    runtime.private_dir(path.parent)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, f"{path} is a directory")
    # Bind under a temporary name, make it 0600, then rename it over whatever is at
    # `path` (a stale socket of a daemon that died): never a moment with a wider mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(tmp) as addr:
            await sock.bind(addr)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        st = os.lstat(path)
        sock.listen(MAX_CLIENTS)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    ident = (st.st_dev, st.st_ino)
    log.debug("control socket %s", path)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    try:
        async with trio.open_nursery() as n:
            listener = trio.SocketListener(sock)
            task_status.started()
            await trio.serve_listeners(
                lambda stream: _serve_client(stream, handler, limiter), [listener],
                handler_nursery=n)
    finally:
        sock.close()
        # remove it only if it is still ours (not a later daemon's for the same point)
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == ident and stat.S_ISSOCK(st.st_mode):
                path.unlink()


class _ClientGone(Exception):
    pass


async def _send(stream: trio.SocketStream, message: dict) -> None:
    data = encode(message)
    with trio.move_on_after(SEND_TIMEOUT) as scope:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise _ClientGone(str(e)) from None
    if scope.cancelled_caught:
        raise _ClientGone("client does not read")


async def _read_request(stream: trio.SocketStream) -> bytes | None:
    """The request line (without newline); None if the client went away or stalled.
    Raises ValueError for a line longer than MAX_REQUEST."""
    buf = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            try:
                chunk = await stream.receive_some(MAX_REQUEST)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not chunk:
                # EOF: a last line without its newline still counts
                return bytes(buf) if buf.strip() else None
            nl = chunk.find(b"\n")
            if nl >= 0:
                buf += chunk[:nl]
                if len(buf) >= MAX_REQUEST:
                    raise ValueError("request line too long")
                return bytes(buf)
            buf += chunk
            if len(buf) >= MAX_REQUEST:
                raise ValueError("request line too long")
    return None


async def _serve_client(stream: trio.SocketStream, handler: ControlHandler,
                        limiter: trio.CapacityLimiter) -> None:
    async with limiter, stream:
        try:
            await _answer(stream, handler)
        except* _ClientGone as eg:
            log.debug("control client gone: %s", eg.exceptions[0])
        except* Exception:  # noqa: BLE001 - one bad request must not end the daemon
            log.exception("control request failed")
            with contextlib.suppress(_ClientGone):
                await _send(stream, {"error": "internal error in the sftpfs daemon (see its log)"})


async def _answer(stream: trio.SocketStream, handler: ControlHandler) -> None:
    try:
        line = await _read_request(stream)
    except ValueError as e:
        await _send(stream, {"error": str(e)})
        return
    if line is None:
        return
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        await _send(stream, {"error": "malformed request (expected one JSON object per line)"})
        return
    cmd = req.get("cmd") if isinstance(req, dict) else None
    if cmd == "status":
        await _send(stream, {"result": handler.status()})
    elif cmd == "sync":
        await _sync(stream, handler)
    elif isinstance(cmd, str):
        await _send(stream, {"error": f"unknown command {cmd[:64]!r} (known: status, sync)"})
    else:
        await _send(stream, {"error": 'malformed request (expected {"cmd": "..."})'})


async def _sync(stream: trio.SocketStream, handler: ControlHandler) -> None:
    """Run handler.sync; forward its progress (the newest only, if the client is
    slower than the handler), or a fresh status if it is quiet for HEARTBEAT s."""
    latest: dict | None = None
    wake = trio.Event()
    done = False

    def progress(d: dict) -> None:
        nonlocal latest
        if not done:
            latest = d
            wake.set()

    async def forward() -> None:
        # never cancelled from here: a cancel mid-send would cut a line in half
        nonlocal latest, wake
        while True:
            with trio.move_on_after(HEARTBEAT):
                await wake.wait()
            if done:
                return
            wake = trio.Event()
            item, latest = latest, None
            if item is None:
                item = handler.status()
            await _send(stream, {"progress": item})

    # where it starts from: the client's baseline for rate and total
    await _send(stream, {"progress": handler.status()})
    async with trio.open_nursery() as n:
        n.start_soon(forward)
        result = await handler.sync(progress)
        done = True
        wake.set()
    await _send(stream, {"result": result})


# ------------------------------------------------------------------- fallbacks


class LabelledHandler:
    """Adds "remote" and "mountpoint" to every dict a handler returns, if missing,
    and the daemon's counters to a status."""

    def __init__(self, inner: ControlHandler, *, remote: str, mountpoint: str,
                 stats: Callable[[], dict] | None = None) -> None:
        self.inner = inner
        self.labels = {"remote": remote, "mountpoint": mountpoint}
        self._stats = stats

    def _label(self, d: dict) -> dict:
        for k, v in self.labels.items():
            d.setdefault(k, v)
        return d

    def status(self) -> dict:
        d = self._label(dict(self.inner.status()))
        if self._stats is not None and "counters" not in d:
            try:
                d["counters"] = dict(self._stats())
            except Exception:  # noqa: BLE001 - counters are a courtesy
                d["counters"] = {}
        return d

    async def sync(self, progress: Callable[[dict], None]) -> dict:
        return self._label(dict(await self.inner.sync(lambda d: progress(self._label(dict(d))))))


class ReadOnlyHandler:
    """The handler of a daemon without write-back: nothing is ever pending.

    Writes go to the server before the syscall returns (pipelined), so a sync has
    nothing to wait for; status shows the connection and the daemon's counters.
    """

    def __init__(self, *, connected: Callable[[], bool], stats: Callable[[], dict]) -> None:
        self._connected = connected
        self._stats = stats

    def status(self) -> dict:
        try:
            counters = dict(self._stats())
        except Exception:  # noqa: BLE001 - counters are a courtesy
            counters = {}
        return {"connected": bool(self._connected()), "pending_ops": 0, "pending_files": 0,
                "pending_bytes": 0, "uploaded_bytes": 0, "failures": [], "recovery": [],
                "counters": counters}

    async def sync(self, progress: Callable[[dict], None]) -> dict:
        return {**self.status(), "ok": True}


