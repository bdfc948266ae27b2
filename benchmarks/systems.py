"""The file systems under test and how a fair user would mount each one.

Every system is mounted against the same server endpoint (the proxy's port when
latency is emulated) with key authentication and strict host key checking, and
unmounted so that the unmount returns only when the file system's process is
gone. A mount that hangs is torn down by force (lazy unmount, kill, abort the
FUSE connection), so one bad system cannot spoil the rest of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class MountError(RuntimeError):
    """A file system did not mount (or unmount) within its time."""


@dataclass
class Endpoint:
    """Where and as whom to connect; ``port`` is the proxy's port when RTT > 0."""

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a system under test: no ssh-agent, so only the key counts."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env.update(extra)
    return env


# ---------------------------------------------------------------- mount table

def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def mounts() -> list[str]:
    """Every mount point, from the kernel's table."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def mount_info(mnt: Path) -> dict | None:
    """The mountinfo entry of mnt (without touching the mount itself, which may hang)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                sep = fields.index("-")
                return {"dev": fields[2], "fstype": fields[sep + 1], "source": fields[sep + 2]}
    return None


def is_mounted(mnt: Path) -> bool:
    return mount_info(mnt) is not None


def run_exact(args: list[str], timeout: float, **popen) -> int:
    """Run a command and return its exit status the moment it exits.

    subprocess.run(timeout=) waits by polling, sleeping up to 50 ms between
    checks: a 0.26 s mount was reported as 0.31 or 0.36 s. A pidfd is readable
    when the process exits. Raises TimeoutExpired (the command killed) on time-out.
    """
    proc = subprocess.Popen(args, **popen)
    fd = os.pidfd_open(proc.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(args, timeout)
    finally:
        os.close(fd)
    return proc.wait()


def wait_until(pred, timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pids_using(mnt: Path, word: str) -> list[int]:
    """Processes whose command line names both ``word`` and mnt: a daemonized
    file system serving mnt (found by exact path, never killed by name alone)."""
    target = os.path.realpath(mnt)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if target in args and any(word in a for a in args):
            out.append(int(entry))
    return out


def force_unmount(mnt: Path, pids: list[int]) -> None:
    """Last resort: abort the FUSE connection, lazy-unmount, kill the daemon."""
    info = mount_info(mnt)
    if info and info["fstype"].startswith("fuse"):
        minor = info["dev"].split(":")[1]
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- base class

class Mount:
    """One live mount; ``unmount()`` returns the seconds it took."""

    rc_port = 0  # rclone's remote-control port

    def __init__(self, system: System, mnt: Path, proc: subprocess.Popen | None, log: Path):
        self.system, self.mnt, self.proc, self.log = system, mnt, proc, log
        self.pids: list[int] = [proc.pid] if proc else []

    def alive(self) -> bool:
        """Mounted and served (a daemon whose pid we could not find counts as alive)."""
        return is_mounted(self.mnt) and (not self.pids or any(pid_alive(p) for p in self.pids))

    def unmount(self, timeout: float) -> float:
        t0 = time.monotonic()
        try:
            self.system.unmount(self, timeout)
            if not wait_until(lambda: not self._running() and not is_mounted(self.mnt), timeout):
                raise MountError(f"{self.system.name} still running {timeout:.0f} s after unmount")
        except (MountError, subprocess.TimeoutExpired):
            self.kill()
            raise
        finally:
            if self.proc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
        return time.monotonic() - t0

    def _running(self) -> bool:
        return any(pid_alive(p) for p in self.pids)

    def kill(self) -> None:
        force_unmount(self.mnt, [p for p in self.pids if pid_alive(p)])
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class System:
    """A file system under test. Subclasses say how to mount, unmount and version it."""

    name = ""
    label = ""

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def mount(self, ep: Endpoint, remote: str, mnt: Path, cache_dir: Path, log: Path,
              timeout: float) -> Mount:
        raise NotImplementedError

    def unmount(self, m: Mount, timeout: float) -> None:
        _fusermount(m.mnt, timeout)

    # helpers
    def _foreground(self, args: list[str], mnt: Path, log: Path, timeout: float,
                    env: dict[str, str]) -> Mount:
        """Start a file system that stays in the foreground; return once mounted."""
        with open(log, "ab") as logf:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    env=env, start_new_session=True)
        m = Mount(self, mnt, proc, log)
        if not wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, timeout):
            m.kill()
            raise MountError(f"{self.name} did not mount within {timeout:.0f} s: {m.log_tail()}")
        if not is_mounted(mnt):
            raise MountError(f"{self.name} exited with {proc.returncode}: {m.log_tail()}")
        return m


def _fusermount(mnt: Path, timeout: float) -> None:
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise MountError(f"fusermount3 -u failed: {r.stderr.strip()}")


def _first_line(args: list[str], env: dict[str, str] | None = None) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0] if out else "unknown"


# ---------------------------------------------------------------- sftpfs

