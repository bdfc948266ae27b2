"""Where sftpfs keeps its files, and what the system says is mounted.

XDG base directories, created private (0700): cache and logs may name remote
files, which is nobody else's business.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def _xdg(var: str, default: str) -> Path:
    v = os.environ.get(var)
    return Path(v) if v and os.path.isabs(v) else Path.home() / default


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "sftpfs"


def state_home() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "sftpfs"


def runtime_home() -> Path:
    v = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(v) if v and os.path.isabs(v) else Path(f"/tmp/sftpfs-{os.getuid()}")
    return base / "sftpfs" if v else base


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make sure only its owner can enter it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def canonical(mountpoint: Path) -> bytes:
    """Absolute real path of a mount point, without stat'ing the point itself.

    A stat of a mounted sftpfs is answered by its daemon, which may be this
    very process (deadlock) or a dead one (ENOTCONN).
    """
    mp = os.path.abspath(mountpoint)
    return os.fsencode(os.path.join(os.path.realpath(os.path.dirname(mp)), os.path.basename(mp)))


def remote_cache_dir(base: Path, user: str, host: str, port: int, root: bytes) -> Path:
    """The private cache directory of one remote tree (user, host, port, root path).

    Named by a hash, so a listing of the cache directory reveals no host or
    path names; `remote.txt` inside says which remote it is.
    """
    ident = f"{user}@{host}:{port}:".encode() + root
    d = private_dir(base / hashlib.sha256(ident).hexdigest()[:24])
    label = d / "remote.txt"
    if not label.exists():
        label.write_bytes(f"{user}@{host}:{port}:".encode() + root + b"\n")
    return d


def pidfile(mountpoint: Path) -> Path:
    key = hashlib.sha256(canonical(mountpoint)).hexdigest()[:16]
    return runtime_home() / f"mount-{key}.pid"


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def mounts() -> list[tuple[bytes, bytes, bytes]]:
    """(source, mount point, type) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            parts = line.split(b" ")
            if len(parts) >= 3:
                out.append((_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def mount_device(mountpoint: Path) -> str | None:
    """"major:minor" of the newest mount on `mountpoint` (from /proc/self/mountinfo:
    a stat of a FUSE mount would ask its own, possibly not yet serving, daemon)."""
    target, found = canonical(mountpoint), None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                parts = line.split(b" ")
                if len(parts) > 4 and _unescape(parts[4]) == target:
                    found = parts[2].decode()
    except OSError:
        return None
    return found


def is_mounted(mountpoint: Path, fstype_prefix: bytes = b"") -> bool:
    target = canonical(mountpoint)
    return any(mp == target and t.startswith(fstype_prefix) for _s, mp, t in mounts())


def has_exited(pid: int) -> bool:
    """Whether process `pid` is gone or a zombie. A daemon's zombie waits for PID 1
    to reap it, which some inits do late (a second and more) and a container's
    shell-less init may never do: the process has exited all the same."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
