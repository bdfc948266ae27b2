"""The control channel: a Unix socket served by the mount daemon (controlserver.py),
and its client, here: `sftpfs sync|status|unmount` need neither trio nor paramiko.

`sftpfs sync`, `sftpfs status` and `sftpfs unmount` talk to the daemon of a
mount point through `$XDG_RUNTIME_DIR/sftpfs/mount-<key>.sock` (keyed like the
pid file). The socket is 0600 in a 0700 directory: only its owner may ask.

Protocol: newline-delimited JSON, one request per connection.

    -> {"cmd": "status"}
    <- {"result": {...status...}}

    -> {"cmd": "sync"}
    <- {"progress": {...status...}}      one at once, then about every 0.5 s
    <- {"result": {...status..., "ok": true}}

    -> anything else
    <- {"error": "one line"}

A client that sends too much, too slowly, or stops reading is dropped; no
client can disturb the daemon. While a sync runs, the daemon sends a progress
line at least every second (the handler's own, or a fresh status), so a client
can tell a slow upload from a daemon that stopped answering.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import runtime

log = logging.getLogger(__name__)

MAX_REPLY = 64 * 2**20        # bytes in one reply line (a status with many failures)
CONNECT_TIMEOUT = 5.0         # client: connecting to the daemon
STATUS_TIMEOUT = 15.0         # client: default whole-request limit for everything but sync
IDLE_TIMEOUT = 60.0           # client: longest silence from the daemon while waiting

_SUN_PATH_MAX = 107           # sockaddr_un.sun_path, less the terminating NUL


class ControlError(Exception):
    """The control channel failed; str() is a one-line message for the user."""


def control_path(mountpoint: Path) -> Path:
    """The control socket of the daemon serving `mountpoint` (never stats the mount)."""
    return runtime.pidfile(mountpoint).with_suffix(".sock")


# ------------------------------------------------------------------------- common


def _jsonable(o: Any) -> Any:
    if isinstance(o, bytes):
        return os.fsdecode(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def encode(message: dict) -> bytes:
    """One protocol line; ASCII only (non-UTF-8 names travel as \\udcXX escapes)."""
    return json.dumps(message, default=_jsonable, separators=(",", ":")).encode() + b"\n"


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address for `path` that fits in sun_path: the path itself, or, when it is
    too long, the same file named through /proc/self/fd/N of its directory."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > _SUN_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket name too long: {path}")
        yield short
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- client


def request(mountpoint: Path, cmd: str, on_progress: Callable[[dict], None] | None = None,
            timeout: float | None = None) -> dict:
    """Ask the daemon of `mountpoint`; return the "result" dict.

    `timeout` limits the whole request (default: STATUS_TIMEOUT, none for "sync");
    a daemon silent for IDLE_TIMEOUT seconds fails it in any case. Raises
    ControlError with a one-line message.
    """
    mp = Path(os.path.abspath(mountpoint))
    path = control_path(mp)
    if timeout is None and cmd != "sync":
        timeout = STATUS_TIMEOUT
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.settimeout(CONNECT_TIMEOUT if timeout is None else min(CONNECT_TIMEOUT, timeout))
            with _address(path) as addr:
                sock.connect(addr)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ControlError(_no_daemon(mp)) from None
        except TimeoutError:
            raise ControlError(f"the sftpfs daemon for {mp} does not answer") from None
        except OSError as e:
            raise ControlError(f"cannot reach the sftpfs daemon for {mp}: "
                               f"{e.strerror or e}") from None
        try:
            sock.sendall(encode({"cmd": cmd}))
        except OSError as e:
            raise ControlError(f"cannot reach the sftpfs daemon for {mp}: "
                               f"{e.strerror or e}") from None
        for msg in _replies(sock, mp, deadline, timeout):
            if "progress" in msg:
                if on_progress is not None and isinstance(msg["progress"], dict):
                    on_progress(msg["progress"])
            elif "result" in msg and isinstance(msg["result"], dict):
                return msg["result"]
            elif "error" in msg:
                raise ControlError(f"sftpfs daemon for {mp}: {msg['error']}")
            else:
                raise ControlError(f"unexpected answer from the sftpfs daemon for {mp}")
        raise ControlError(f"the sftpfs daemon for {mp} closed the connection "
                           f"without an answer (did it just unmount?)")
    finally:
        sock.close()


def _no_daemon(mp: Path) -> str:
    """Why nobody listens: not mounted, or a mount whose daemon died."""
    try:
        dead = runtime.is_mounted(mp, b"fuse.sftpfs")
    except OSError:
        dead = False
    if dead:
        return (f"the sftpfs daemon for {mp} is gone; clear the dead mount with: "
                f"fusermount3 -u {mp}")
    return f"no sftpfs daemon for {mp} (is it mounted?)"


def _replies(sock: socket.socket, mp: Path, deadline: float | None,
             timeout: float | None) -> Iterator[dict]:
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise ControlError(f"unreadable answer from the sftpfs daemon for {mp}") from None
            if not isinstance(msg, dict):
                raise ControlError(f"unexpected answer from the sftpfs daemon for {mp}")
            yield msg
        wait = IDLE_TIMEOUT
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"no answer from the sftpfs daemon for {mp} "
                                   f"within {timeout:g} s")
            wait = min(wait, left)
        sock.settimeout(wait)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise ControlError(f"no answer from the sftpfs daemon for {mp} "
                                   f"within {timeout:g} s") from None
            raise ControlError(f"the sftpfs daemon for {mp} stopped answering "
                               f"(silent for {IDLE_TIMEOUT:g} s)") from None
        except OSError as e:
            raise ControlError(f"connection to the sftpfs daemon for {mp} failed: "
                               f"{e.strerror or e}") from None
        if not chunk:
            return
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise ControlError(f"answer from the sftpfs daemon for {mp} is too long")