class Sftpfs(System):
    """This project: daemonizes on mount; ``unmount`` flushes and waits for the daemon."""

    name = "sftpfs"
    label = "sftpfs"

    def _cmd(self) -> list[str]:
        # -S: as sftpfs runs from its own virtualenv (README's install), not charged
        # for the .pth hooks of the Python that runs the benchmark (an editable
        # install's finder, machine-wide hooks: 20-30 ms of every command here);
        # the path they would have set up is given in PYTHONPATH (see _env).
        return [sys.executable, "-S", "-m", "sftpfs"]

    def _env(self, cache_dir: Path | None = None) -> dict[str, str]:
        env = clean_env()
        paths = [str(REPO_ROOT), env.get("PYTHONPATH"), *site.getsitepackages()]
        if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
            paths.append(site.getusersitepackages())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        if cache_dir is not None:
            env["XDG_CACHE_HOME"] = str(cache_dir.parent / (cache_dir.name + "-xdg"))
        return env

    def missing(self) -> str | None:
        # Run from compiled bytecode, as pip installs it: a source checkout run with
        # PYTHONDONTWRITEBYTECODE (set on some machines) would compile sftpfs at
        # every start, 0.1 s of each mount on a fast link.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "sftpfs")],
                       capture_output=True, timeout=120)
        r = subprocess.run(self._cmd() + ["--help"], capture_output=True, text=True,
                           env=self._env(), timeout=60)
        if r.returncode != 0:
            return f"python -m sftpfs --help failed: {(r.stderr or r.stdout).strip()[-300:]}"
        return None

    def version(self) -> str:
        return _first_line(self._cmd() + ["--version"], self._env())

    def mount(self, ep, remote, mnt, cache_dir, log, timeout):
        # log=: the daemon's own log goes into the benchmark's log of this system
        opts = (f"IdentityFile={ep.key},UserKnownHostsFile={ep.known_hosts},"
                f"cache_dir={cache_dir},log={log.resolve()}")
        args = self._cmd() + ["mount", f"{ep.user}@{ep.host}:{remote}", str(mnt),
                              "-p", str(ep.port), "-o", opts]
        with open(log, "ab") as logf:
            try:
                code = run_exact(args, timeout, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=logf, env=self._env(cache_dir))
            except subprocess.TimeoutExpired:
                code = None
        m = Mount(self, mnt, None, log)
        m.pids = pids_using(mnt, "sftpfs")
        if code != 0 or not is_mounted(mnt):
            m.kill()
            why = "timed out" if code is None else f"exit {code}"
            raise MountError(f"sftpfs mount {why}: {m.log_tail()}")
        return m

    def unmount(self, m, timeout):
        with open(m.log, "ab") as logf:
            code = run_exact(self._cmd() + ["unmount", str(m.mnt)], timeout,
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self._env())
        if code != 0:
            raise MountError(f"sftpfs unmount exit {code}: {m.log_tail()}")


# ---------------------------------------------------------------- sshfs

class Sshfs(System):
    """sshfs 3 with its shipped caching defaults; only the options a user needs to
    connect with a key and a strict known_hosts file. Run with -f so we own the pid."""

    name = "sshfs"
    label = "sshfs"

    def missing(self) -> str | None:
        return None if shutil.which("sshfs") else "sshfs not installed"

    def version(self) -> str:
        r = subprocess.run(["sshfs", "--version"], capture_output=True, text=True, timeout=30)
        for line in (r.stdout + r.stderr).splitlines():
            if line.startswith("SSHFS version"):
                return line
        return "unknown"

    def mount(self, ep, remote, mnt, cache_dir, log, timeout):
        opts = (f"IdentityFile={ep.key},UserKnownHostsFile={ep.known_hosts},"
                "StrictHostKeyChecking=yes,IdentitiesOnly=yes,BatchMode=yes")
        args = ["sshfs", "-f", "-p", str(ep.port), "-o", opts,
                f"{ep.user}@{ep.host}:{remote}", str(mnt)]
        return self._foreground(args, mnt, log, timeout, clean_env())


# ---------------------------------------------------------------- rclone

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rclone(System):
    """rclone mount with --vfs-cache-mode full.

    Against an SFTP-only server rclone would run ``md5sum``/``sha1sum`` over SSH to
    find hash support; ``--sftp-shell-type none`` and ``--sftp-disable-hashcheck``
    stop that. rclone uploads closed files ``--vfs-write-back`` (5 s) later and does
    not wait for its upload queue on unmount, so our unmount first waits, through
    rclone's remote control (``vfs/stats``), until nothing is queued or uploading.
    """

    name = "rclone"
    label = "rclone"

    def missing(self) -> str | None:
        return None if shutil.which("rclone") else "rclone not installed"

    def version(self) -> str:
        return _first_line(["rclone", "version"])

    def mount(self, ep, remote, mnt, cache_dir, log, timeout):
        rc_port = _free_port()
        config = cache_dir.parent / (cache_dir.name + "-rclone.conf")
        config.touch()  # empty: the remote is given on the command line
        args = ["rclone", "mount", f":sftp:{remote}", str(mnt),
                "--sftp-host", ep.host, "--sftp-port", str(ep.port), "--sftp-user", ep.user,
                "--sftp-key-file", str(ep.key), "--sftp-known-hosts-file", str(ep.known_hosts),
                "--sftp-shell-type", "none", "--sftp-disable-hashcheck",
                "--vfs-cache-mode", "full", "--cache-dir", str(cache_dir),
                "--config", str(config),
                "--rc", "--rc-addr", f"127.0.0.1:{rc_port}", "--rc-no-auth",
                "--log-level", "NOTICE"]
        m = self._foreground(args, mnt, log, timeout, clean_env())
        m.rc_port = rc_port
        return m

    def _pending_uploads(self, m: Mount) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{m.rc_port}/vfs/stats", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            disk = json.load(r).get("diskCache", {})
        return int(disk.get("uploadsInProgress", 0)) + int(disk.get("uploadsQueued", 0))

    def unmount(self, m, timeout):
        deadline = time.monotonic() + timeout
        try:
            while self._pending_uploads(m) and time.monotonic() < deadline:
                time.sleep(0.1)
        except OSError as e:
            print(f"  rclone rc vfs/stats failed ({e}); unmounting without waiting",
                  file=sys.stderr)
        _fusermount(m.mnt, max(1.0, deadline - time.monotonic()))


ALL = {s.name: s for s in (Sftpfs(), Sshfs(), Rclone())}
