"""Fixtures: a real SFTP-only sshd, real FUSE mounts made by the sftpfs CLI.

- ``sftp_server``  (session) an :class:`tests.server.SftpServer`.
- ``remote_dir``   a fresh directory on the server for this test, owned by the
                   SFTP user (``sftp_server.root / <test name>``).
- ``sftpfs_env``   environment for sftpfs processes: no SSH agent, private
                   HOME / XDG_CACHE_HOME / XDG_RUNTIME_DIR per test.
- ``run_sftpfs``   ``run_sftpfs(*args, input=None, timeout=60, env=None)`` runs
                   ``python -m sftpfs ARGS`` and returns the CompletedProcess
                   (text mode); for tests of failing mounts.
- ``mountpoint``   ``mountpoint(name="mnt")`` makes an empty directory that is
                   unmounted at teardown whatever happened.
- ``mount``        ``mount(remote_path=None, *, opts=(), extra_args=()) -> Path``
                   mounts and returns the mount point; ``mount.unmount(mnt)``
                   unmounts (the durability barrier: afterwards everything
                   written is on the server).
- ``small_fs``     ``small_fs(size="1m") -> Path`` a size-limited tmpfs inside
                   ``remote_dir`` (root only), unmounted at teardown.

Missing prerequisites (sshd, /dev/fuse, fusermount3) skip the tests that need
them, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server import HOST_ALIAS, ServerError, SftpServer, sshd_path

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# every mount point handed out in this session, for the final leak check
_ALL_MOUNTPOINTS: list[Path] = []


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def fuse_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"cannot open /dev/fuse: {e}"
    if not shutil.which("fusermount3"):
        return False, "fusermount3 not installed (apt install fuse3)"
    return True, ""


# --------------------------------------------------------------- mount table
def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) for every line of /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                out.append((_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return out


def is_mounted(path: Path | str) -> bool:
    target = os.path.realpath(path)
    return any(mp == target for _, mp, _ in mounts())


def fuse_mount_type(path: Path | str) -> str | None:
    target = os.path.realpath(path)
    for _, mp, fstype in mounts():
        if mp == target:
            return fstype
    return None


def _pids_with_arg(arg: str) -> list[int]:
    """Pids whose argv contains exactly ``arg`` (a unique tmp mount point path)."""
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(arg) in argv:
            pids.append(int(entry))
    return pids


def force_unmount(mnt: Path, env: dict | None = None, timeout: float = 60) -> list[str]:
    """Unmount ``mnt`` by every means; return notes on what had to be done."""
    notes: list[str] = []
    if is_mounted(mnt):
        try:
            r = subprocess.run(
                [sys.executable, "-m", "sftpfs", "unmount", str(mnt)],
                capture_output=True, text=True, timeout=timeout, env=env,
            )
            if r.returncode != 0:
                notes.append(f"sftpfs unmount rc={r.returncode}: {r.stderr.strip()}")
        except subprocess.TimeoutExpired:
            notes.append(f"sftpfs unmount timed out after {timeout}s")
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        notes.append("needed fusermount3 -uz")
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        notes.append("needed umount -l")
    # last resort: the daemon of this mount point (matched by the exact,
    # unique path in its argv) is still alive
    deadline = time.monotonic() + 10
    while (pids := _pids_with_arg(str(mnt))) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        notes.append(f"killed leftover daemon pid {pid}")
    return notes


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory):
    require(sshd_path() is not None, "OpenSSH sshd not installed (apt install openssh-server)")
    require(shutil.which("ssh-keygen") is not None, "ssh-keygen not installed")
    srv = SftpServer(tmp_path_factory.mktemp("sshd"))
    try:
        srv.start()
    except ServerError as e:
        srv.stop()
        pytest.fail(f"cannot start sshd: {e}", pytrace=False)
    yield srv
    srv.stop()


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return name[:80] or "test"


@pytest.fixture
def remote_dir(sftp_server: SftpServer, request) -> Path:
    base = _safe_name(request.node.name)
    name, n = base, 1
    while (sftp_server.root / name).exists():
        n += 1
        name = f"{base}-{n}"
    d = sftp_server.mkdir(name)
    yield d
    # free space (100 MB files...), but never recurse into a mount
    real = os.path.realpath(d)
    if not any(mp == real or mp.startswith(real + "/") for _, mp, _ in mounts()):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sftpfs_env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("env")
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("SSH_AGENT_PID", None)
    for var, sub in (("HOME", "home"), ("XDG_CACHE_HOME", "cache"), ("XDG_RUNTIME_DIR", "run")):
        p = base / sub
        p.mkdir(mode=0o700)
        env[var] = str(p)
    env.pop("XDG_CONFIG_HOME", None)
    return env


@pytest.fixture
def run_sftpfs(sftpfs_env):
    def run(*args, input: str | None = None, timeout: float = 60, env: dict | None = None,
            cmd_prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = [*cmd_prefix, sys.executable, "-m", "sftpfs", *map(str, args)]
        return subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
            env=env if env is not None else sftpfs_env,
        )

    return run


class MountPoints:
    def __init__(self, base: Path, env: dict):
        self.base = base
        self.env = env
        self.made: list[Path] = []
        self.after_cleanup: list = []

    def __call__(self, name: str = "mnt") -> Path:
        p, n = self.base / name, 1
        while p.exists():
            n += 1
            p = self.base / f"{name}{n}"
        p.mkdir()
        self.made.append(p)
        _ALL_MOUNTPOINTS.append(p)
        return p

    def cleanup(self) -> list[str]:
        notes = []
        for p in reversed(self.made):
            for note in force_unmount(p, self.env):
                notes.append(f"{p}: {note}")
        for fn in self.after_cleanup:
            fn()
        return notes


@pytest.fixture
def mountpoint(tmp_path_factory, sftpfs_env):
    mps = MountPoints(tmp_path_factory.mktemp("mnt"), sftpfs_env)
    yield mps
    notes = mps.cleanup()
    # a mount that `sftpfs unmount` could not remove is a bug worth seeing:
    # it shows as an error in this test's teardown
    if notes:
        pytest.fail("unmount at teardown was not clean:\n  " + "\n  ".join(notes), pytrace=False)


class Mounter:
    """``mount(remote_path=None, *, opts=(), extra_args=(), mnt=None) -> Path``"""

    def __init__(self, server: SftpServer, remote_dir: Path, mountpoint: MountPoints,
                 env: dict, logdir: Path):
        self.server = server
        self.remote_dir = remote_dir
        self.mountpoint = mountpoint
        self.env = env
        self.logdir = logdir
        self.logs: dict[Path, Path] = {}

    def __call__(self, remote_path: Path | str | None = None, *, opts=(), extra_args=(),
                 mnt: Path | None = None, log: bool = True, timeout: float = 60,
                 ssh_config: Path | None = None, source: str | None = None,
                 input: str | None = None) -> Path:
        """Mount and return the mount point.  ``source`` replaces the whole
        remote spec ("sftpfs-test:REMOTE_PATH"); ``ssh_config`` replaces the
        server's ssh_config for -F; ``input`` is fed to stdin (password_stdin)."""
        ok, why = fuse_available()
        require(ok, why)
        remote_path = self.remote_dir if remote_path is None else remote_path
        mnt = self.mountpoint() if mnt is None else mnt
        opts = list(opts)
        logfile = None
        if log and not any(o.startswith("log=") for o in opts):
            logfile = self.logdir / f"{mnt.name}-{len(self.logs)}.log"
            opts.append(f"log={logfile}")
        source = source or f"{HOST_ALIAS}:{remote_path}"
        cmd = [sys.executable, "-m", "sftpfs", "mount", source, str(mnt),
               "-F", str(ssh_config or self.server.ssh_config)]
        if opts:
            cmd += ["-o", ",".join(opts)]
        cmd += list(extra_args)
        try:
            r = subprocess.run(cmd, input=input,
                               stdin=subprocess.DEVNULL if input is None else None,
                               capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"sftpfs mount did not return within {timeout}s: {cmd}\n"
                        f"stderr: {e.stderr}\n{self._log(logfile)}", pytrace=False)
        if r.returncode != 0:
            pytest.fail(f"sftpfs mount failed (rc={r.returncode}): {' '.join(cmd)}\n"
                        f"stderr: {r.stderr}\nstdout: {r.stdout}\n{self._log(logfile)}",
                        pytrace=False)
        if not is_mounted(mnt):
            pytest.fail(f"sftpfs mount returned 0 but {mnt} is not mounted\n"
                        f"stderr: {r.stderr}\n{self._log(logfile)}", pytrace=False)
        if logfile:
            self.logs[mnt] = logfile
        return mnt

    def _log(self, logfile: Path | None, tail: int = 60) -> str:
        if not logfile or not logfile.exists():
            return ""
        lines = logfile.read_text(errors="replace").splitlines()[-tail:]
        return "sftpfs log (tail):\n" + "\n".join(lines)

    def log_text(self, mnt: Path) -> str:
        lf = self.logs.get(mnt)
        return lf.read_text(errors="replace") if lf and lf.exists() else ""

    def unmount(self, mnt: Path, timeout: float = 60) -> subprocess.CompletedProcess:
        """``sftpfs unmount MNT``: must succeed and leave nothing mounted."""
        try:
            r = subprocess.run([sys.executable, "-m", "sftpfs", "unmount", str(mnt)],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sftpfs unmount {mnt} did not return within {timeout}s\n"
                        f"{self._log(self.logs.get(mnt))}", pytrace=False)
        assert r.returncode == 0, (
            f"sftpfs unmount failed (rc={r.returncode}): {r.stderr}\n{self._log(self.logs.get(mnt))}"
        )
        assert not is_mounted(mnt), f"{mnt} still mounted after sftpfs unmount"
        return r


