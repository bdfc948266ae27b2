"""The command line: help, version, unmount errors, and the forms that
mount(8) / fstab use (``mount -t fuse.sftpfs SOURCE MNT -o ...``, which runs
``sftpfs SOURCE MNT -o OPTS`` through mount.fuse3)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import is_mounted, require

REPO = Path(__file__).resolve().parent.parent


def package_version() -> str:
    text = (REPO / "sftpfs" / "__init__.py").read_text()
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    assert m, "no __version__ in sftpfs/__init__.py"
    return m.group(1)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, f"expected failure: {r.stdout} {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.stderr}"
    assert lines[0].startswith("sftpfs: "), lines[0]
    return lines[0]


def test_help(run_sftpfs):
    r = run_sftpfs("--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "mount" in out and "unmount" in out, out
    assert "-o" in out, out


def test_mount_help(run_sftpfs):
    r = run_sftpfs("mount", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("-o", "-F", "-p", "-i"):
        assert opt in r.stdout, f"{opt} missing from 'sftpfs mount --help':\n{r.stdout}"


def test_version(run_sftpfs):
    r = run_sftpfs("--version")
    assert r.returncode == 0, r.stderr
    assert package_version() in r.stdout, r.stdout


def test_console_script(sftpfs_env):
    exe = shutil.which("sftpfs", path=str(Path(sys.executable).parent))
    require(exe is not None, "sftpfs console script not installed (pip install -e .)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=sftpfs_env,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and package_version() in r.stdout, r.stdout + r.stderr


def test_no_arguments(run_sftpfs):
    r = run_sftpfs()
    assert r.returncode != 0
    assert "usage" in (r.stderr + r.stdout).lower(), "no usage message without arguments"


def test_unknown_option(run_sftpfs, mountpoint, sftp_server):
    r = run_sftpfs("mount", f"sftpfs-test:{sftp_server.root}", mountpoint(), "-F",
                   sftp_server.ssh_config, "-o", "no_such_option=1")
    line = one_line_error(r)
    assert "no_such_option" in line


def test_unmount_not_mounted(run_sftpfs, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    r = run_sftpfs("unmount", d)
    one_line_error(r)


def test_unmount_missing_dir(run_sftpfs, tmp_path):
    r = run_sftpfs("unmount", tmp_path / "nope")
    one_line_error(r)


def _client_opts(server) -> str:
    return ",".join([
        f"IdentityFile={server.client_key}",
        f"UserKnownHostsFile={server.known_hosts}",
        f"Port={server.port}",
    ])


def test_fstab_style_invocation(run_sftpfs, mount, mountpoint, sftp_server, remote_dir, fuse_ok):
    """``sftpfs SOURCE MNT -o OPTS`` (no subcommand, no -F): what mount.fuse3 runs."""
    (remote_dir / "hello").write_text("hello\n")
    mnt = mountpoint()
    r = run_sftpfs(sftp_server.url(remote_dir.name), mnt, "-o", _client_opts(sftp_server))
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    assert (mnt / "hello").read_text() == "hello\n"
    mount.unmount(mnt)


# what /bin/sh uses when mount(8) has cleared PATH (it does, and HOME too)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_mount_fuse3_helper(mount, mountpoint, sftp_server, remote_dir, sftpfs_env, fuse_ok):
    """mount.fuse3 SOURCE MNT -t fuse.sftpfs -o OPTS runs `sftpfs SOURCE MNT -o rw,OPTS,dev,suid`."""
    require(os.geteuid() == 0, "mount.fuse3 needs root here")
    require(shutil.which("mount.fuse3") is not None, "mount.fuse3 missing (apt install fuse3)")
    exe = shutil.which("sftpfs", path=str(Path(sys.executable).parent))
    require(exe is not None, "sftpfs console script not installed (pip install -e .)")
    (remote_dir / "hello").write_text("via mount.fuse3\n")
    mnt = mountpoint()
    env = dict(sftpfs_env)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', DEFAULT_PATH)}"
    cmd = [shutil.which("mount.fuse3"), sftp_server.url(remote_dir.name), str(mnt),
           "-t", "fuse.sftpfs", "-o", "rw," + _client_opts(sftp_server)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}{r.stdout}"
    assert is_mounted(mnt)
    assert (mnt / "hello").read_text() == "via mount.fuse3\n"
    mount.unmount(mnt)


@pytest.fixture
def sftpfs_on_default_path():
    """mount(8) clears PATH, so its helper finds `sftpfs` only in the default
    PATH (/usr/local/bin, /usr/bin, ...), where a system-wide install puts it.
    With a pip install elsewhere (pyenv, venv), link it into /usr/local/bin for
    the duration of the test."""
    if shutil.which("sftpfs", path=DEFAULT_PATH):
        yield
        return
    exe = shutil.which("sftpfs", path=str(Path(sys.executable).parent))
    require(exe is not None, "sftpfs console script not installed (pip install -e .)")
    require(os.geteuid() == 0 and os.path.isdir("/usr/local/bin"),
            "sftpfs is not on the default PATH and cannot be linked there")
    link = Path("/usr/local/bin/sftpfs")
    link.symlink_to(exe)
    try:
        yield
    finally:
        link.unlink()


def test_mount_t_fuse_sftpfs(mount, mountpoint, sftp_server, remote_dir, sftpfs_env, fuse_ok,
                             sftpfs_on_default_path):
    require(os.geteuid() == 0, "mount(8) needs root")
    require(shutil.which("mount.fuse3") is not None, "mount.fuse3 missing (apt install fuse3)")
    (remote_dir / "hello").write_text("via mount(8)\n")
    mnt = mountpoint()
    cmd = ["mount", "-t", "fuse.sftpfs", sftp_server.url(remote_dir.name), str(mnt),
           "-o", _client_opts(sftp_server)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sftpfs_env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}{r.stdout}"
    assert is_mounted(mnt)
    assert (mnt / "hello").read_text() == "via mount(8)\n"
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)], capture_output=True, text=True)
    assert r.stdout.strip().startswith("fuse"), r.stdout
    mount.unmount(mnt)


@pytest.mark.parametrize("opt", ["uid=12345", "gid=23456", "umask=077"])
def test_ownership_options(mount, sftp_server, remote_dir, opt):
    (remote_dir / "f").write_text("x")
    os.chmod(remote_dir / "f", 0o644)
    sftp_server.chown(remote_dir / "f")
    mnt = mount(opts=[opt])
    st = os.stat(mnt / "f")
    if opt.startswith("uid="):
        assert st.st_uid == 12345
    elif opt.startswith("gid="):
        assert st.st_gid == 23456
    else:
        assert st.st_mode & 0o077 == 0, oct(st.st_mode)
    mount.unmount(mnt)


def test_control_commands_stay_light():
    """`sftpfs sync|status|unmount` run in scripts and after every upload: they must
    not import trio or paramiko (0.2 s of start-up between them)."""
    code = ("import sys, sftpfs.cli, sftpfs.controlcmd; "
            "print(sorted(m for m in ('trio', 'paramiko', 'pyfuse3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"imported by the control commands: {r.stdout.strip()}"
