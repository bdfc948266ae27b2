"""Failures before the mount is up: each must exit non-zero with exactly one
line on stderr, starting with "sftpfs: ", saying what is wrong, and leave
nothing mounted.  Where the contract says an option fixes it, the fixed
command must mount."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import HOST_ALIAS, is_mounted, require
from tests.server import free_port


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0, f"expected failure, got rc=0; stderr: {r.stderr!r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("sftpfs: "), line
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not in {line!r}"
    return line


@pytest.fixture
def fail_mount(run_sftpfs, mountpoint, sftp_server, remote_dir, fuse_ok):
    """fail_mount(source=None, *, ssh_config=..., opts=(), mnt=None, **kw) -> (CompletedProcess, mnt)"""

    def go(source=None, *, ssh_config="default", opts=(), mnt=None, timeout=60, **kw):
        mnt = mountpoint() if mnt is None else mnt
        source = source or f"{HOST_ALIAS}:{remote_dir}"
        args = ["mount", source, str(mnt)]
        if ssh_config == "default":
            ssh_config = sftp_server.ssh_config
        if ssh_config is not None:
            args += ["-F", str(ssh_config)]
        if opts:
            args += ["-o", ",".join(opts)]
        r = run_sftpfs(*args, timeout=timeout, **kw)
        if r.returncode != 0:
            assert not is_mounted(mnt), f"{mnt} is mounted after a failed mount"
        return r, mnt

    return go


def other_key(tmp_path, name="other") -> tuple[str, str]:
    """A fresh ed25519 key pair: (private key path, "ssh-ed25519 AAAA...")."""
    p = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(p)], check=True)
    pub = (tmp_path / f"{name}.pub").read_text().split()
    return str(p), f"{pub[0]} {pub[1]}"


# ----------------------------------------------------------------- host keys


def test_unknown_host_key(fail_mount, sftp_server, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", known_hosts=kh, strict=None)
    r, _ = fail_mount(ssh_config=cfg)
    line = assert_one_line_error(r, "unknown", "SHA256:", "StrictHostKeyChecking=accept-new")
    fp = sftp_server.host_key_fingerprint()
    assert fp.rstrip("=") in line, f"host key fingerprint {fp} not shown: {line}"
    assert kh.read_text() == "", "known_hosts was written without accept-new"


def test_unknown_host_key_accept_new(mount, sftp_server, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", known_hosts=kh, strict=None)
    mnt = mount(ssh_config=cfg, opts=["StrictHostKeyChecking=accept-new"])
    assert sftp_server.host_key_pub().split()[1] in kh.read_text()
    # OpenSSH finds the new entry too
    r = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sftp_server.port}", "-f", str(kh)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"ssh-keygen -F cannot find the recorded key:\n{kh.read_text()}"
    mount.unmount(mnt)
    # and now plain strict checking accepts the host
    cfg2 = sftp_server.make_ssh_config(tmp_path / "cfg2", known_hosts=kh, strict="yes")
    mnt = mount(ssh_config=cfg2, mnt=mnt)
    mount.unmount(mnt)


def test_changed_host_key(fail_mount, sftp_server, tmp_path):
    _, pub = other_key(tmp_path)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sftp_server.port} {pub}\n")
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", known_hosts=kh)
    r, _ = fail_mount(ssh_config=cfg)
    assert_one_line_error(r, "changed")


# --------------------------------------------------------------- credentials


def test_bad_key(fail_mount, sftp_server, tmp_path):
    key, _ = other_key(tmp_path, "unauthorized")
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", identity=key)
    r, _ = fail_mount(ssh_config=cfg)
    assert_one_line_error(r, "authentication failed")


def test_bad_user(fail_mount, sftp_server, tmp_path):
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", user="nobody")
    r, _ = fail_mount(ssh_config=cfg)
    assert_one_line_error(r, "authentication failed")


def _password_config(sftp_server, tmp_path):
    if sftp_server.password is None:
        require(False, "password authentication needs sshd running as root")
    return sftp_server.make_ssh_config(tmp_path / "cfg", identity=None, batch=False)


def test_password_stdin(mount, sftp_server, remote_dir, tmp_path):
    cfg = _password_config(sftp_server, tmp_path)
    (remote_dir / "hello").write_text("hi")
    mnt = mount(ssh_config=cfg, opts=["password_stdin"], input=sftp_server.password + "\n")
    assert (mnt / "hello").read_text() == "hi"
    mount.unmount(mnt)


def test_wrong_password(fail_mount, sftp_server, tmp_path):
    cfg = _password_config(sftp_server, tmp_path)
    r, _ = fail_mount(ssh_config=cfg, opts=["password_stdin"], input="wrong-password\n")
    assert_one_line_error(r, "authentication failed")
    assert sftp_server.password not in r.stderr


# ------------------------------------------------------------------- network


def test_connection_refused(fail_mount, sftp_server, tmp_path):
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", port=free_port())
    r, _ = fail_mount(ssh_config=cfg)
    assert_one_line_error(r, "refused")


@pytest.fixture
def silent_listener():
    """A TCP listener on 127.0.0.1 that accepts and never sends a banner."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()
    conns = []

    def loop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                conns.append(c)
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    for c in conns:
        c.close()
    srv.close()