@pytest.fixture
def mount(sftp_server, remote_dir, mountpoint, sftpfs_env, tmp_path_factory):
    return Mounter(sftp_server, remote_dir, mountpoint, sftpfs_env,
                   tmp_path_factory.mktemp("logs"))


@pytest.fixture
def small_fs(sftp_server, remote_dir, mountpoint):
    """``small_fs(size="1m", name="full") -> Path``: a tmpfs at remote_dir/name."""

    def make(size: str = "1m", name: str = "full") -> Path:
        p = sftp_server.make_small_fs(f"{remote_dir.name}/{name}", size)
        # unmounted only after every FUSE mount of the test is gone
        mountpoint.after_cleanup.append(lambda: sftp_server.unmount_small_fs(p))
        return p

    return make


@pytest.fixture(scope="session")
def fuse_ok():
    ok, why = fuse_available()
    require(ok, why)


# ------------------------------------------------------- session leak check
def pytest_sessionfinish(session, exitstatus):
    basetemp = None
    with contextlib.suppress(Exception):
        basetemp = os.path.realpath(session.config._tmp_path_factory.getbasetemp())
    ours = {os.path.realpath(p) for p in _ALL_MOUNTPOINTS}
    leaked = []
    for src, mp, fstype in mounts():
        if not (fstype == "fuse" or fstype.startswith("fuse.")):
            continue
        if mp in ours or (basetemp and mp.startswith(basetemp + "/")):
            leaked.append((src, mp, fstype))
    if leaked:
        msg = "\n".join(f"  {fstype} {src} on {mp}" for src, mp, fstype in leaked)
        sys.stderr.write(f"\n\nERROR: FUSE mounts left behind by the tests:\n{msg}\n")
        for _, mp, _ in leaked:
            force_unmount(Path(mp))
        session.exitstatus = 1
