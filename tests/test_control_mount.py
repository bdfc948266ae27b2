"""`sftpfs status`, `sftpfs sync` and `sftpfs unmount` against a real mount."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import is_mounted
from tests.test_cli import one_line_error


def _control_path(env: dict, mnt: Path) -> Path:
    """The daemon's socket, computed the way the daemon does, in the test's env."""
    from sftpfs import control

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
        return control.control_path(mnt)
    finally:
        mp.undo()


def test_status_on_a_live_mount(mount, run_sftpfs, sftpfs_env, remote_dir):
    (remote_dir / "hello").write_text("hello\n")
    (remote_dir / "r.bin").write_bytes(os.urandom(3 << 20))
    os.utime(remote_dir / "r.bin", (1_000_000_000, 1_000_000_000))  # old enough to cache
    mnt = mount()
    sock = _control_path(sftpfs_env, mnt)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700

    r = run_sftpfs("status", mnt)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{mnt}: ") and str(remote_dir) in lines[0], r.stdout
    assert "connection:  connected" in r.stdout, r.stdout
    # The mount's first requests measured the link: loopback, well under 50 ms.
    rtt = re.search(r"round trip ([0-9.]+) ms", r.stdout)
    assert rtt and 0 < float(rtt.group(1)) < 50, r.stdout
    assert "pending:" in r.stdout, r.stdout

    r = run_sftpfs("status", "--json", mnt)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["connected"] is True
    assert d["mountpoint"] == str(mnt)
    assert str(remote_dir) in d["remote"]
    for key in ("pending_ops", "pending_files", "pending_bytes", "uploaded_bytes"):
        assert isinstance(d[key], int) and d[key] >= 0, (key, d)
    assert isinstance(d["failures"], list) and isinstance(d["recovery"], list)

    # Reads show up in the block-cache counters: fetched once, then from the cache.
    for _ in range(2):
        with open(mnt / "r.bin", "rb") as f:  # a new open: the kernel's page cache is kept,
            f.read()                          # so the second read may not reach the daemon
    c = json.loads(run_sftpfs("status", "--json", mnt).stdout)["counters"]
    assert c["cache_fetched_bytes"] >= 3 << 20, c
    assert "read cache:" in run_sftpfs("status", mnt).stdout
    mount.unmount(mnt)
    assert not sock.exists(), "control socket left behind after unmount"


def test_sync_then_unmount(mount, run_sftpfs, remote_dir):
    mnt = mount()
    data = os.urandom(3 << 20)
    (mnt / "sub").mkdir()
    (mnt / "sub" / "f.bin").write_bytes(data)
    os.chmod(mnt / "sub" / "f.bin", 0o600)
    r = run_sftpfs("sync", mnt)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    # what sync promised is on the server, read directly
    assert (remote_dir / "sub" / "f.bin").read_bytes() == data
    assert stat.S_IMODE(os.stat(remote_dir / "sub" / "f.bin").st_mode) == 0o600
    r = run_sftpfs("status", "--json", mnt)
    d = json.loads(r.stdout)
    assert d["pending_ops"] == 0 and d["pending_files"] == 0 and d["pending_bytes"] == 0, d
    assert d["failures"] == [], d

    (mnt / "g").write_text("last words\n")
    r = run_sftpfs("unmount", mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    assert (remote_dir / "g").read_text() == "last words\n"
    # the daemon is gone, and says so in one line
    line = one_line_error(run_sftpfs("status", mnt))
    assert line == f"sftpfs: no sftpfs daemon for {mnt} (is it mounted?)"


def test_status_and_sync_not_mounted(run_sftpfs, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    for cmd in (("status", d), ("status", "--json", d), ("sync", d)):
        line = one_line_error(run_sftpfs(*cmd))
        assert line == f"sftpfs: no sftpfs daemon for {d} (is it mounted?)", line
    line = one_line_error(run_sftpfs("status", tmp_path / "nope"))
    assert "no sftpfs daemon" in line


def test_usage_errors(run_sftpfs, tmp_path):
    for args in (("status",), ("sync",), ("status", "a", "b"), ("sync", "--bogus", tmp_path)):
        r = run_sftpfs(*args)
        assert r.returncode != 0
        one_line_error(r)


@pytest.mark.parametrize("cmd", ["sync", "status", "unmount"])
def test_help(run_sftpfs, cmd):
    r = run_sftpfs(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert f"sftpfs {cmd} MOUNTPOINT" in r.stdout, r.stdout


def test_main_help_lists_commands(run_sftpfs):
    r = run_sftpfs("--help")
    assert r.returncode == 0
    for cmd in ("sftpfs sync MOUNTPOINT", "sftpfs status MOUNTPOINT", "sftpfs unmount MOUNTPOINT"):
        assert cmd in r.stdout, r.stdout


def test_unmount_without_control_socket(mount, run_sftpfs, sftpfs_env):
    """A daemon that does not answer on its socket (an older sftpfs) is still unmounted."""
    mnt = mount()
    sock = _control_path(sftpfs_env, mnt)
    sock.unlink()
    r = run_sftpfs("unmount", mnt)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert not is_mounted(mnt)


def test_failed_upload_reported(mount, run_sftpfs, small_fs, remote_dir):
    """The server refuses (disk full): sync says so in one line and fails, status
    shows the failure and where the data is kept, unmount warns but unmounts."""
    small_fs("1m", "full")
    mnt = mount()
    data = os.urandom(3 << 20)
    try:
        (mnt / "full" / "big").write_bytes(data)
    except OSError:
        pytest.skip("the write failed at once (no write-back): nothing left to report")
    r = run_sftpfs("sync", mnt, timeout=120)
    assert r.stderr.splitlines()[-1:] == [
        f"sftpfs: 1 file could not be uploaded, see: sftpfs status {mnt}"], (
        r.stderr + mount.log_text(mnt))
    assert r.returncode == 1

    d = json.loads(run_sftpfs("status", "--json", mnt).stdout)
    assert d["failures"], d
    f = d["failures"][0]
    assert f["path"].endswith("full/big") and f["error"], f
    kept = f.get("recovery_path") or f.get("recovery")
    assert kept and Path(kept).read_bytes() == data, f
    r = run_sftpfs("status", mnt)
    assert "failed:" in r.stdout and "full/big" in r.stdout and kept in r.stdout, r.stdout

    r = run_sftpfs("unmount", mnt, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    assert r.stderr.startswith("sftpfs: warning: 1 file could not be uploaded; unmounting "
                               "anyway, their data is kept in "), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_dead_daemon(mount, run_sftpfs, sftpfs_env):
    """The daemon was killed: status says the mount is dead and how to clear it;
    unmount (whose sync finds nobody) still clears it."""
    mnt = mount()
    pidfile = _control_path(sftpfs_env, mnt).with_suffix(".pid")
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    line = one_line_error(run_sftpfs("status", mnt))
    assert line == (f"sftpfs: the sftpfs daemon for {mnt} is gone; clear the dead mount "
                    f"with: fusermount3 -u {mnt}"), line
    r = run_sftpfs("unmount", mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_unmount_does_not_wait_for_the_reaper(mount, sftpfs_env):
    """The daemon is a zombie once it has exited, until its new parent (PID 1)
    reaps it; an init may take seconds, a container's may never. Here this test
    is that parent and does not reap: `sftpfs unmount` must return all the same."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    pid = None
    try:
        mnt = mount()
        pid = int(_control_path(sftpfs_env, mnt).with_suffix(".pid").read_text())
        t0 = time.monotonic()
        mount.unmount(mnt, timeout=30)
        elapsed = time.monotonic() - t0
        assert _state(pid) == "Z", "the daemon should have exited, unreaped"
        assert elapsed < 10, f"unmount took {elapsed:.1f} s"
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        if pid is not None:
            for _ in range(300):  # reap it, once it has exited
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)


def test_sync_dir_is_a_barrier(mount, run_sftpfs, remote_dir):
    """`sync DIR` (coreutils: fsync of the directory) flushes everything below it,
    as the README says; `sync -f` would not reach a FUSE file system at all."""
    mnt = mount()
    (mnt / "a").mkdir()
    (mnt / "a" / "f").write_text("synced by sync DIR\n")
    r = subprocess.run(["sync", str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (remote_dir / "a" / "f").read_text() == "synced by sync DIR\n"
    mount.unmount(mnt)