def test_no_banner_times_out(fail_mount, sftp_server, silent_listener, tmp_path):
    cfg = sftp_server.make_ssh_config(tmp_path / "cfg", port=silent_listener)
    t0 = time.monotonic()
    r, _ = fail_mount(ssh_config=cfg, opts=["ConnectTimeout=2"], timeout=30)
    elapsed = time.monotonic() - t0
    assert_one_line_error(r, "timed out")
    assert elapsed < 10, f"ConnectTimeout=2 took {elapsed:.1f}s"


def test_unresolvable_host(fail_mount, remote_dir):
    r, _ = fail_mount(f"nosuchhost.invalid:{remote_dir}", ssh_config=None, timeout=60)
    assert_one_line_error(r, "resolve")


def test_server_without_sftp(fail_mount, tmp_path):
    """A host that takes the key but runs another program for every session (a
    forced command, git-shell, a menu): the first SFTP channel closes during its
    set-up, which the mount's early handshake thread does. One line, nothing left."""
    from tests.server import SftpServer

    with SftpServer(tmp_path / "nosftp", force_command="/bin/false").start() as srv:
        r, _ = fail_mount(ssh_config=srv.ssh_config, timeout=60)
    line = assert_one_line_error(r, "SFTP")
    assert "sftp subsystem" in line.lower(), line


# --------------------------------------------------------------- remote path


def test_remote_path_missing(fail_mount, remote_dir):
    r, _ = fail_mount(f"{HOST_ALIAS}:{remote_dir}/no/such/dir")
    assert_one_line_error(r, "does not exist")


def test_remote_path_is_file(fail_mount, sftp_server, remote_dir):
    (remote_dir / "file").write_text("x")
    sftp_server.chown(remote_dir / "file")
    r, _ = fail_mount(f"{HOST_ALIAS}:{remote_dir}/file")
    assert_one_line_error(r, "not a directory")


# ---------------------------------------------------------------- mountpoint


def test_mountpoint_missing(fail_mount, tmp_path):
    mnt = tmp_path / "no-such-mountpoint"
    r, _ = fail_mount(mnt=mnt)
    assert_one_line_error(r, "does not exist")
    assert not mnt.exists(), "the mount point was created"


def test_mountpoint_not_empty(fail_mount, mount, mountpoint):
    mnt = mountpoint("busy")
    (mnt / "something").write_text("local file")
    r, _ = fail_mount(mnt=mnt)
    assert_one_line_error(r, "not empty", "nonempty")
    # with -o nonempty it mounts over the files
    mount(mnt=mnt, opts=["nonempty"])
    assert not (mnt / "something").exists()
    mount.unmount(mnt)
    assert (mnt / "something").read_text() == "local file"


def test_no_dev_fuse(fail_mount):
    require(os.geteuid() == 0 and shutil.which("unshare") is not None,
            "needs root and unshare to hide /dev/fuse")
    prefix = ("unshare", "-m", "sh", "-c", 'mount --bind /dev/null /dev/fuse && exec "$@"', "sh")
    r, _ = fail_mount(cmd_prefix=prefix)
    assert_one_line_error(r, "/dev/fuse")
