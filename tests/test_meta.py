"""Metadata caching against a real server: freshness bounds, remounts, leaks.

Changes are made directly on the server's disk, as another writer would.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest

from sftpfs import runtime

FAST = ["cache_timeout=2", "attr_timeout=1", "entry_timeout=1", "negative_timeout=1"]


def server_write(server, path: Path, data: bytes, mtime: int | None = None) -> None:
    path.write_bytes(data)
    server.chown(path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def daemon_pid(env: dict, mnt: Path) -> int:
    with mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]}):
        return int(runtime.pidfile(mnt).read_text())


def stats(mount, env: dict, mnt: Path) -> dict[str, int]:
    """Ask the daemon for its counters (SIGUSR1 logs one line) and parse them."""
    before = mount.log_text(mnt).count("stats:")
    os.kill(daemon_pid(env, mnt), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [ln for ln in mount.log_text(mnt).splitlines() if "stats:" in ln]
        if len(lines) > before:
            return {k: int(v) for k, v in (kv.split("=") for kv in lines[-1].split("stats:")[1].split())}
        time.sleep(0.05)
    raise AssertionError("the daemon did not log its stats after SIGUSR1")


def tree(root: Path) -> list[tuple[str, str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            kind = "d" if p.is_dir() else "f"
            out.append((str(p.relative_to(root)), kind, st.st_size if kind == "f" else 0))
    return sorted(out)


def make_tree(server, root: Path, dirs: int = 10, files: int = 30) -> None:
    for d in range(dirs):
        sub = root / f"dir{d:02d}"
        sub.mkdir()
        server.chown(sub)
        for f in range(files):
            server_write(server, sub / f"f{f:03d}", b"x" * (d * 7 + f))


def test_server_changes_visible_within_ttl(sftp_server, remote_dir, mount):
    server_write(sftp_server, remote_dir / "a", b"to be deleted")
    server_write(sftp_server, remote_dir / "b", b"short", mtime=1_000_000_000)
    (remote_dir / "d").mkdir()
    sftp_server.chown(remote_dir / "d")
    mnt = mount(opts=FAST)
    assert sorted(os.listdir(mnt)) == ["a", "b", "d"]
    assert not (mnt / "later").exists()  # a negative entry, from the listing
    assert (mnt / "d").is_dir()

    (remote_dir / "a").unlink()
    server_write(sftp_server, remote_dir / "b", b"much longer now", mtime=1_100_000_000)
    server_write(sftp_server, remote_dir / "later", b"appeared")
    (remote_dir / "d").rmdir()
    server_write(sftp_server, remote_dir / "d", b"a file now")
    time.sleep(3.5)

    assert sorted(os.listdir(mnt)) == ["b", "d", "later"]
    assert not (mnt / "a").exists()
    st = os.stat(mnt / "b")
    assert (st.st_size, int(st.st_mtime)) == (15, 1_100_000_000)
    assert (mnt / "later").read_bytes() == b"appeared"
    assert (mnt / "d").is_file() and (mnt / "d").read_bytes() == b"a file now"


def test_cache_no_sees_changes_at_once(sftp_server, remote_dir, mount):
    server_write(sftp_server, remote_dir / "a", b"1")
    mnt = mount(opts=["cache=no"])
    assert os.listdir(mnt) == ["a"]
    assert not (mnt / "b").exists()
    server_write(sftp_server, remote_dir / "b", b"22", mtime=1_200_000_000)
    (remote_dir / "a").unlink()
    assert sorted(os.listdir(mnt)) == ["b"]
    assert not (mnt / "a").exists()
    assert os.stat(mnt / "b").st_size == 2
    assert int(os.stat(mnt / "b").st_mtime) == 1_200_000_000


def test_own_changes_update_the_cache_at_once(sftp_server, remote_dir, mount):
    mnt = mount()  # default timeouts: nothing here may wait for them
    assert os.listdir(mnt) == []
    (mnt / "new").write_bytes(b"abc")
    os.mkdir(mnt / "sub")
    os.rename(mnt / "new", mnt / "sub" / "moved")
    assert os.listdir(mnt) == ["sub"]
    assert os.listdir(mnt / "sub") == ["moved"]
    assert (mnt / "sub" / "moved").stat().st_size == 3
    os.unlink(mnt / "sub" / "moved")
    assert os.listdir(mnt / "sub") == []
    assert not (remote_dir / "sub" / "moved").exists()


def test_remount_starts_warm_and_revalidates(sftp_server, remote_dir, mount, sftpfs_env):
    make_tree(sftp_server, remote_dir, dirs=8, files=20)
    mnt = mount()
    first = tree(mnt)
    assert first == tree(remote_dir)
    mount.unmount(mnt)

    server_write(sftp_server, remote_dir / "dir03" / "added-while-unmounted", b"new")
    mnt = mount(mnt=mnt)
    walked = tree(mnt)  # answered from the disk cache, then revalidated behind it
    assert set(first) <= set(walked), "a remount lost entries"
    s = stats(mount, sftpfs_env, mnt)
    assert s["served_stale"] >= 1, s
    # the revalidation started by that walk finds the new file
    deadline = time.monotonic() + 10
    while "added-while-unmounted" not in os.listdir(mnt / "dir03"):
        assert time.monotonic() < deadline, "revalidation never showed the server's change"
        time.sleep(0.2)
    assert (mnt / "dir03" / "added-while-unmounted").read_bytes() == b"new"
    assert tree(mnt) == tree(remote_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_cache_is_rebuilt(sftp_server, remote_dir, mount, sftpfs_env, damage):
    make_tree(sftp_server, remote_dir, dirs=3, files=5)
    mnt = mount()
    expected = tree(mnt)
    mount.unmount(mnt)
    cache_root = Path(sftpfs_env["XDG_CACHE_HOME"]) / "sftpfs"
    dbs = list(cache_root.glob("*/meta.sqlite"))
    assert len(dbs) == 1, dbs
    if damage == "truncate":
        os.truncate(dbs[0], 100)
    elif damage == "garbage":
        dbs[0].write_bytes(os.urandom(8192))
    else:
        shutil.rmtree(cache_root)
    mnt = mount(mnt=mnt)
    assert tree(mnt) == expected
    (mnt / "dir00" / "after").write_bytes(b"still works")
    mount.unmount(mnt)
    assert (remote_dir / "dir00" / "after").read_bytes() == b"still works"
    mnt = mount(mnt=mnt)
    assert (mnt / "dir00" / "after").read_bytes() == b"still works"


def test_two_mounts_of_one_remote_share_the_cache(sftp_server, remote_dir, mount):
    make_tree(sftp_server, remote_dir, dirs=2, files=3)
    one = mount(opts=FAST)
    two = mount(opts=FAST)
    assert tree(one) == tree(two) == tree(remote_dir)
    (one / "dir00" / "from-one").write_bytes(b"1")
    (two / "dir01" / "from-two").write_bytes(b"2")
    time.sleep(3)
    assert (two / "dir00" / "from-one").read_bytes() == b"1"
    assert (one / "dir01" / "from-two").read_bytes() == b"2"
    mount.unmount(one)
    mount.unmount(two)
    again = mount()
    assert tree(again) == tree(remote_dir)


def test_forget_releases_inodes(sftp_server, remote_dir, mount, sftpfs_env):
    make_tree(sftp_server, remote_dir, dirs=10, files=30)
    mnt = mount()
    assert len(tree(mnt)) == 310
    held = stats(mount, sftpfs_env, mnt)["inodes"]
    assert held >= 310
    # Make the kernel drop its dentries and inodes: it sends FORGET for each.
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    deadline = time.monotonic() + 10
    while (left := stats(mount, sftpfs_env, mnt)["inodes"]) > 20:
        assert time.monotonic() < deadline, f"{left} inodes still held after the kernel forgot them"
        time.sleep(0.3)
    assert len(tree(mnt)) == 310  # and everything can be looked up again


def test_big_directory_lists_completely(sftp_server, remote_dir, mount):
    n = 20_000
    big = remote_dir / "big"
    big.mkdir()
    sftp_server.chown(big)
    for i in range(n):
        os.close(os.open(big / f"entry-{i:05d}-with-a-longer-name", os.O_CREAT | os.O_WRONLY, 0o644))
    subprocess.run(["chown", "-R", f"{sftp_server.user}:", str(big)], check=True)
    mnt = mount()
    t0 = time.monotonic()
    out = subprocess.run(["ls", "-l", str(mnt / "big")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    elapsed = time.monotonic() - t0
    names = sorted(line.split()[-1] for line in out[1:])
    assert names == sorted(os.listdir(big))
    assert len(names) == n
    assert elapsed < 30, f"ls -l of {n} entries took {elapsed:.1f} s"


def test_lookups_in_a_listed_dir_cost_no_request(sftp_server, remote_dir, mount, sftpfs_env):
    server_write(sftp_server, remote_dir / "present", b"x")
    mnt = mount(opts=["negative_timeout=0"])  # every miss reaches sftpfs, not the kernel cache
    os.listdir(mnt)
    before = stats(mount, sftpfs_env, mnt)["requests"]
    for probe in (".hidden", ".directory", ".Trash-0", "missing"):
        with pytest.raises(FileNotFoundError) as e:
            os.stat(mnt / probe)
        assert e.value.errno == errno.ENOENT
    assert os.stat(mnt / "present").st_size == 1
    assert stats(mount, sftpfs_env, mnt)["requests"] == before


@pytest.mark.parametrize("dircache", ["on", "off"])
def test_kernel_keeps_listings_while_fresh(sftp_server, remote_dir, mount, sftpfs_env, dircache):
    """With the kernel's directory cache a repeated `ls` does not reach sftpfs, until
    the attributes it came with expire; changes on either side still show."""
    for i in range(30):
        server_write(sftp_server, remote_dir / f"f{i:02d}", b"x")
    mnt = mount(opts=["cache_timeout=2", "attr_timeout=3", "entry_timeout=3",
                      f"kernel_dircache={dircache}"])
    names = sorted(os.listdir(mnt))
    before = stats(mount, sftpfs_env, mnt)["kernel_listings"]
    for _ in range(5):
        assert sorted(os.listdir(mnt)) == names
    again = stats(mount, sftpfs_env, mnt)["kernel_listings"] - before
    assert again == (0 if dircache == "on" else 5)

    (mnt / "mine").write_bytes(b"own change")  # the kernel drops its copy itself
    assert "mine" in os.listdir(mnt)
    server_write(sftp_server, remote_dir / "theirs", b"server change")
    deadline = time.monotonic() + 2 + 3 + 2  # metadata TTL + kernel attribute timeout + slack
    while "theirs" not in os.listdir(mnt):
        assert time.monotonic() < deadline, "a server change stayed hidden past the TTLs"
        time.sleep(0.2)
    assert sorted(os.listdir(mnt)) == sorted(names + ["mine", "theirs"])


def test_rsync_stat_walk_lists_directories_instead_of_stat_per_file(sftp_server, remote_dir,
                                                                     mount, sftpfs_env, tmp_path):
    """rsync into a tree that is already on the server stats every name and lists
    nothing: one LSTAT per file was 44 s for 1,000 files at 40 ms. The second lookup in
    a directory we have no listing of lists it (and the walk lists the rest ahead)."""
    make_tree(sftp_server, remote_dir, dirs=10, files=30)
    src = tmp_path / "src"
    shutil.copytree(remote_dir, src, copy_function=shutil.copy2)
    mnt = mount()
    before = stats(mount, sftpfs_env, mnt)["requests"]
    out = subprocess.run(["rsync", "-rlti", f"{src}/", f"{mnt}/"], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "", f"rsync found differences: {out[:500]}"
    after = stats(mount, sftpfs_env, mnt)
    sent = after["requests"] - before
    # Per directory: a listing (4 requests) and the LSTATs sent before it landed, a
    # handful here at zero latency; an LSTAT per file would be over 300.
    assert sent < 200, f"{sent} requests for a no-op rsync of 300 files in 10 directories"
    assert after["prefetched"] >= 10, after
    mount.unmount(mnt)


def test_a_directory_that_refuses_listing_is_asked_once(sftp_server, remote_dir, mount,
                                                         sftpfs_env):
    """Mode 0311: its names can be looked up, it cannot be listed. Lookups still answer,
    and the failed listing the lookups started is not retried for every two of them."""
    locked = remote_dir / "locked"
    locked.mkdir()
    for i in range(8):
        server_write(sftp_server, locked / f"f{i}", b"x" * i)
    sftp_server.chown(locked)
    locked.chmod(0o311)
    mnt = mount()
    os.listdir(mnt)  # the root, listed at mount
    before = stats(mount, sftpfs_env, mnt)["requests"]
    for i in range(8):
        assert (mnt / "locked" / f"f{i}").stat().st_size == i
        time.sleep(0.05)  # the listing attempt ends between lookups
    time.sleep(0.3)
    sent = stats(mount, sftpfs_env, mnt)["requests"] - before
    assert sent <= 9, f"{sent} requests: 8 lookups and one refused listing (OPENDIR) expected"
    with pytest.raises(PermissionError):
        os.listdir(mnt / "locked")
    mount.unmount(mnt)


def test_walk_from_the_listed_root_prefetches(sftp_server, remote_dir, mount, sftpfs_env):
    """The mount lists the root by itself and nothing below it; a program that then
    reads the root (served from that listing) starts the walk prefetch from it."""
    make_tree(sftp_server, remote_dir, dirs=6, files=2)
    mnt = mount()
    deadline = time.monotonic() + 10
    while stats(mount, sftpfs_env, mnt)["listed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert stats(mount, sftpfs_env, mnt)["prefetched"] == 0, "the mount walked the tree by itself"
    assert len(os.listdir(mnt)) == 6  # the walker's first step: the root, from the cache
    deadline = time.monotonic() + 10
    while stats(mount, sftpfs_env, mnt)["prefetched"] < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats(mount, sftpfs_env, mnt)["prefetched"] == 6, "subdirectories not listed ahead"
    mount.unmount(mnt)
